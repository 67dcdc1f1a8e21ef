"""What a run needs per process: measured side by side, the activation formula fitted, and the table.

    python tests/benchmark_memory.py                  # measure: CPU processes, GPT-2 124M's shape
    python tests/benchmark_memory.py --device cuda    # the same on GPUs (DDP and FSDP over 2 need two)
    python tests/benchmark_memory.py --device cuda --cap_gb 24 --n_layer 48 --n_head 25 --n_embd 1600 \\
        --B 4 --T 1024 --vocab_size 50304 --modes offload   # a 24 GB card's run, on a bigger GPU
    python tests/benchmark_memory.py --fit            # the activation formula from the measured peaks
    python tests/benchmark_memory.py --table          # docs/memory.md's table, computed, no run

Measure: the same short training run (GPT-2-shaped, B=1, T=128 by default, 4 steps) in each mode (one
process, DDP over 2, FSDP over 2, --cpu_offload in one process and under FSDP over 2), each without
and with full activation checkpointing (--checkpointing: any of none,full,selective,every_other), one
after another. For each: every process's peak memory above what
it held before training (CPU: resident memory, VmHWM; CUDA: torch.cuda.max_memory_allocated), what the
run's own start line estimated, and the median step time from its log. --cap_gb holds each process to
that many GB of its GPU (torch.cuda.set_per_process_memory_fraction): a run that does not fit ends in
the out-of-memory line, which is printed. Figures, not a test: a machine running other work changes
the times, not the memory.
"""

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
RUNNER = os.path.join(REPO, "tests", "run_measuring_memory.py")

# name: (n_layer, n_head, n_embd, micro-batch B of its recipe)
SIZES = {"124M": (12, 12, 768, 64), "350M": (24, 16, 1024, 32), "774M": (36, 20, 1280, 16), "1.5B": (48, 25, 1600, 16)}
V, T = 50304, 1024  # the recipes' padded vocabulary and sequence length

# The peaks the formula in machinery/memory.py is fitted to: NVIDIA H200, torch 2.11, bf16 autocast,
# fused attention, T=1024, V=50,304, torch.cuda.max_memory_allocated of the whole run, in GB.
# (name, B, activation checkpointing, peak GB, how it ran)
MEASURED = [
    ("124M", 16, "none", 9.0, "tests/benchmark.py in-process step, compiled (docs/performance.md)"),
    ("124M", 64, "none", 43.8, "train_gpt2.py --compile, the reproduction's shape"),
    ("124M", 64, "full", 24.0, "train_gpt2.py --compile --activation_checkpointing"),
    ("1.5B", 16, "none", 76.1, "train_gpt2.py, eager"),
    ("1.5B", 16, "full", 35.2, "train_gpt2.py --activation_checkpointing, eager"),
]


def model_and_estimate(name, B, checkpointing):
    """(the model state in bytes, machinery.memory's estimate of the activations) for a size at B."""
    import torch

    from machinery.memory import STATE_BYTES, activation_bytes
    from train_gpt2 import GPT, GPTConfig

    n_layer, n_head, n_embd, _ = SIZES[name]
    config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=V)
    with torch.device("meta"):
        n = sum(p.numel() for p in GPT(config).parameters())
    return STATE_BYTES * n, activation_bytes(config, B, T, checkpointing), config


def fit():
    """Least squares (relative) of the activations (peak - state) on: without checkpointing, a C L +
    b V bytes a token; with it, 4 C L + a C + b V. Prints the coefficients and each point's error."""
    rows, targets, known, peaks = [], [], [], []
    for name, B, checkpointing, peak_gb, _ in MEASURED:
        state, _, config = model_and_estimate(name, B, checkpointing)
        C, L, tokens = config.n_embd, config.n_layer, B * T
        full = checkpointing == "full"
        rows.append([(C if full else C * L) * tokens, V * tokens])
        fixed = state + (4 * C * L * tokens if full else 0)
        targets.append(peak_gb * 1e9 - fixed)
        known.append(fixed)
        peaks.append(peak_gb * 1e9)
    rows, targets, known, peaks = map(np.array, (rows, targets, known, peaks))
    (a, b), *_ = np.linalg.lstsq(rows / peaks[:, None], targets / peaks, rcond=None)
    print(f"fitted: {a:.2f} bytes a channel a layer a token, {b:.2f} a logit "
          f"(machinery/memory.py rounds them: ACT_PER_CHANNEL_LAYER, ACT_PER_LOGIT)")
    print(f"{'size':<6}{'B':>4}  {'checkpointing':<14}{'measured GB':>12}{'estimate GB':>13}{'error':>8}  how")
    for (name, B, checkpointing, peak_gb, how) in MEASURED:
        state, act, _ = model_and_estimate(name, B, checkpointing)
        estimate = (state + act) / 1e9
        print(f"{name:<6}{B:>4}  {checkpointing:<14}{peak_gb:>12.1f}{estimate:>13.1f}"
              f"{100 * (estimate - peak_gb) / peak_gb:>+7.1f}%  {how}")


def table():
    """Per GPU, each size at its recipe's B: state and estimated activations, in GiB as GPUs count; under
    DDP its gradient buckets too (a second copy of the gradients)."""
    gib = 2**30
    print("| size | parameters | model state, DDP | state, FSDP over 8 | activations at B (estimate) | DDP in all | "
          "FSDP 8 in all | FSDP 8 + activation checkpointing | one GPU, --cpu_offload + checkpointing, B=4 |")
    print("|---|---|---|---|---|---|---|---|---|")
    from machinery.memory import GRAD_BYTES, STATE_BYTES, gathered_bytes

    for name, (_, _, _, B) in SIZES.items():
        state, act, config = model_and_estimate(name, B, "none")
        _, act_ckpt, _ = model_and_estimate(name, B, "full")
        _, act_ckpt4, _ = model_and_estimate(name, 4, "full")
        n = state // STATE_BYTES
        state8 = STATE_BYTES * math.ceil(n / 8)
        units = gathered_bytes(config)
        print(f"| {name} | {n / 1e6:,.0f}M | {state / gib:.1f} GiB | {state8 / gib:.2f} GiB | "
              f"{act / gib:.1f} GiB at B={B} | {(state + GRAD_BYTES * n + act) / gib:.1f} GiB | "
              f"{(state8 + units + act) / gib:.1f} GiB | "
              f"{(state8 + units + act_ckpt) / gib:.1f} GiB | {(units + act_ckpt4) / gib:.1f} GiB |")


MODES = {  # name: (processes, flags)
    "one": (1, []), "ddp": (2, []), "fsdp": (2, ["--fsdp"]),
    "offload": (1, ["--cpu_offload"]), "fsdp_offload": (2, ["--fsdp", "--cpu_offload"]),
}
LABELS = {"one": "one process", "ddp": "DDP over 2", "fsdp": "FSDP over 2", "offload": "offload, one process",
          "fsdp_offload": "FSDP 2 + offload"}


def measure(args):
    shape = ["--n_layer", str(args.n_layer), "--n_head", str(args.n_head), "--n_embd", str(args.n_embd),
             "--B", str(args.B), "--T", str(args.T), "--block_size", str(max(args.T, 64)), "--device", args.device,
             "--vocab_size", str(args.vocab_size), "--max_steps", str(args.steps), "--eval_iters", "1",
             "--eval_interval", "1000", "--num_samples", "0", "--input_file", os.path.join(REPO, "input.txt")]
    modes = args.modes.split(",")
    if args.device.startswith("cuda") and gpu_count() < 2:  # torchrun's two processes need a GPU each
        modes = [m for m in modes if MODES[m][0] == 1]
        print("one GPU: the one-process modes only")
    env = {**os.environ, **({"MEMORY_CAP_GB": str(args.cap_gb)} if args.cap_gb else {})}
    print(f"GPT-2 shape {args.n_layer} layers x {args.n_embd} channels, B={args.B} T={args.T}, {args.device}"
          + (f", each process held to {args.cap_gb} GB" if args.cap_gb else ""))
    tag = "peak_cuda_mb" if args.device.startswith("cuda") else "peak_mb"
    print(f"{'mode':<30} {'peak MiB per process':>22} {'estimated':>11} {'ms/step':>9}")
    for mode in modes:
        processes, flags = MODES[mode]
        runner = [sys.executable, RUNNER] if processes == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", RUNNER]
        for checkpointing in args.checkpointing.split(","):
            recompute = ["--activation_checkpointing", checkpointing]
            label = LABELS[mode] + ("" if checkpointing == "none" else f" + ckpt {checkpointing}")
            with tempfile.TemporaryDirectory() as out:
                r = subprocess.run([*runner, *shape, *flags, *recompute, "--out_dir", out], capture_output=True,
                                   text=True, cwd=REPO, env=env)
                if r.returncode:
                    print(f"{label:<30} failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:160]}", flush=True)
                    continue
                peaks = [float(line.split()[2]) for line in r.stdout.splitlines() if line.startswith(tag + " ")]
                estimate = re.search(r"= about ([\d.]+ \w+)", r.stdout)
                with open(os.path.join(out, "log.jsonl")) as f:
                    ms = [rec["ms"] for rec in map(json.loads, f) if "ms" in rec][1:]  # step 0 warms up
                print(f"{label:<30} {' / '.join(f'{p:,.0f}' for p in peaks):>22} "
                      f"{estimate.group(1) if estimate else '-':>11} {statistics.median(ms):9.1f}", flush=True)


def gpu_count():
    import torch

    return torch.cuda.device_count()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--table", action="store_true", help="print the computed table and exit")
    parser.add_argument("--fit", action="store_true", help="fit the activation formula to MEASURED and exit")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default="one,ddp,fsdp,offload,fsdp_offload", help=", ".join(MODES))
    parser.add_argument("--checkpointing", default="none,full",
                        help="each mode with each of these --activation_checkpointing settings "
                             "(none,full,selective,every_other)")
    parser.add_argument("--cap_gb", type=float, default=0, help="hold each process to this many GB of its GPU")
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_head", type=int, default=12)
    parser.add_argument("--n_embd", type=int, default=768)
    parser.add_argument("--vocab_size", type=int, default=50257)
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--T", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="steps a run trains: 2 or more (the first warms up)")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: the median step time leaves out the first step, so at least 2")
    if args.table:
        table()
    elif args.fit:
        fit()
    else:
        measure(args)


if __name__ == "__main__":
    main()
