"""The GPU path checked in one run of at most 10 minutes on any GPU machine: smoke runs of every
command, training throughput under each precision and switch, and the classifier at 1e6-1e7
classes, each figure printed beside its reference from the same run.

    python bench/gpu_check.py            # make gpu-check
    python bench/gpu_check.py --quick --device cpu   # the script's own check, on a CPU

1. **Smoke.**  On SynthShop ``tiny`` (generated in a temporary folder): ``train`` on one GPU
   (loader workers on, fp16 with its loss scale), then ``index``, ``search`` and ``evaluate``
   through the command line, and the same model evaluated on the GPU and on the CPU (Recall@10
   must agree to one photo).  With more than one GPU, ``torchrun`` on all of them (NCCL).
2. **Throughput.**  ``train``'s own log (:class:`mixer_lite.train.Throughput`) over short
   runs: the ``tiny-cpu`` CNN at 64 and 128 px and ResNet-50 at 224 px (random weights), each
   in fp32, bf16 and fp16, and bf16 with channels_last and with compile; ratio against fp32
   at the same size.
3. **Classifier.**  ``bench/partial_fc.py`` at 1e6 and 1e7 classes: full softmax against
   class-centre sampling (step time and memory).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from train_speed import steady_state  # bench/: this script's folder

from mixer_lite.dataset import load_dataset
from mixer_lite.retrieval import evaluate_model
from mixer_lite.runs import load_run_model
from mixer_lite.synthshop import make_synthshop
from mixer_lite.train import config_from, train

CLI = [sys.executable, "-m", "mixer_lite.cli"]


def run_cli(*args: str, torchrun: int = 0) -> float:
    """A command as a user runs it; its seconds.  A failure prints its error and stops here."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
                 "--standalone", "-m", "mixer_lite.cli"] if torchrun else CLI)
    t0 = time.perf_counter()
    done = subprocess.run([*launcher, *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"FAILED: {' '.join(args[:1])} (exit {done.returncode})\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def smoke(data: Path, tmp: Path, device: str, steps: int) -> None:
    run = tmp / "smoke"
    train_args = ["--data", str(data), "--config", "tiny-cpu", f"--device={device}",
                  f"--steps={steps}", "--loader_workers=2", "--amp_dtype=fp16", "--log_every=1"]
    rows = [("train, 1 device, fp16, 2 loader workers",
             run_cli("train", "--out", str(run), *train_args))]
    log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = sum(bool(r.get("skipped")) for r in log)
    rows += [("index", run_cli("index", "--run", str(run), "--data", str(data),
                               f"--device={device}")),
             ("search", run_cli("search", "--run", str(run), "--data", str(data), "--image",
                                str(next((data / "images" / "queries").iterdir())),
                                f"--device={device}")),
             ("evaluate", run_cli("evaluate", "--run", str(run), "--data", str(data),
                                  f"--device={device}", "--quiet"))]
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    if gpus > 1:
        rows.append((f"train, torchrun on {gpus} GPUs (NCCL)",
                     run_cli("train", "--out", str(tmp / "smoke-all"), *train_args,
                             torchrun=gpus)))
    print("\n| smoke | seconds |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} |")
    print(f"fp16 loss scale: {skipped} of the {len(log)} logged steps skipped")
    shop = load_dataset(data)
    here = evaluate_model(load_run_model(run, device), shop, device=device)
    cpu = evaluate_model(load_run_model(run), shop, device="cpu")
    gap = abs(here["recall@10"] - cpu["recall@10"]) * here["queries"]
    print(f"Recall@10 evaluated on {device}: {here['recall@10']:.4f}, on the CPU: "
          f"{cpu['recall@10']:.4f} ({gap:.0f} photos apart)")
    if gap > 1:
        sys.exit("FAILED: the device's evaluation differs from the CPU's by more than a photo")


def throughput_rows(quick: bool):
    """(encoder, size, setting, overrides): each encoder and size in fp32 first (the
    reference), then bf16, fp16, and bf16 with each switch."""
    sizes = [("cnn", 32)] if quick else [("cnn", 64), ("cnn", 128),
                                         ("torchvision:resnet50", 224)]
    for encoder, size in sizes:
        for setting, extra in (("fp32", ["--amp=false"]), ("bf16", []),
                               ("fp16", ["--amp_dtype=fp16"]),
                               ("bf16 + channels_last", ["--channels_last=true"]),
                               ("bf16 + compile", ["--compile=true"])):
            if quick and setting.endswith("compile"):
                continue  # minutes of compiling on a CPU for a check of the script itself
            yield encoder, size, setting, [f"--model.image_encoder={encoder}",
                                           f"--model.image_size={size}", *extra]


def throughput(data: Path, tmp: Path, device: str, steps: int, quick: bool) -> None:
    common = [f"--device={device}", f"--steps={steps}", f"--log_every={max(1, steps // 4)}",
              f"--checkpoint_every={steps}", "--eval_at_end=false", "--val_share=0",
              "--centre_init=random", "--model.image_weights=none", "--batch_size=128"]
    print("\n| encoder | px | setting | images/s | x fp32 | data-wait share | peak MiB |\n"
          "|---|---|---|---|---|---|---|")
    base = None
    for i, (encoder, size, setting, extra) in enumerate(throughput_rows(quick)):
        run = tmp / f"speed{i}"
        train(data, run, config_from("tiny-cpu", common + extra), progress=False)
        speed, wait = steady_state(run)
        peak = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["peak_mem_mib"]
        base = speed if setting == "fp32" else base
        print(f"| {encoder} | {size} | {setting} | {speed:.0f} | {speed / base:.2f} | "
              f"{wait:.1%} | {peak:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes and few steps")
    ap.add_argument("--classes", default="1e6,1e7", help="for bench/partial_fc.py")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no GPU here: torch.cuda.is_available() is False (--device cpu --quick checks "
                 "the script itself)")
    what = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{what}; torch {torch.__version__}; {torch.cuda.device_count()} GPU(s)")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synth-tiny"
        make_synthshop(data, preset="tiny", seed=0, workers=2, progress=False)
        smoke(data, Path(tmp), args.device, steps=6 if args.quick else 40)
        throughput(data, Path(tmp), args.device, steps=4 if args.quick else 24, quick=args.quick)
    if not args.quick:
        print(f"\nbench/partial_fc.py --device {args.device} --classes {args.classes}:",
              flush=True)
        subprocess.run([sys.executable, str(Path(__file__).parent / "partial_fc.py"),
                        f"--device={args.device}", f"--classes={args.classes}", "--steps=3"],
                       check=True)
    print(f"\ngpu_check: every step passed in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
