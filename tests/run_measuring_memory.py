"""Runs train_gpt2.main(ARGS) as `python train_gpt2.py ARGS` would, then prints this process's peak
memory above what it held before training began (after its imports): `peak_mb RANK MB`, and on CUDA the
GPU's peak as torch's allocator counts it: `peak_cuda_mb RANK MB`. The tests start
it in place of train_gpt2.py, with python or torchrun (and --device cpu), to compare the memory runs need."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt2  # noqa: E402


def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


if __name__ == "__main__":
    baseline = status_kb("VmRSS")
    code = train_gpt2.main(sys.argv[1:])
    rank = os.environ.get("RANK", 0)
    print(f"peak_mb {rank} {(status_kb('VmHWM') - baseline) / 1024:.1f}", flush=True)
    if train_gpt2.torch.cuda.is_initialized():  # the GPU's own peak, from torch's allocator
        print(f"peak_cuda_mb {rank} {train_gpt2.torch.cuda.max_memory_allocated() / 2**20:.1f}", flush=True)
    sys.exit(code)
