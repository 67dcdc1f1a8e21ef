"""Runs train_gpt2.main(ARGS) as `python train_gpt2.py ARGS` would, then prints this process's peak
memory above what it held before training began (after its imports), in MiB: `peak_mb RANK MiB`, and on
CUDA the GPU's peak as torch's allocator counts it: `peak_cuda_mb RANK MiB`. The tests start it in place
of train_gpt2.py, with python or torchrun (and --device cpu), to compare the memory runs need.

MEMORY_CAP_GB=24 in the environment holds each process to 24 GB of its GPU (torch's allocator refuses
more: torch.cuda.set_per_process_memory_fraction), to measure a smaller card on a bigger one."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt2  # noqa: E402

torch = train_gpt2.torch


def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def cap_gpu_memory(cap_gb):
    """Every CUDA device this process may use, held to cap_gb (decimal GB, as cards are sold) of its memory."""
    for index in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 1e9 / total), index)


if __name__ == "__main__":
    if os.environ.get("MEMORY_CAP_GB") and torch.cuda.is_available():
        cap_gpu_memory(float(os.environ["MEMORY_CAP_GB"]))
    baseline = status_kb("VmRSS")
    code = train_gpt2.main(sys.argv[1:])
    rank = os.environ.get("RANK", 0)
    print(f"peak_mb {rank} {(status_kb('VmHWM') - baseline) / 1024:.1f}", flush=True)
    if torch.cuda.is_initialized():  # the GPU's own peak, from torch's allocator
        print(f"peak_cuda_mb {rank} {torch.cuda.max_memory_allocated() / 2**20:.1f}", flush=True)
    sys.exit(code)
