"""What a ``mixer-lite`` command in the test suite costs: started from scratch (``python -m
mixer_lite.cli``, a subprocess) vs forked from a server that imported the package once
(``tests/_cli.py``), on the same commands, side by side.

    python bench/cli_start.py [--repeats 3]

The commands: ``validate --no-image-check`` on SynthShop ``tiny`` (reads the folder only) and a
2-step ``train`` of the tests' narrow model (imports torch, its optimiser and the model).  Each
is run ``--repeats`` times each way after one untimed call that starts the server; the ratio
is the forked time over the subprocess time.  Every call must exit with 0 (checked); their
outputs are not compared here.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from _cli import TINY_MODEL, cli, cli_subprocess  # noqa: E402

from mixer_lite.runcache import ensure_data  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    data = ensure_data("tiny", 0, root=ROOT / "data")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp, "run")
        commands = {
            "validate": ["validate", data, "--no-image-check"],
            "train (2 steps)": ["train", "--data", data, "--out", run, "--steps=2",
                                "--eval_at_end=false", *TINY_MODEL],
        }
        cli("validate", data, "--no-image-check")  # starts the server, untimed
        print("| command | subprocess s | forked s | ratio |\n|---|---|---|---|")
        for name, argv in commands.items():
            seconds = {}
            for runner in (cli_subprocess, cli):
                times = []
                for _ in range(args.repeats):
                    shutil.rmtree(run, ignore_errors=True)
                    t0 = time.perf_counter()
                    done = runner(*argv)
                    times.append(time.perf_counter() - t0)
                    if done.returncode != 0:
                        raise SystemExit(f"{name} failed: {done.stderr[-2000:]}")
                seconds[runner] = min(times)
            print(f"| {name} | {seconds[cli_subprocess]:.2f} | {seconds[cli]:.2f} | "
                  f"{seconds[cli] / seconds[cli_subprocess]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
