"""The ``mixer-lite`` command line: parses arguments and calls the package's functions.

Nothing imports this module; notebooks call the same functions directly.
"""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_make_data(args) -> int:
    from .synthshop import make_synthshop

    stats = make_synthshop(args.out, preset=args.preset, seed=args.seed, workers=args.workers,
                           progress=not args.quiet)
    print(json.dumps(stats))
    return 0


def _cmd_validate(args) -> int:
    from .dataset import DatasetError, load_dataset

    try:
        data = load_dataset(args.dir, check_images=not args.no_image_check)
    except DatasetError as e:
        for p in e.problems:
            print(str(p), file=sys.stderr)
        print(f"{args.dir}: INVALID, {len(e.problems)} problem(s)", file=sys.stderr)
        return 1
    s = data.summary
    print(f"{args.dir}: valid: {s['docs']} docs, {s['train_queries']} train queries, "
          f"{s['test_queries']} test queries, {s['clicks']} click rows "
          f"({s['click_events']} click events), {s['qrels']} qrels")
    return 0


def _cmd_build_classes(args) -> int:
    from .classes import ClassConfig, analyse_steps, build_classes_from_clicks, write_classes
    from .config import apply_overrides
    from .dataset import load_dataset

    cfg = apply_overrides(ClassConfig(), args.overrides)
    data = load_dataset(args.data, check_images=False)
    c = data.clicks
    classes, stats = build_classes_from_clicks(c["query_id"], c["doc_id"], c["count"], cfg)
    write_classes(args.out, classes)
    print(json.dumps(stats))
    if args.analyze:
        from .synthshop import load_truth

        steps = analyse_steps(c["query_id"], c["doc_id"], c["count"], load_truth(args.data), cfg)
        for s in steps:
            s.pop("sizes")
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                              for k, v in s.items()}))
    return 0


def _cmd_train(args) -> int:
    from .train import config_from, train

    cfg = config_from(args.config, args.overrides)
    result = train(args.data, args.out, cfg, resume=args.resume, preset=args.config)
    print(json.dumps(result))
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(data_dir=args.data, reports=args.reports, preset=args.preset, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixer-lite", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-data", help="generate a SynthShop dataset folder")
    s.add_argument("--out", required=True, help="new (or empty) folder to write")
    s.add_argument("--preset", default="small", choices=["tiny", "small", "large"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=1, help="processes rendering images")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_make_data)

    s = sub.add_parser("validate", help="check a dataset folder against the format")
    s.add_argument("dir")
    s.add_argument("--no-image-check", action="store_true",
                   help="check image paths but do not open the files")
    s.set_defaults(func=_cmd_validate)

    s = sub.add_parser("build-classes", help="weak-label classes from a folder's clicks",
                       description="Overrides set ClassConfig fields, e.g. --min_share=0.3.")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True, help="CLASSES.jsonl to write")
    s.add_argument("--analyze", action="store_true",
                   help="also print purity / noise / recall per step against _truth/ "
                        "(SynthShop folders only)")
    s.set_defaults(func=_cmd_build_classes, overrides=[])

    s = sub.add_parser("train", help="train a model; --key=value overrides the preset",
                       description="Overrides set TrainConfig fields: --lr=1e-3, "
                                   "--model.fusion=concat, --classes.min_share=0.3 ...")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True, help="run folder")
    s.add_argument("--config", default="tiny-cpu", help="preset: tiny-cpu | base-gpu")
    s.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints")
    s.set_defaults(func=_cmd_train, overrides=[])

    s = sub.add_parser("demo", help="the main job on the built-in data (what `make demo` runs)")
    s.add_argument("--data", default="data/synth-small")
    s.add_argument("--reports", default="reports")
    s.add_argument("--preset", default="small", choices=["tiny", "small", "large"])
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    overrides = [x for x in extra if x.startswith("--") and "=" in x]
    if len(overrides) != len(extra) or (overrides and not hasattr(args, "overrides")):
        build_parser().parse_args(argv)  # let argparse report what it does not know
        print(f"mixer-lite {args.command}: does not take --key=value overrides", file=sys.stderr)
        return 2
    args.overrides = overrides
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"mixer-lite {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
