"""The run folder: what a run is (its config), whether a folder may take one, its checkpoints
and model file, where its evaluations go, and the processes and devices it runs on.

A run folder holds everything a run made: ``config.json``, ``checkpoints/last.pt``,
``metrics.jsonl``, ``model.pt``, ``eval*.json``, ``val.json``, ``index/``.  A ``model.pt`` or a
checkpoint is a zip of tensors plus a pickle that says how they fit together.
``torch.load(weights_only=False)`` runs whatever callable that pickle names, so a run folder
copied from elsewhere could execute code on ``evaluate``, ``index``, ``search`` or ``--resume``.
Every torch file mixer-lite writes holds tensors, numbers, strings, lists and dicts only, so
:func:`load_torch` reads them all with ``weights_only=True`` and refuses anything else with a
message naming the file.
"""
from __future__ import annotations

import json
import os
import pickle
import platform
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .config import check_resumable, config_diff, saved_config
from .dataset import data_fingerprint
from .files import atomic_path, check_writable


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device ``--device`` names; ``auto``: this rank's GPU when torch sees one, else the
    CPU; ``cuda`` without an index: this rank's GPU (``cuda:LOCAL_RANK``), so ranks never share
    GPU 0.  A name torch cannot parse or a GPU torch does not see is an error saying so."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device={name}: not a device name (auto, cpu, cuda, cuda:N)") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device={name}: torch sees no CUDA GPU (torch.cuda.is_available() "
                         f"is False); use --device=cpu (or auto)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device={name}: this rank's GPU is cuda:{device.index}, and torch "
                         f"sees {torch.cuda.device_count()} (more processes than GPUs?)")
    return device


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device); under torchrun, joins the process group.

    The rank's GPU becomes the current CUDA device before the group is made: NCCL collectives
    that allocate (``all_gather_object`` in checkpointing) use the current device, which would
    otherwise be GPU 0 on every rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        # By the device, not by what the machine has: --device=cpu on a GPU machine needs gloo.
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world, device


# Training settings that change how a run is executed, not what it computes: a resumed run
# may differ in them.
RUNTIME_KEYS = ("device", "threads", "loader_threads", "loader_workers", "preload_images",
                "channels_last", "compile", "stop_after", "eval_at_end", "tensorboard")


# What a finished run leaves beside its checkpoints: a folder holding any of these and no
# checkpoint is another run's, never reused (its index would answer for the old model).
RUN_OUTPUTS = ("model.pt", "eval.json", "val.json", "index")


def check_run_folder(out: Path, cfg, resume: bool) -> dict | None:
    """Whether ``out`` may take this run, before anything is read or written; with ``resume``,
    the checkpoint to resume from, after checking that ``cfg`` is the run's config (any
    difference outside :data:`RUNTIME_KEYS` is refused: :func:`config.check_resumable`).

    A fresh run may go into a new folder, an empty one, or one whose run was killed before its
    first checkpoint (its config and log are then rewritten).
    """
    ckpt_path = out / "checkpoints" / "last.pt"
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"{ckpt_path}: nothing to resume")
        check_resumable(out, "train", cfg, RUNTIME_KEYS, "--out")
        return load_checkpoint(ckpt_path)
    if ckpt_path.exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume or choose a new --out")
    check_writable(out, "folder")
    left = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if left:
        raise FileExistsError(f"{out} holds the outputs of an earlier run ({', '.join(left)}) "
                              f"but no checkpoint to resume from; delete it or choose a new "
                              f"--out")
    return None


def refuse_other_run(run: Path, cfg, advice: str) -> None:
    """A clear error when the folder ``run`` holds a run (finished or not) trained with other
    settings than ``cfg``: a cached run is reused only when it is the run asked for."""
    if (run / "config.json").exists():
        diff = config_diff(saved_config(run, "train"), cfg)
        if diff:
            raise FileExistsError(f"{run} was trained with another config (differs in "
                                  f"{', '.join(diff)}); {advice}")


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint, loaded to the CPU (``set_rng_state`` takes CPU tensors only;
    ``load_state_dict`` moves the rest); a damaged or foreign file is an error naming it."""
    ck = load_torch(path, "checkpoint", "delete it to train the run from the start")
    return require_keys(ck, ("model", "optimizer", "scheduler", "step", "torch_rng"), path,
                        "checkpoint")

def check_same_data(out: Path, data_dir: str | Path) -> str:
    """The fingerprint of ``data_dir``, after checking that a run resumed in ``out`` was trained
    on the same data (runs made before fingerprints were recorded are not checked)."""
    fingerprint = data_fingerprint(data_dir)
    recorded = json.loads((out / "config.json").read_text()).get("data_fingerprint")
    if recorded not in (None, fingerprint):
        raise ValueError(f"{out}: --resume on other data than the run's ({data_dir} has "
                         f"fingerprint {fingerprint}, {out / 'config.json'} records "
                         f"{recorded}); resume on the run's data, or start a new --out")
    return fingerprint


def save_checkpoint(path: Path, model, objective, opt, sched, step: int, rank: int, world: int,
                    device: torch.device, loss_scale=None) -> None:
    """Everything a resumed run needs, in one file written atomically by rank 0: the model, the
    objective's state and the RNG states of every rank (each rank's classifier shard, and its
    dropout draws, which differ by rank), optimiser, schedule, fp16 loss scale, step and world
    size."""
    clf_state = objective.state()
    rng = {"cpu": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if world > 1:  # every rank's shard and RNG go into the one file
        mine = {"rng": rng, "classifier": None if clf_state is None else
                {k: v.cpu() for k, v in clf_state.items()}}
        ranks = [None] * world
        torch.distributed.all_gather_object(ranks, mine)
        rng = [r["rng"] for r in ranks]
        clf_state = None if clf_state is None else [r["classifier"] for r in ranks]
    if rank == 0:
        save_torch({"model": model.state_dict(), "classifier": clf_state,
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "torch_rng": rng if world > 1 else rng["cpu"], "step": step,
                    "cuda_rng": None if world > 1 else rng["cuda"], "world": world,
                    "loss_scale": None if loss_scale is None else loss_scale.state_dict()}, path)


def restore_checkpoint(ck: dict, path: Path, model, objective, opt, sched, rank: int, world: int,
                       device: torch.device, loss_scale=None) -> int:
    """Load a checkpoint of :func:`save_checkpoint` into a fresh run; returns its step.

    The run may have another number of processes than the one that wrote it: each rank takes
    its rows of the class centres from the saved shards (:meth:`MarginClassifier.load_shards`)
    and the random state of the saved rank ``rank % saved``.  It then continues with the same
    weights and centres, though not with the draws an unchanged run would make (dropout and
    sampled centres are drawn per rank)."""
    made_by = ck.get("world", len(ck["classifier"]) if isinstance(ck.get("classifier"), list)
                     else 1)
    model.load_state_dict(ck["model"])
    if ck.get("classifier") is not None:
        try:
            objective.load(ck["classifier"] if made_by > 1 else [ck["classifier"]])
        except ValueError as e:
            raise ValueError(f"{path}: its class centres do not fit this run: {e}") from None
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    if loss_scale is not None and ck.get("loss_scale") is not None:
        loss_scale.load_state_dict(ck["loss_scale"])
    rng = ck["torch_rng"]
    if isinstance(rng, list):  # one per rank
        cpu, cuda = rng[rank % made_by]["cpu"], rng[rank % made_by]["cuda"]
    else:
        cpu, cuda = rng, ck.get("cuda_rng")
    torch.set_rng_state(cpu)
    if device.type == "cuda" and cuda is not None:  # dropout on the GPU
        torch.cuda.set_rng_state(cuda, device)
    return ck["step"]


def save_torch(obj, path: str | Path) -> None:
    """``torch.save`` to a temporary file, then renamed into place (:func:`files.atomic_path`).

    A failed write (a full disk, a size limit) reaches torch's zip writer as a bare "enforce
    fail at inline_container.cc"; it is raised as an ``OSError`` naming the file and the
    space left, so the user learns what to free.
    """
    import errno
    import shutil

    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            if "inline_container" not in str(e) and "write" not in str(e):
                raise
            free = shutil.disk_usage(Path(path).parent).free
            raise OSError(errno.ENOSPC if free < 2**20 else errno.EIO,
                          f"writing failed ({free / 2**20:.1f} MiB free on its disk: full, or "
                          f"a file-size limit)", str(path)) from None


def load_torch(path: str | Path, what: str, advice: str, device="cpu") -> dict:
    """The dict of plain data and tensors in ``path``, or a ``ValueError`` naming the file.

    ``what`` names the file's kind in messages ("model file", "checkpoint"), ``advice`` says
    what to do about a damaged one.  A file whose pickle names any callable (code, classes
    other than tensors) is refused, never run.
    """
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ValueError(f"{path}: refused: this {what} holds Python objects other than "
                             f"tensors and plain data, which loading would run; mixer-lite "
                             f"never writes such files (was it made elsewhere?)") from None
        raise ValueError(f"{path}: damaged {what}, it cannot be read ({e}); {advice}") from None
    except Exception as e:  # a cut file fails in zip, pickle or storage code, each its own way
        raise ValueError(f"{path}: damaged {what}, it cannot be read ({type(e).__name__}: "
                         f"{e}); {advice}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a mixer-lite {what} (holds a {type(obj).__name__}, "
                         f"not a dict)")
    return obj


def require_keys(obj: dict, keys: tuple[str, ...], path: str | Path, what: str) -> dict:
    """``obj`` when it has every key of ``keys``; else an error naming the file and the keys."""
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{path}: not a mixer-lite {what} (lacks {', '.join(missing)})")
    return obj


KEEP_FREED_MEMORY_ENV = "MIXER_LITE_KEEP_FREED_MEMORY"  # "0": glibc's own malloc settings


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep the memory a training step frees for the next step, instead of
    handing every large block back to the kernel and faulting it in again, page by page.

    A CPU step allocates activations of tens to hundreds of MiB; above glibc's mmap threshold
    (32 MiB at most) each is a fresh mapping, so every step page-faults its whole working set
    (1.9 million faults in 8 steps of ``tiny-cpu``, a fifth of the step time spent in the
    kernel).  With mmap off and trimming raised, freed blocks stay in the heap: the same steps
    ran 1.28x faster for 17% more peak memory (``bench/allocator.py``;
    ``docs/EXPERIMENTS.md``, "Where a CPU step's time goes").  Nothing a step computes changes.
    Embedding in batches without gradients gains as much (1.57-1.75x at batch 256,
    ``bench/embed_speed.py``), so the ``evaluate`` and ``index`` commands call it as ``train``
    does.  Process-wide and idempotent; a no-op off glibc or with
    ``MIXER_LITE_KEEP_FREED_MEMORY=0``.
    Returns whether the settings were applied."""
    if os.environ.get(KEEP_FREED_MEMORY_ENV, "1") == "0" or platform.system() != "Linux" \
            or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


@contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch CPU threads (0: leave them as they are), then restore the
    process's count: a library call must not change its caller's threads."""
    if n < 0:
        raise ValueError(f"threads must be >= 0 (0: torch's default), got {n}")
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_run_model(run: str | Path, device="cpu"):
    """The trained model a run folder holds (``RUN/model.pt``), in eval mode."""
    from .model import MixerModel

    path = Path(run) / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no trained model in this run (did training finish?)")
    ck = require_keys(load_torch(path, "model file", "`mixer-lite train --resume` rewrites it "
                                 "from the run's last checkpoint", device),
                      ("export", "state_dict"), path, "model file")
    try:
        model = MixerModel.from_export(ck["export"])
    except (KeyError, TypeError, ValueError) as e:  # a config of missing or mistyped fields
        raise ValueError(f"{path}: its model config cannot be built ({type(e).__name__}: {e})") \
            from None
    state = ck["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the model its config describes (saved by "
                         f"another mixer-lite version?): {str(e).splitlines()[-1].strip()}") \
            from None
    return model.to(device).eval()


def eval_name(run: str | Path, data, index_kind: str = "flat") -> str:
    """The file stem an evaluation of ``run`` on ``data`` is written under.

    ``eval`` for the run's own dataset (what training writes at its end), ``eval-<folder>-<hash>``
    for any other data, so scoring a run elsewhere never overwrites its own result; an index
    other than ``flat`` adds its kind.
    """
    name = "eval"
    try:
        saved = json.loads((Path(run) / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        saved = None
    fingerprint = data_fingerprint(data.root)
    # By content where the run recorded it (runs made before that recorded the path only).
    own = isinstance(saved, dict) and (
        saved.get("data_fingerprint") == fingerprint if "data_fingerprint" in saved
        else isinstance(saved.get("data"), str)
        and Path(saved["data"]) == Path(data.root).resolve())
    if not own:
        name += f"-{Path(data.root).resolve().name}-{fingerprint[:8]}"
    return name if index_kind == "flat" else f"{name}-{index_kind}"


def environment() -> dict:
    """What a measurement was made with.

    A from-scratch run's numbers move with library versions, the thread count *and the CPU*:
    oneDNN picks its convolution kernels by the instruction set (AVX2, AVX-512, AMX), and their
    different summation orders change the last bits of every gradient, which a few hundred
    steps grow into a query or two of recall.  So the CPU's name and the kernels torch
    dispatched to are recorded too.
    """
    import faiss
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "faiss": faiss.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cpu": cpu_name(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux, else what the platform says)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
