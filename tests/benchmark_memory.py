"""What a run needs per process: measured side by side, and computed for every GPT-2 size.

    python tests/benchmark_memory.py                 # measure: CPU processes, GPT-2 124M's shape
    python tests/benchmark_memory.py --device cuda   # the same on GPUs (DDP and FSDP over 2 need two)
    python tests/benchmark_memory.py --table         # compute docs/memory.md's table, no run

Measure: the same short training run (GPT-2-shaped, B=1, T=128 by default, 4 steps) as one process,
DDP over 2 and FSDP over 2, each with and without --activation_checkpointing, one after another. For
each: every process's peak memory above what it held before training (CPU: resident memory, VmHWM;
CUDA: torch.cuda.max_memory_allocated) and the median step time from its log. Figures, not a test:
a machine running other work changes the times, not the memory.

Table: model state (float32 weights and gradients, AdamW's two moments: 16 bytes a parameter, exact
from the counts) and an estimate of activations at the recipes' batch shapes, per GPU.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, "tests", "run_measuring_memory.py")

# name: (n_layer, n_head, n_embd, micro-batch B of its recipe)
SIZES = {"124M": (12, 12, 768, 64), "350M": (24, 16, 1024, 32), "774M": (36, 20, 1280, 16), "1.5B": (48, 25, 1600, 16)}
V, T = 50304, 1024  # the recipes' padded vocabulary and sequence length


def n_params(n_layer, n_embd):
    """GPT-2's parameters, the tied token table once: embeddings, 12 C^2 + 13 C per block, ln_f."""
    return V * n_embd + T * n_embd + n_layer * (12 * n_embd**2 + 13 * n_embd) + 2 * n_embd


def activation_bytes(n_layer, n_embd, B, recompute):
    """An estimate of what backward keeps, bf16 autocast with fused (flash) attention: about 34 C bytes a
    token in each block (Korthikanti et al., 2022, without the attention matrix flash never builds),
    plus the bf16 logits (2 V); with recomputation, each block's float32 input (4 C) and one block's
    activations at a time. At 124M, B=16 it gives 6.8 GB; the H200 measured 9.0 GB in all with 2.0 GB of
    state, so 7.0 GB (docs/performance.md)."""
    per_token = (4 * n_embd * n_layer + 34 * n_embd) if recompute else 34 * n_embd * n_layer
    return B * T * (per_token + 2 * V)


def table():
    gb = 1e9
    print("| size | parameters | model state, DDP | state, FSDP over 8 | activations at B | DDP in all | "
          "FSDP 8 in all | FSDP 8 + activation checkpointing |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (L, nh, C, B) in SIZES.items():
        n = n_params(L, C)
        state, state8 = 16 * n, 16 * math.ceil(n / 8)
        act, act_ckpt = activation_bytes(L, C, B, False), activation_bytes(L, C, B, True)
        print(f"| {name} | {n / 1e6:,.0f}M | {state / gb:.1f} GB | {state8 / gb:.2f} GB | {act / gb:.1f} GB at B={B} | "
              f"{(state + act) / gb:.1f} GB | {(state8 + act) / gb:.1f} GB | {(state8 + act_ckpt) / gb:.1f} GB |")


def measure(args):
    shape = ["--n_layer", str(args.n_layer), "--n_head", str(args.n_head), "--n_embd", str(args.n_embd),
             "--B", str(args.B), "--T", str(args.T), "--block_size", str(max(args.T, 64)), "--device", args.device,
             "--max_steps", str(args.steps), "--eval_iters", "1", "--eval_interval", "1000", "--num_samples", "0",
             "--input_file", os.path.join(REPO, "input.txt")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", RUNNER]
    modes = [("one process", [sys.executable, RUNNER], []), ("DDP over 2", torchrun, []),
             ("FSDP over 2", torchrun, ["--fsdp"])]
    if args.device.startswith("cuda") and gpu_count() < 2:  # torchrun's two processes need a GPU each
        print("one GPU: the one-process modes only")
        modes = modes[:1]
    print(f"GPT-2 shape {args.n_layer} layers x {args.n_embd} channels, B={args.B} T={args.T}, {args.device}")
    print(f"{'mode':<24} {'peak MB per process':>24} {'ms/step':>9}")
    for name, runner, extra in modes:
        for recompute in ([], ["--activation_checkpointing"]):
            with tempfile.TemporaryDirectory() as out:
                r = subprocess.run([*runner, *shape, *extra, *recompute, "--out_dir", out], capture_output=True,
                                   text=True, cwd=REPO)
                label = name + (" + act. ckpt" if recompute else "")
                if r.returncode:
                    print(f"{label:<24} failed: {r.stderr.strip().splitlines()[-1:]}")
                    continue
                tag = "peak_cuda_mb" if args.device.startswith("cuda") else "peak_mb"
                peaks = [float(line.split()[2]) for line in r.stdout.splitlines() if line.startswith(tag + " ")]
                with open(os.path.join(out, "log.jsonl")) as f:
                    ms = [rec["ms"] for rec in map(json.loads, f) if "ms" in rec][1:]  # step 0 warms up
                print(f"{label:<24} {' / '.join(f'{p:,.0f}' for p in peaks):>24} {statistics.median(ms):9.1f}",
                      flush=True)


def gpu_count():
    import torch

    return torch.cuda.device_count()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the computed table and exit")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--T", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    table() if args.table else measure(args)


if __name__ == "__main__":
    main()
