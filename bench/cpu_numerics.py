"""Does this CPU's instruction set change a training step's numbers?  Side by side, one run.

``python bench/cpu_numerics.py``

One forward and backward pass of a small conv net (the kind of layers the ``tiny-cpu`` encoder
has) on a fixed seed, repeated in fresh processes with the kernels torch and oneDNN may use
capped at lower instruction sets (``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``).  Each line
prints the loss and a hash of every gradient.  Equal hashes: bit-identical steps.  Different
hashes on the same machine mean the numbers of a from-scratch run depend on which kernels the
CPU offers, so committed notebook outputs (checked exactly by nbval) and reproduction records
are exact only on a CPU of the same kind; see the README, "The two commands".
"""
import os
import subprocess
import sys

STEP = """
import hashlib, torch
torch.manual_seed(0); torch.set_num_threads(2)
net = torch.nn.Sequential(
    torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.GELU(),
    torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.Flatten(),
    torch.nn.Linear(64 * 32 * 32, 128))
emb = torch.nn.functional.normalize(net(torch.randn(64, 3, 64, 64)), dim=-1)
loss = (emb @ emb.T / 0.05).logsumexp(-1).mean()
loss.backward()
grads = torch.cat([p.grad.flatten() for p in net.parameters()]).numpy().tobytes()
print(torch.backends.cpu.get_cpu_capability(), loss.item().hex(),
      hashlib.sha256(grads).hexdigest()[:16])
"""

SETTINGS = {
    "default (best kernels this CPU has)": {},
    "oneDNN capped at AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "ATen capped at AVX2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "both capped at AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}


def main() -> None:
    print(f"{'setting':<38}{'ATen kernels':<14}{'loss (hex)':<24}gradient hash")
    hashes = {}
    for name, env in SETTINGS.items():
        out = subprocess.run([sys.executable, "-c", STEP], env={**os.environ, **env},
                             capture_output=True, text=True, check=True).stdout.split()
        hashes[name] = out[2]
        print(f"{name:<38}{out[0]:<14}{out[1]:<24}{out[2]}")
    same = hashes["oneDNN capped at AVX2"] == hashes["default (best kernels this CPU has)"]
    print("capping oneDNN's instruction set", "leaves the step bit-identical" if same else
          "changes the step's bits: numbers depend on the CPU's instruction set")


if __name__ == "__main__":
    main()
