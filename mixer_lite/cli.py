"""The ``mixer-lite`` command line: parses arguments and calls the package's functions.

Nothing imports this module; notebooks call the same functions directly.
"""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_make_data(args) -> int:
    if args.source == "icons":
        from .icons import make_icons

        chosen = {"max_concepts": args.max_concepts, "sets": args.sets}
        stats = make_icons(args.out, npm_root=args.npm_root, theme_root=args.theme_root,
                           seed=args.seed, workers=args.workers, progress=not args.quiet,
                           **{k: v for k, v in chosen.items() if v})
    else:
        from .synthshop import make_synthshop

        extra = {"scene_share": args.scene_share} if args.scene_share is not None else {}
        stats = make_synthshop(args.out, preset=args.preset, seed=args.seed,
                               workers=args.workers, progress=not args.quiet, **extra)
    print(json.dumps(stats))
    return 0


def _cmd_validate(args) -> int:
    from .dataset import DatasetError, load_dataset, write_valid_stamp

    try:  # every image decoded, whatever an earlier stamp says
        data = load_dataset(args.dir, check_images=not args.no_image_check, trust_stamp=False)
    except DatasetError as e:
        for p in e.problems:
            print(str(p), file=sys.stderr)
        print(f"{args.dir}: INVALID, {len(e.problems)} problem(s)", file=sys.stderr)
        return 1
    s = data.summary
    print(f"{args.dir}: valid: {s['docs']} docs, {s['train_queries']} train queries, "
          f"{s['test_queries']} test queries, {s['clicks']} click rows "
          f"({s['click_events']} click events), {s['qrels']} qrels")
    if not args.no_image_check and not data.packed:  # a pack's images were checked to pack
        try:
            stamp = write_valid_stamp(args.dir)
            print(f"({stamp} written: other commands decode no image of this folder while "
                  f"its JSONL files stay as they are)", file=sys.stderr)
        except OSError as e:  # a read-only dataset is valid all the same
            print(f"(no stamp written: {os_error_message(e)}; every process will decode every "
                  f"image again)", file=sys.stderr)
    return 0


def _cmd_pack(args) -> int:
    from .pack import pack_dataset

    meta = pack_dataset(args.data, args.out, shard_mb=args.shard_mb, progress=not args.quiet)
    shards = sum(len(t["shards"]) for t in meta["tables"].values())
    size = sum(s["bytes"] for t in meta["tables"].values() for s in t["shards"])
    print(f"{args.out}: {meta['summary']['docs']} docs and "
          f"{meta['summary']['train_queries'] + meta['summary']['test_queries']} query photos "
          f"in {shards} shards, {size / 2**20:.1f} MiB; use it as --data wherever the folder "
          f"was")
    return 0


def _cmd_build_classes(args) -> int:
    from .classes import ClassConfig, analyse_steps, build_classes_from_clicks, write_classes
    from .config import apply_overrides
    from .dataset import load_dataset
    from .files import check_writable

    cfg = apply_overrides(ClassConfig(), args.overrides)
    check_writable(args.out)
    data = load_dataset(args.data, check_images=False)  # reads no image
    q, d, n = data.clicks_columns()
    if not len(q):
        raise ValueError(f"{args.data}/clicks.jsonl has no clicks: no class to build "
                         f"({args.out} not written)")
    classes, stats = build_classes_from_clicks(q, d, n, cfg)
    if not classes:
        raise ValueError(f"no class survived class construction with {cfg} "
                         f"({args.out} not written); loosen the thresholds")
    write_classes(args.out, classes)
    print(json.dumps(stats))
    if args.analyze:
        from .synthshop import load_truth

        steps = analyse_steps(q, d, n, load_truth(args.data), cfg)
        for s in steps:
            s.pop("sizes")
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                              for k, v in s.items()}))
    return 0


def _cmd_train(args) -> int:
    import torch.distributed as dist

    from .train import config_from, train

    cfg = config_from(args.config, args.overrides)
    try:
        result = train(args.data, args.out, cfg, resume=args.resume, preset=args.config)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank closes its connections while another still uses them
    finally:
        # Under torchrun, train() joined the process group: torch asks each process to
        # destroy it before exit, while the interpreter is still whole.
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    print(json.dumps(result))
    return 0


def _cmd_pretrain(args) -> int:
    from .config import apply_overrides
    from .pretrain import PRESETS, pretrain

    if args.config not in PRESETS:
        raise ValueError(f"unknown pretraining config {args.config!r}; presets: "
                         f"{', '.join(PRESETS)}")
    cfg = apply_overrides(PRESETS[args.config], args.overrides)
    card = pretrain(args.corpus, args.run, args.out, cfg, resume=args.resume,
                    progress=not args.quiet, cache=args.cache)
    if "stopped_at" in card:
        print(json.dumps(card))
        return 0
    print(json.dumps({"weights": args.out, "sha256": card["sha256"],
                      "probe_recall@1": card["probe_recall@1"],
                      "train_seconds": card["train_seconds"]}))
    return 0


def _cmd_evaluate(args) -> int:
    """Under torchrun each rank embeds its share of the docs and photos (its own GPU); rank 0
    writes and prints.  Like ``index``, a job that exits: it keeps the memory freed between
    batches (:func:`runs.keep_freed_memory`; 1.57-1.75x the embeddings a second on 2 CPU cores,
    ``bench/embed_speed.py``)."""
    from pathlib import Path

    from .dataset import load_dataset
    from .files import check_writable, write_json
    from .retrieval import check_index_kind, evaluate_model, evaluate_raw_pixels
    from .runs import eval_name, keep_freed_memory, load_run_model, setup_distributed
    from .viz import recall_curves

    if not args.run and not args.baseline:
        raise ValueError("give --run RUN (one or more) or --baseline raw-pixel")
    if args.compare_out:
        check_writable(args.compare_out)
    keep_freed_memory()
    rank, world, device = setup_distributed(args.device)
    models = {run: load_run_model(run, device) for run in args.run}  # a damaged one fails first
    for run in models:
        check_writable(run, "folder")
    data = load_dataset(args.data)
    check_index_kind(args.index, len(data.docs))
    names = {run: eval_name(run, data, args.index) for run in models}
    results = {}
    for run, model in models.items():
        metrics = evaluate_model(model, data, device, index_kind=args.index,
                                 progress=not args.quiet and rank == 0, rank=rank, world=world)
        if rank == 0:
            name = names[run]
            write_json(Path(run) / f"{name}.json", metrics)
            recall_curves({Path(run).name: metrics["recall_curve"]},
                          path=Path(run) / f"{name.replace('eval', 'recall_curve', 1)}.png")
        results[str(run)] = metrics
    if rank > 0:
        return 0
    if args.baseline:
        results["raw-pixel baseline"] = evaluate_raw_pixels(data, index_kind=args.index)
    if args.compare_out:
        recall_curves({Path(k).name: v["recall_curve"] for k, v in results.items()},
                      title="Recall@K: runs compared", path=args.compare_out)
    summary = {k: {m: v[m] for m in ("recall@1", "recall@5", "recall@10", "recall@20",
                                     "recall@50", "map@10", "mrr", "queries", "docs", "index")}
               for k, v in results.items()}
    print(json.dumps(next(iter(summary.values())) if len(summary) == 1 else summary))
    return 0


def _cmd_index(args) -> int:
    import torch

    from .runs import keep_freed_memory
    from .service import build_run_index

    keep_freed_memory()  # as evaluate: every doc embedded, then the process exits
    built = build_run_index(args.run, args.data, args.index, not args.quiet, args.device)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(json.dumps(built))
    return 0


def _cmd_search(args) -> int:
    from .dataset import ImageTable, load_dataset
    from .retrieval import embed_queries, search
    from .runs import resolve_device
    from .service import open_run_index

    photos = _photo_paths(args.image)
    device = resolve_device(args.device)
    data = load_dataset(args.data, check_images=False)  # only the doc ids and texts are read
    model, index, _ = open_run_index(args.run, data, device)
    images = ImageTable(photos, model.cfg.image_size, preload=False, threads=2)
    q = embed_queries(model, images, 64, device)  # a bad photo is named before any result
    scores, rows = search(index, q, args.k)
    texts = data.doc_texts
    for photo, sc, rw in zip(photos, scores, rows):
        print(f"# {_printable(photo)}")
        for rank, (s, r) in enumerate(zip(sc, rw), 1):
            if r >= 0:
                print(f"{rank}\t{_printable(data.doc_ids[r])}\t{s:.4f}\t{_printable(texts[r])}")
    return 0


def _printable(text: str) -> str:
    """``text`` with control characters (newline, tab, terminal escapes) written as escapes, so a
    title cannot forge a result line or colour the terminal."""
    import unicodedata

    return "".join(c if unicodedata.category(c)[0] != "C" else c.encode("unicode_escape")
                   .decode("ascii") for c in text)


DEVICE_HELP = "auto (a GPU when torch sees one) | cpu | cuda | cuda:N"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _photo_paths(given: list[str]) -> list[str]:
    """The photos named by ``--image`` (files, or folders searched for image files)."""
    from pathlib import Path

    out = []
    for item in given:
        p = Path(item)
        if p.is_dir():  # regular files only: reading a FIFO or a device would never end
            found = sorted(str(f) for f in p.iterdir()
                           if f.suffix.lower() in PHOTO_SUFFIXES and f.is_file())
            if not found:
                raise ValueError(f"--image {item}: a folder without image files "
                                 f"({', '.join(PHOTO_SUFFIXES)})")
            out += found
        elif p.is_file():
            out.append(str(p))
        elif p.exists():
            raise ValueError(f"--image {item}: not a regular file or folder")
        else:
            raise FileNotFoundError(f"--image {item}: no such file or folder")
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _cmd_serve(args) -> int:
    from .server import serve
    from .service import Limits

    if args.batch_window_ms < 0 or args.max_upload_mb <= 0:
        raise ValueError("--batch-window-ms must be >= 0 and --max-upload-mb > 0")
    limits = Limits(max_k=args.max_k, max_pixels=args.max_pixels,
                    max_upload_bytes=int(args.max_upload_mb * 2 ** 20),
                    max_photos=args.max_photos)
    serve(args.run, args.data, args.host, args.port, args.batch_window_ms, args.max_batch,
          args.threads, limits, args.access_log, args.device)
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(data_dir=args.data, reports=args.reports, preset=args.preset, seed=args.seed,
             run=args.run, train_overrides=args.overrides, config=args.config,
             **({"scene_share": args.scene_share} if args.scene_share is not None else {}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixer-lite", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-data", help="write a built-in dataset folder: SynthShop, or the "
                                         "icons dataset from installed icon sets")
    s.add_argument("--out", required=True, help="new (or empty) folder to write")
    s.add_argument("--source", default="synthshop", choices=["synthshop", "icons"])
    s.add_argument("--preset", default="small", choices=["tiny", "small", "large"],
                   help="SynthShop's size")
    s.add_argument("--scene-share", type=float, default=None,
                   help="SynthShop: share of docs shot among 1-3 other products, the title "
                        "naming one (default: the preset's)")
    s.add_argument("--npm-root", default="data/.icon-packages/node_modules",
                   help="icons: where the npm icon sets are installed")
    s.add_argument("--theme-root", default="/usr/share/icons",
                   help="icons: where the Debian icon themes are installed")
    s.add_argument("--max-concepts", type=_positive_int, default=None,
                   help="icons: a seeded sample of this many concepts (default: all)")
    s.add_argument("--sets", type=lambda text: tuple(text.split(",")), default=None,
                   help="icons: comma-separated icon sets to read (default: all 18)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=1, help="processes rendering images")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_make_data)

    s = sub.add_parser("validate", help="check a dataset folder against the format")
    s.add_argument("dir")
    s.add_argument("--no-image-check", action="store_true",
                   help="check image paths but do not open the files")
    s.set_defaults(func=_cmd_validate)

    s = sub.add_parser("pack", help="a dataset folder as a few Arrow shards (large jobs)",
                       description="Validates the folder (every image decoded, unless a "
                                   "`validate` stamp says so) and writes its tables and image "
                                   "files into memory-mapped Arrow shards; every command reads "
                                   "the pack as --data, with nothing to parse or check again.")
    s.add_argument("--data", required=True, help="the dataset folder")
    s.add_argument("--out", required=True, help="new (or empty) folder to write")
    s.add_argument("--shard-mb", type=float, default=256.0, help="about this many MiB a shard")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_pack)

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
    s.add_argument("--config", default="tiny-cpu",
                   help="preset: tiny-cpu | scratch-cpu | base-gpu")
    s.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints")
    s.set_defaults(func=_cmd_train, overrides=[])

    s = sub.add_parser("pretrain", help="pretrain the cnn image encoder on a folder of images "
                                        "or on the icon sets' designers",
                       description="Overrides set PretrainConfig fields: --steps=500 ... "
                                   "The weights load with --model.image_weights=WEIGHTS.pt.")
    s.add_argument("--corpus", action="append", default=[],
                   help="folder of images, e.g. /usr/share/openclipart/png (repeatable); "
                        "none with --positives=designers, which reads the icon sets")
    s.add_argument("--out", required=True, help="WEIGHTS.pt to write at the end")
    s.add_argument("--run", default="runs/pretrain",
                   help="folder for the log and checkpoints")
    s.add_argument("--cache", help="folder for the rendered views, shared by runs with the same "
                                   "corpus and view settings (default: RUN/corpus)")
    s.add_argument("--config", default="cpu",
                   help="preset: cpu | designers-cpu | designers-colour-cpu | gpu")
    s.add_argument("--resume", action="store_true", help="continue from RUN/checkpoints")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_pretrain, overrides=[])

    s = sub.add_parser("evaluate", help="Recall@K, mAP@10, MRR of runs on the test split")
    s.add_argument("--run", action="append", default=[], help="run folder (repeat to compare)")
    s.add_argument("--data", required=True)
    s.add_argument("--index", default="flat", choices=["flat", "ivf", "hnsw", "ivfpq"])
    s.add_argument("--baseline", choices=["raw-pixel"], help="add the no-learning baseline")
    s.add_argument("--compare-out", help="PNG with every run's recall curve")
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("index", help="embed a run's docs offline and save a FAISS index")
    s.add_argument("--run", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    s.add_argument("--index", default="flat", choices=["flat", "ivf", "hnsw", "ivfpq"])
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_index)

    s = sub.add_parser("search", help="top-k docs for query photos, from a saved index "
                                      "(`mixer-lite index` builds it)")
    s.add_argument("--run", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--image", required=True, nargs="+", action="extend",
                   help="photo files or folders of photos (one model load for all)")
    s.add_argument("--k", type=_positive_int, default=10)
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    s.set_defaults(func=_cmd_search)

    s = sub.add_parser("serve", help="a search service and page over a run's index (built "
                                     "first when the run has none)")
    s.add_argument("--run", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: this machine only)")
    s.add_argument("--port", type=_positive_int, default=8000)
    s.add_argument("--batch-window-ms", type=float, default=2.0,
                   help="how long the first waiting search waits for others to share its "
                        "forward pass (bench/serve.py measured the choice)")
    s.add_argument("--max-batch", type=_positive_int, default=64, help="photos per forward pass")
    s.add_argument("--max-k", type=_positive_int, default=100)
    s.add_argument("--max-pixels", type=_positive_int, default=40_000_000,
                   help="largest photo accepted, from its header (width x height)")
    s.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body")
    s.add_argument("--max-photos", type=_positive_int, default=16, help="photos per request")
    s.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    s.add_argument("--access-log", action="store_true", help="log every request")
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    s.set_defaults(func=_cmd_serve)

    s = sub.add_parser("demo", help="the main job on the built-in data (what `make demo` runs)")
    s.add_argument("--data", default=None, help="dataset folder, generated when missing "
                   "(default: data/synth-<preset>-scenes<percent>)")
    s.add_argument("--scene-share", type=float, default=None,
                   help="share of docs shot among other products, where the data is generated "
                        "(default: demo.DEMO_SCENE_SHARE)")
    s.add_argument("--reports", default="reports")
    s.add_argument("--preset", default="small", choices=["tiny", "small", "large"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--run", default="runs/demo", help="run folder for the training step")
    s.add_argument("--config", default="tiny-cpu", help="training preset (see `train`)")
    s.set_defaults(func=_cmd_demo, overrides=[])
    return p


def os_error_message(e: OSError) -> str:
    """One line for an error of the operating system: the path first, then what went wrong in
    words a user acts on."""
    import errno

    words = {errno.ENOSPC: "no space left on the disk", errno.EDQUOT: "disk quota exceeded",
             errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
             errno.EROFS: "read-only file system", errno.EISDIR: "is a folder, not a file",
             errno.ENOTDIR: "a part of the path is a file, not a folder",
             errno.EFBIG: "file too large (a file-size limit of this system or process)",
             errno.ELOOP: "too many levels of symbolic links (a link loop?)",
             errno.ENAMETOOLONG: "name too long"}
    what = words.get(e.errno, e.strerror or str(e))
    return f"{e.filename}: {what}" if e.filename else what


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    overrides = [x for x in extra if x.startswith("--") and "=" in x]
    unknown = [x for x in extra if x not in overrides]
    if unknown:
        print(f"mixer-lite {args.command}: error: unrecognised argument(s): {' '.join(unknown)}"
              + (" (overrides take the form --key=value)" if hasattr(args, "overrides") else ""),
              file=sys.stderr)
        return 2
    if overrides and not hasattr(args, "overrides"):
        print(f"mixer-lite {args.command}: error: does not take --key=value overrides "
              f"({' '.join(overrides)})", file=sys.stderr)
        return 2
    args.overrides = overrides
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"mixer-lite {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # permission, disk full, a file where a folder should be, ...
        print(f"mixer-lite {args.command}: error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mixer-lite {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
