"""Kill -9 loop: each command killed at a random moment, then run again until it finishes, and
the result compared with an uninterrupted run's.

    python bench/kill_loop.py --kills 20 --out /tmp/kill-loop

For ``train`` (resumed with ``--resume`` where a checkpoint exists, else started afresh),
``index``, ``make-data`` and ``demo`` on SynthShop ``tiny``: a command is started, killed with
SIGKILL after a random delay (up to about its uninterrupted duration), and the same command is
run again to its end, which must exit 0.  The finished output must then equal the reference: the trained weights tensor for tensor, the
index's files byte for byte, the dataset's files byte for byte, the demo's metrics.  Prints one
table row per command: kills, reruns, and how many ended correct.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

MODEL = ["--model.vit_dim=32", "--model.text_dim=32", "--model.text_depth=1",
         "--model.text_heads=2", "--model.embed_dim=32", "--model.n_concepts=4",
         "--model.image_weights=none", "--batch_size=32", "--threads=1"]


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "mixer_lite.cli", *map(str, args)]


def run(cmd: list[str]) -> float:
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return time.time() - t0


def killed(cmd: list[str], delay: float) -> bool:
    """Start ``cmd``, SIGKILL its process group after ``delay`` s; True if it was still running."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        p.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return True


def files_digest(folder: Path, names) -> dict:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names}


def weights(run_dir: Path) -> dict:
    import torch

    return torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]


def same_weights(a: Path, b: Path) -> bool:
    import torch

    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def loop(name, kills, budget, start, again, check, rng) -> dict:
    """Rounds of: kill ``start()``'s command at a random moment within ``budget`` seconds (its
    uninterrupted time), run ``again()`` to its end, ``check()`` the result; until ``kills``
    rounds were killed mid-run (a draw past the end lets the command finish: that round
    counts, but not as a kill)."""
    counts = {"command": name, "kills": 0, "reruns": 0, "correct": 0, "rounds": 0}
    while counts["kills"] < kills and counts["rounds"] < 4 * kills:
        i = counts["rounds"]
        counts["rounds"] += 1
        counts["kills"] += killed(start(i), rng.uniform(0.05, 0.95) * budget)
        counts["reruns"] += 1
        r = subprocess.run(again(i), capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{name} round {i}: the rerun failed:\n{r.stderr[-2000:]}")
        counts["correct"] += bool(check(i))
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--out", default="/tmp/kill-loop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="make-data,train,index,demo")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = out / "data"
    t_data = run(cli("make-data", "--preset", "tiny", "--out", data, "--quiet"))
    jsonl = ("docs.jsonl", "queries.jsonl", "clicks.jsonl", "qrels.jsonl")
    train_args = ["--data", data, "--steps=12", "--checkpoint_every=2", *MODEL]
    t_train = run(cli("train", "--out", out / "ref-run", *train_args))
    t_index = run(cli("index", "--run", out / "ref-run", "--data", data, "--quiet"))
    rows = []
    only = args.only.split(",")

    if "make-data" in only:
        ref = files_digest(data, jsonl)

        def md(i):
            return cli("make-data", "--preset", "tiny", "--out", out / f"md{i}", "--quiet")
        rows.append(loop("make-data", args.kills, t_data, md, md,
                         lambda i: files_digest(out / f"md{i}", jsonl) == ref
                         and subprocess.run(cli("validate", out / f"md{i}"),
                                            capture_output=True).returncode == 0
                         and not list(out.glob(f".md{i}.partial")), rng))
        for folder in out.glob("md*"):
            shutil.rmtree(folder)

    if "train" in only:
        def fresh(i):
            return cli("train", "--out", out / f"tr{i}", *train_args)

        def resume(i):
            has_ckpt = (out / f"tr{i}" / "checkpoints" / "last.pt").exists()
            return fresh(i) + (["--resume"] if has_ckpt else [])
        rows.append(loop("train", args.kills, t_train, fresh, resume,
                         lambda i: same_weights(out / "ref-run", out / f"tr{i}"), rng))

    if "index" in only:
        ref = files_digest(out / "ref-run" / "index", ("docs.faiss",))

        def ix(i):
            return cli("index", "--run", out / "ref-run", "--data", data, "--quiet")

        def index_ok(i):
            from mixer_lite.retrieval import load_index

            _, meta = load_index(out / "ref-run" / "index")  # raises if the two disagree
            return (files_digest(out / "ref-run" / "index", ("docs.faiss",)) == ref
                    and meta["vectors"] == len(meta["doc_ids"])
                    and not list((out / "ref-run" / "index").glob(".*.tmp")))
        rows.append(loop("index", args.kills, t_index, ix, ix, index_ok, rng))

    if "demo" in only:
        demo_args = ["--preset", "tiny", "--steps=12", "--checkpoint_every=2", *MODEL]

        def demo(i):
            return cli("demo", "--data", out / f"dd{i}", "--reports", out / f"rep{i}",
                       "--run", out / f"dr{i}", *demo_args)
        ref_dir = out / "demo-ref"
        t_demo = run(cli("demo", "--data", ref_dir / "data", "--reports", ref_dir / "reports",
                         "--run", ref_dir / "run", *demo_args))
        ref_metrics = json.loads((ref_dir / "reports" / "metrics.json").read_text())
        rows.append(loop("demo", args.kills, t_demo, demo, demo,
                         lambda i: json.loads((out / f"rep{i}" / "metrics.json").read_text())
                         == ref_metrics, rng))

    print(f"kill -9 loop, {args.kills} kills per command (seed {args.seed}):")
    print("| command | rounds | killed mid-run | reruns | ended correct |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['command']} | {r['rounds']} | {r['kills']} | {r['reruns']} | "
              f"{r['correct']} / {r['rounds']} |")


if __name__ == "__main__":
    main()
