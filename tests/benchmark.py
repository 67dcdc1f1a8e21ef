"""
Side-by-side speed benchmark: train_gpt2's GPT-2 (124M) training step against transformers' GPT2LMHeadModel.

    python tests/benchmark.py              # CPU: B=4 T=32 and B=8 T=256; CUDA: B=16 and B=64, T=1024 (compiled)
    python tests/benchmark.py --quick      # fewer steps, one shape
    python tests/benchmark.py --levers     # also ours with each alternative we considered, side by side (last)
    python tests/benchmark.py --checkpointing  # only: each --activation_checkpointing setting's memory and step

Not a test (pytest does not collect it): timings on a shared machine are noisy, so instead of asserting
they are printed, side by side, from one process. Two measurements:

1. In-process steps. Both models start from the same shapes; after warm-up, their full training steps
   (zero_grad, forward with loss, backward, clip if ours clips, optimizer step) alternate one by one, so
   a slow moment of the machine hits both. Ours runs exactly as the script does by default on this device
   (its optimizer, precision policy and clipping); the baseline is what a user would otherwise write:
   GPT2LMHeadModel(GPT2Config(...)) with dropout off (ours has none), its default attention,
   torch.optim.AdamW(lr=3e-4) and the same autocast dtype.
2. Whole programs. `python train_gpt2.py --max_steps N` at two values of N, and a transformers script
   doing the same job the same way (same data, batches, autocast, optimizer step, per-step print);
   the difference of the two run times over the difference in N is the per-step cost with everything a
   loop does, start-up excluded. Peak memory is the process's maximum RSS (CPU) or max allocated (CUDA).
   "printed ms" is the median of the step times the program printed itself: a cross-check, since a
   single pair of runs is noisy. On CUDA each program runs once (compiling is most of a short run) and
   its printed step times are the figure.

On CUDA both models are compiled, the vocabulary is padded to 50304 as in the reproduction, and each
contestant times 20 steps after 3 warm-up steps (the first compiled steps still recompile and autotune).
"% peak" is model FLOPs per second over the bf16 (or float32) matmul peak measured in the same run;
"MFU" is the same over the GPU's dense bf16 peak from its datasheet (machinery.speed.BF16_PEAK_TFLOPS), the
figure train_gpt2.py's step line shows, with the same FLOP count; "-" where the table has no peak (CPUs).
"""

import argparse
import contextlib
import functools
import gc
import io
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import machinery.files  # noqa: E402
import machinery.hardware  # noqa: E402
import machinery.speed  # noqa: E402
from machinery.hardware import resolve_dtype, synchronize  # noqa: E402
from train_gpt2 import GPT, GPTConfig, DataLoaderLite, resolve_device  # noqa: E402

# -----------------------------------------------------------------------------
# contestants: each exposes one training step, split into forward+backward and optimizer time


class Contestant:
    """One model with its optimizer; step() is a full training step, timed in two parts.

    loss_of(model, x, y) computes the loss; it is what gets compiled, so a loss computed outside the
    model is compiled with it. `context` is entered around forward and backward (an attention-backend
    choice, for example)."""

    def __init__(self, name, model, optimizer, loss_of, clip, device_type, dtype, compile,
                 context=contextlib.nullcontext):
        self.name, self.model, self.optimizer, self.clip = name, model, optimizer, clip
        self.loss = functools.partial(loss_of, model)
        if compile:
            self.loss = torch.compile(self.loss)
        self.autocast = torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)
        self.device_type, self.context = device_type, context

    def step(self, x, y):
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with self.context():
            with self.autocast:
                loss = self.loss(x, y)
            loss.backward()
        synchronize(self.device_type)
        t1 = time.perf_counter()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        loss.item()
        synchronize(self.device_type)
        return t1 - t0, time.perf_counter() - t1

    def resident_bytes(self):
        """Parameters, gradients and optimizer state: what stays allocated between steps."""
        tensors = [p for p in self.model.parameters()] + [p.grad for p in self.model.parameters()]
        tensors += [t for state in self.optimizer.state.values() for t in state.values()]
        return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def scripts_adamw(model, device_type):
    """The script's AdamW for `model`, without the lines on its groups that it prints (the tables are the output)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return model.configure_optimizers(0.1, 3e-4, device_type)


def ours(device, device_type, dtype, compile, vocab_size):
    """train_gpt2 as the script runs it on this device: its optimizer, precision policy, clipping, and its loss
    (on CPUs the loss without the logits, as make_model sets it)."""
    model = GPT(GPTConfig(vocab_size=vocab_size)).to(device)
    model.loss_in_chunks = device_type == "cpu"
    optimizer = scripts_adamw(model, device_type)
    return Contestant("train_gpt2", model, optimizer, lambda m, x, y: m(x, y)[1], True,
                      device_type, dtype, compile, context=lambda: machinery.hardware.attention_kernels(device_type))


def lever_flash_attention(device, device_type, dtype, compile, vocab_size):
    """Ours with SDPA held to the flash kernel, PyTorch's first choice (ours prefers cuDNN's on Hopper).
    The choice is made inside the compiled function, so the compiler traces it into this contestant's
    own graph (a choice made outside it would reuse ours: the compiler does not guard on it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    c = ours(device, device_type, dtype, compile, vocab_size)

    def flash_only(m, x, y):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return m(x, y)[1]

    c.name, c.loss = "flash attn", functools.partial(flash_only, c.model)
    if compile:
        c.loss = torch.compile(c.loss)
    return c


def lever_chunked_loss(device, device_type, dtype, compile, vocab_size):
    """Ours with the CPU's loss path on this device: lm_head and the cross-entropy a chunk of rows at a
    time (machinery/loss.py), never all the logits."""
    model = GPT(GPTConfig(vocab_size=vocab_size)).to(device)
    model.loss_in_chunks = True
    optimizer = scripts_adamw(model, device_type)
    return Contestant("chunked loss", model, optimizer, lambda m, x, y: m(x, y)[1], True, device_type, dtype, compile)


def lever_erf_gelu(device, device_type, dtype, compile, vocab_size):
    """Ours with the exact (erf) GELU instead of GPT-2's tanh approximation: the arithmetic of
    nanoGPT's model.py, which differs from ours in nothing else on a GPU (F.cross_entropy, SDPA,
    fused AdamW, clipping)."""
    c = ours(device, device_type, dtype, compile, vocab_size)
    for block in c.model.transformer.h:
        block.mlp.gelu = torch.nn.GELU()
    c.name = "erf gelu"
    return c


def transformers_baseline(device, device_type, dtype, compile, vocab_size):
    """What a user would otherwise write: GPT2LMHeadModel, dropout off (ours has none), plain AdamW."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # it notes an unset loss_type on every model it builds
    config = GPT2Config(vocab_size=vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # GPT-2 124M
    model = GPT2LMHeadModel(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    # transformers shifts the labels itself
    return Contestant("transformers", model, optimizer, lambda m, x, y: m(input_ids=x, labels=x).loss,
                      False, device_type, dtype, compile)


def lever_compile_blocks(device, device_type, dtype, compile, vocab_size):
    """Ours with each Block compiled on its own (torchtitan's way; the blocks are alike, so one graph
    serves them all) and the rest eager: compile time no longer grows with depth."""
    c = ours(device, device_type, dtype, False, vocab_size)
    for block in c.model.transformer.h:
        block.compile()
    c.name = "compile blocks"
    return c


def lever_blocks_and_chunked_loss(device, device_type, dtype, compile, vocab_size):
    """Two levers together: each Block compiled alone, and the loss without the logits (eager, a chunk of
    rows at a time): compile time flat in depth, and no B x T x V logits in memory."""
    c = lever_compile_blocks(device, device_type, dtype, compile, vocab_size)
    c.model.loss_in_chunks = True
    c.name = "blocks+chunked"
    return c


def lever_max_autotune(device, device_type, dtype, compile, vocab_size):
    """Ours compiled with mode="max-autotune-no-cudagraphs": matmul kernels chosen by timing them."""
    c = ours(device, device_type, dtype, False, vocab_size)
    c.name, c.loss = "max-autotune", torch.compile(c.loss, mode="max-autotune-no-cudagraphs")
    return c


def lever_cuda_graphs(device, device_type, dtype, compile, vocab_size):
    """Ours compiled with mode="reduce-overhead": forward and backward replayed as CUDA graphs (the
    shapes never change), without a launch per kernel; the optimizer step stays outside them."""
    c = ours(device, device_type, dtype, False, vocab_size)
    c.name, c.loss = "cuda graphs", torch.compile(c.loss, mode="reduce-overhead")
    return c


# in groups, each timed against ours and transformers' in a table of its own, printed as it ends: the compile modes,
# whose compiling may take minutes (never timed on a GPU), come last, so a time limit cuts them off alone
LEVERS = {"cuda": ((lever_flash_attention, lever_chunked_loss, lever_erf_gelu, lever_compile_blocks,
                    lever_blocks_and_chunked_loss), (lever_max_autotune, lever_cuda_graphs)),
          "cpu": ((lever_erf_gelu,),)}


def matmul_peak(device, device_type, dtype, repeats=10):
    """Achievable matmul GFLOP/s for this dtype, measured now (the best of several).

    A GPU finishes a 2048^3 product in tens of microseconds, about what reading the clock costs:
    there it multiplies 8192^3 matrices, 10 per clock reading."""
    n, per_reading = (8192, 10) if device_type == "cuda" else (2048, 1)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: library initialisation is not the peak
    best = float("inf")
    for _ in range(repeats):
        synchronize(device_type)
        t0 = time.perf_counter()
        for _ in range(per_reading):
            a @ b
        synchronize(device_type)
        best = min(best, (time.perf_counter() - t0) / per_reading)
    return 2 * n**3 / best / 1e9


def model_flops_per_step(B, T, vocab_size):
    """Training FLOPs of one step of B x T tokens of GPT-2 124M, counted as train_gpt2.py counts them for
    its step line (GPT.flops_per_token: 6 N + 12 n_layer n_embd T), so the two report the same figures."""
    with torch.device("meta"):  # the shapes only: nothing allocated, nothing initialised
        model = GPT(GPTConfig(vocab_size=vocab_size))
    return B * T * model.flops_per_token(T)


def in_process(B, T, steps, warmup, makers, vocab_size, device, device_type, dtype, compile):
    loader = DataLoaderLite(B, T, os.path.join(REPO, "input.txt"))
    contestants = []
    for make in makers:
        torch.manual_seed(0)
        contestants.append(make(device, device_type, dtype, compile, vocab_size))
    times = {c.name: [] for c in contestants}
    first_ms = {}  # the first step compiles: its time is the compile time
    peak = {c.name: 0 for c in contestants}
    for i in range(warmup + steps):
        x, y = loader.next_batch()
        x, y = x.to(device), y.to(device)
        for c in list(contestants if i % 2 == 0 else contestants[::-1]):  # alternate who goes first
            if device_type == "cuda":  # this contestant's own peak: the others' memory subtracted
                torch.cuda.reset_peak_memory_stats()
                others = torch.cuda.memory_allocated() - c.resident_bytes()
            try:
                fb, opt = c.step(x, y)
            except Exception as e:  # a lever this build lacks (say, an attention backend): report, drop
                print(f"{c.name} failed, left out: {machinery.files.first_line(e)[:200]}", flush=True)
                contestants.remove(c)
                continue
            first_ms.setdefault(c.name, (fb + opt) * 1e3)
            if device_type == "cuda":
                peak[c.name] = max(peak[c.name], torch.cuda.max_memory_allocated() - others)
            if i >= warmup:
                times[c.name].append((fb, opt))
    result = {}
    for c in contestants:
        fb = statistics.median(t[0] for t in times[c.name])
        opt = statistics.median(t[1] for t in times[c.name])
        total = statistics.median(t[0] + t[1] for t in times[c.name])
        result[c.name] = dict(ms=total * 1e3, fb_ms=fb * 1e3, opt_ms=opt * 1e3, tok_s=B * T / total,
                              gflops=model_flops_per_step(B, T, vocab_size) / total / 1e9,
                              peak_gib=peak[c.name] / 2**30 if device_type == "cuda" else float("nan"),
                              first_s=first_ms[c.name] / 1e3)
    del contestants
    gc.collect()
    if device_type == "cuda":
        torch.cuda.empty_cache()
    return result


# -----------------------------------------------------------------------------
# whole programs, as users run them

HF_SCRIPT = textwrap.dedent("""
    # The same job as train_gpt2.py's loop, written with transformers' GPT-2: same data, batches,
    # autocast dtype, AdamW step and one printed line per step.
    import sys, time, torch
    sys.path.insert(0, {repo!r})
    from transformers import GPT2Config, GPT2LMHeadModel
    from machinery.hardware import resolve_dtype, synchronize
    from train_gpt2 import DataLoaderLite, resolve_device
    B, T, steps = {B}, {T}, {steps}
    device, device_type = resolve_device("auto")
    dtype = resolve_dtype("auto", device_type)
    torch.manual_seed(1337)
    torch.set_float32_matmul_precision("high")
    model = GPT2LMHeadModel(GPT2Config(vocab_size={vocab_size}, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    forward = torch.compile(model) if {compile} else model  # compiled when ours is (CUDA)
    loader = DataLoaderLite(B, T, {input!r})
    for step in range(steps):
        t0 = time.perf_counter()
        x, _ = loader.next_batch()
        x = x.to(device)
        optimizer.zero_grad()
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            loss = forward(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        synchronize(device_type)
        print(f"step {{step}} | loss {{loss.item():.6f}} | {{(time.perf_counter() - t0) * 1000:.1f}} ms", flush=True)
""")

# Runs a program and reports its own peak memory on its last line.
WRAPPER = textwrap.dedent("""
    import os, runpy, sys, torch
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script` does: its siblings import
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code:
            raise
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's, inherited at fork)
        with open("/proc/self/status") as f:
            peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
    print(f"PEAK_BYTES {peak}")
""")


def run_program(args, tmp, skip=1):
    wrapper = os.path.join(tmp, "wrapper.py")
    with open(wrapper, "w") as f:
        f.write(WRAPPER)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, wrapper, *args], capture_output=True, text=True, cwd=tmp)
    elapsed = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"{args} failed:\n{r.stderr[-2000:]}")
    peak = int(r.stdout.strip().splitlines()[-1].split()[1])
    # each program prints its own step times: their median (the first `skip` aside) is a cross-check
    printed = [float(m) for m in re.findall(r"\| ([\d.]+) ms", r.stdout)][skip:]
    return elapsed, peak, statistics.median(printed) if printed else float("nan")


def whole_programs(B, T, n_short, n_long, extra, vocab_size, skip=1):
    """Each program run for n_long steps (and n_short, unless None). Per-step cost: from the two run
    times, and the median of the step times the long run printed after its first `skip` steps."""
    results = {}
    lengths = (n_long,) if n_short is None else (n_short, n_long)
    # out_dir in memory where possible: the checkpoint written at the end is not what we time
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        # the first Python to import torch reads it from disk; don't bill that to whoever runs first
        subprocess.run([sys.executable, "-c", "import torch, transformers, tiktoken"], check=True)
        runs = {}
        for n in lengths:
            hf_script = os.path.join(tmp, f"hf_{n}.py")
            with open(hf_script, "w") as f:
                f.write(HF_SCRIPT.format(repo=REPO, B=B, T=T, steps=n, input=os.path.join(REPO, "input.txt"),
                                        compile="--compile" in extra, vocab_size=vocab_size))
            ours_cmd = [os.path.join(REPO, "train_gpt2.py"), "--B", B, "--T", T, "--max_steps", n,
                        "--input_file", os.path.join(REPO, "input.txt"), "--out_dir", os.path.join(tmp, f"out{n}"),
                        "--num_samples", "0", "--eval_iters", "1", "--vocab_size", vocab_size, *extra]
            # alternate the contestants here too
            runs[("train_gpt2", n)] = run_program([str(a) for a in ours_cmd], tmp, skip)
            shutil.rmtree(os.path.join(tmp, f"out{n}"))  # its 1.5 GB checkpoint: free the memory
            runs[("transformers", n)] = run_program([hf_script], tmp, skip)
        for name in ("train_gpt2", "transformers"):
            printed = runs[(name, n_long)][2] / 1e3
            per_step = printed if n_short is None else \
                (runs[(name, n_long)][0] - runs[(name, n_short)][0]) / (n_long - n_short)
            results[name] = dict(ms=per_step * 1e3, tok_s=B * T / per_step, printed_ms=printed * 1e3,
                                 peak_mb=max(runs[(name, n)][1] for n in lengths) / 2**20)
    return results


# -----------------------------------------------------------------------------
# compile time and the loss's memory, each case in a process of its own (a cold compiler, a clean peak)

COMPILE_PROBE = textwrap.dedent("""
    # First training step (compile included) and a steady one, of a GPT-2 shape compiled one way.
    import sys, time, torch
    sys.path.insert(0, {repo!r})
    from machinery.hardware import attention_kernels, resolve_dtype, synchronize
    from train_gpt2 import GPT, GPTConfig, Block, resolve_device
    how, n_layer, n_head, n_embd, B, T = {how!r}, {n_layer}, {n_head}, {n_embd}, {B}, {T}
    device, device_type = resolve_device("auto")
    dtype = resolve_dtype("auto", device_type)
    attention_kernels(device_type).__enter__()  # the attention kernel train_gpt2.py's run uses (cuDNN's on Hopper)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=50304)).to(device)
    if how == "nested":  # one region the compiler traces once and stamps out for every Block
        Block.forward = torch.compiler.nested_compile_region(Block.forward)
    if how == "blocks":  # each Block compiled alone (alike, so one graph for all); the rest eager
        for block in model.transformer.h:
            block.compile()
    forward = torch.compile(model) if how in ("whole", "nested") else model
    x = torch.randint(0, 50257, (B, T), device=device)
    times = []
    for step in range(4):
        t0 = time.perf_counter()
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = forward(x, x)
        loss.backward()
        synchronize(device_type)
        times.append(time.perf_counter() - t0)
    print(f"RESULT {{times[0]:.1f}} {{1000 * min(times[1:]):.1f}}")
""")

LOSS_PROBE = textwrap.dedent("""
    # One forward and backward of lm_head and the loss over B*T rows, one way; the peak memory it took.
    import sys, time, torch
    sys.path[:0] = [{repo!r}, {repo!r} + "/tests"]
    import torch.nn.functional as F
    from machinery.loss import linear_cross_entropy
    from run_measuring_memory import status_kb  # this process's memory, from /proc/self/status
    from machinery.hardware import resolve_dtype, synchronize
    from train_gpt2 import resolve_device
    how, rows, C, V = {how!r}, {rows}, 768, 50304
    device, device_type = resolve_device("auto")
    dtype = resolve_dtype("auto", device_type)
    x = torch.randn(rows, C, device=device, requires_grad=True)  # ln_f's output
    w = (0.02 * torch.randn(V, C, device=device)).requires_grad_()  # the tied token table
    y = torch.randint(0, 50257, (rows,), device=device)

    def plain(x, w, y):
        return F.cross_entropy(F.linear(x, w), y)

    loss_of = {{"logits": plain, "logits, compiled": torch.compile(plain), "chunked": linear_cross_entropy}}[how]
    synchronize(device_type)
    base = torch.cuda.memory_allocated() if device_type == "cuda" else status_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
        loss = loss_of(x, w, y)
    loss.backward()
    synchronize(device_type)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device_type == "cuda" else status_kb("VmHWM") * 1024
    print(f"RESULT {{(peak - base) / 2**30:.2f}} {{seconds:.2f}}")
""")

CHECKPOINTING_PROBE = textwrap.dedent("""
    # Training steps of a GPT-2 shape under one --activation_checkpointing setting, as train_gpt2.py runs
    # them (compiled on GPUs, the chunked loss on CPUs): first step, steady step, peak memory.
    import statistics, sys, time, torch
    sys.path[:0] = [{repo!r}, {repo!r} + "/tests"]
    from machinery.speed import bf16_peak_tflops
    from run_measuring_memory import status_kb  # this process's memory, from /proc/self/status
    from machinery.hardware import attention_kernels, resolve_dtype, synchronize
    from train_gpt2 import GPT, GPTConfig, resolve_device
    mode, n_layer, n_head, n_embd, B, T, steps = {mode!r}, {n_layer}, {n_head}, {n_embd}, {B}, {T}, {steps}
    device, device_type = resolve_device("auto")
    dtype = resolve_dtype("auto", device_type)
    attention_kernels(device_type).__enter__()  # the attention kernel train_gpt2.py's run uses (cuDNN's on Hopper)
    torch.set_float32_matmul_precision("high")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=50304)).to(device)
    model.activation_checkpointing, model.loss_in_chunks = mode, device_type == "cpu"
    optimizer = model.configure_optimizers(0.1, 3e-4, device_type)  # (its lines on stdout: probe reads RESULT only)
    step = torch.compile(model) if device_type == "cuda" else model
    x, y = (torch.randint(0, 50257, (B, T), device=device) for _ in range(2))
    synchronize(device_type)
    base = torch.cuda.memory_allocated() if device_type == "cuda" else status_kb("VmRSS") * 1024  # the weights
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            loss = step(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device_type)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device_type == "cuda" else status_kb("VmHWM") * 1024
    state = 12 * sum(p.numel() for p in model.parameters())  # gradients and AdamW's moments
    steady = statistics.median(times[1 + steps // 4:])
    peak_tflops = bf16_peak_tflops(device_type)
    mfu = 100 * model.flops_per_token(T) * B * T / steady / 1e12 / peak_tflops if peak_tflops else float("nan")
    print(f"RESULT {{(peak - base - state) / 2**30:.2f}} {{times[0]:.1f}} {{1000 * steady:.1f}} {{B * T / steady:.0f}} "
          f"{{mfu:.1f}}")
""")


def probe(script, **values):
    """Run a probe in a fresh process with a fresh compiler cache: its RESULT numbers, or the error."""
    with tempfile.TemporaryDirectory() as cache:
        r = subprocess.run([sys.executable, "-c", script.format(repo=REPO, **values)], capture_output=True, text=True,
                           env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
    result = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode or not result:
        return machinery.files.first_line((r.stderr.strip().splitlines() or ["failed"])[-1])[:100]
    return [float(v) for v in result[-1].split()[1:]]


def compile_times(device_type):
    """Whole model, each Block alone, and nested regions: the first step (compiling) and a later one, at
    two depths. CPU: a narrow model (compile time hardly depends on width); CUDA: GPT-2 124M and 1.5B."""
    shapes = [(12, 12, 768, 16, 1024), (48, 25, 1600, 16, 1024)] if device_type == "cuda" else \
        [(12, 4, 128, 2, 64), (48, 4, 128, 2, 64)]
    print(f"{'shape':<28}{'compiled':<10}{'first step s':>14}{'later step ms':>15}")
    for n_layer, n_head, n_embd, B, T in shapes:
        for how in ("whole", "blocks", "nested", "eager"):
            r = probe(COMPILE_PROBE, how=how, n_layer=n_layer, n_head=n_head, n_embd=n_embd, B=B, T=T)
            shape = f"{n_layer} x {n_embd}, B={B} T={T}"
            print(f"{shape:<28}{how:<10}" + (f"{r[0]:>14.1f}{r[1]:>15.1f}" if isinstance(r, list) else f"  {r}"),
                  flush=True)


def loss_memory(device_type):
    """lm_head and the loss at B x 1024 rows of GPT-2 124M's width: the peak memory above the inputs."""
    cases = [(B, how) for B in (16, 64) for how in ("logits", "logits, compiled", "chunked")]
    if device_type == "cpu":  # 24 GiB of RAM: the plain loss's float32 copies of the logits at B=64 would not fit
        cases = [(16, "logits"), (16, "logits, compiled"), (16, "chunked"), (64, "logits, compiled"), (64, "chunked")]
    print(f"{'B x T':<12}{'loss':<20}{'peak GiB':>10}{'seconds':>9}")
    for B, how in cases:
        r = probe(LOSS_PROBE, how=how, rows=B * 1024)
        print(f"{f'{B} x 1024':<12}{how:<20}" + (f"{r[0]:>10.2f}{r[1]:>9.2f}" if isinstance(r, list) else f"  {r}"),
              flush=True)


def checkpointing_costs(device_type):
    """Each --activation_checkpointing setting at the shapes where it matters: the activations' peak
    (above the model's state) and the step. CPU: GPT-2 124M at B=4, T=512; CUDA: 124M at B=64 and
    1.5B at B=16, T=1024, compiled (the first step compiles)."""
    # (1.5B first, the goals' shape: its compiles take minutes, and a time limit then cuts 124M's rows off)
    shapes = [(48, 25, 1600, 16, 1024, 6), (12, 12, 768, 64, 1024, 12)] if device_type == "cuda" else \
        [(12, 12, 768, 4, 512, 3)]
    print(f"{'shape':<26}{'checkpointing':<15}{'act. GiB':>9}{'first s':>9}{'ms/step':>9}{'tok/s':>10}{'MFU':>7}")
    for n_layer, n_head, n_embd, B, T, steps in shapes:
        for mode in ("none", "selective", "every_other", "full"):
            r = probe(CHECKPOINTING_PROBE, mode=mode, n_layer=n_layer, n_head=n_head, n_embd=n_embd, B=B, T=T,
                      steps=steps)
            shape = f"{n_layer} x {n_embd}, B={B} T={T}"
            print(f"{shape:<26}{mode:<15}" + (f"{r[0]:>9.2f}{r[1]:>9.1f}{r[2]:>9.1f}{r[3]:>10,.0f}{r[4]:>6.1f}%"
                                              .replace("nan%", "   -") if isinstance(r, list) else f"  {r}"),
                  flush=True)


# -----------------------------------------------------------------------------
# what runs where: CPU steps take seconds, compiled GPU steps milliseconds


def plan(device_type, quick, levers):
    """Shapes, step counts and run lengths for this device. With levers, their tables come last, at the
    first shape, each with ours and transformers' again (then not timed apart at that shape)."""
    if device_type == "cuda":
        # compiled steps recompile and autotune for the first few: time 20 after 3 warm-up steps.
        # 50304 rows: the reproduction pads the vocabulary to a multiple of 128, for both contestants
        # B=64 and the whole program first: the goals' shapes are measured before the levers' many compilations
        in_process_runs = [(16, 1024, 20, 3)] if quick else [(64, 1024, 20, 3), (16, 1024, 20, 3)]
        # one run of each program: a second, shorter one would mostly time compilation again
        program_runs = [] if quick else [(64, 1024, None, 24, 3)]  # (B, T, short run, long run, skipped)
        lever_shape = (16, 1024, 20, 3)
    elif quick:
        in_process_runs, program_runs, lever_shape = [(4, 32, 4, 2)], [(4, 32, 2, 12, 1)], (4, 32, 4, 2)
    else:  # on CPU, compiling costs more than it saves in a 50-step run
        in_process_runs, program_runs = [(4, 32, 6, 2), (8, 256, 3, 1)], [(4, 32, 4, 20, 1), (8, 256, 1, 4, 1)]
        lever_shape = (4, 32, 6, 2)
    lever_runs = [(*lever_shape, group) for group in LEVERS[device_type]] if levers else []
    in_process_runs = [(*run, ()) for run in in_process_runs if not (levers and run == lever_shape)]
    return dict(vocab_size=50304 if device_type == "cuda" else 50257, compile=device_type == "cuda",
                in_process=in_process_runs, programs=program_runs, levers=lever_runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, one shape")
    parser.add_argument("--levers", action="store_true",
                        help="also time ours with each alternative we considered (attention backend, loss, GELU, "
                             "compiling each block, with the chunked loss too, max-autotune, CUDA graphs)")
    parser.add_argument("--compile_time", action="store_true", help="only: compile time, whole model against blocks")
    parser.add_argument("--loss_memory", action="store_true", help="only: the loss's memory, logits against chunks")
    parser.add_argument("--checkpointing", action="store_true",
                        help="only: each --activation_checkpointing setting's memory and step time")
    args = parser.parse_args()
    device, device_type = resolve_device("auto")
    only = {"compile_time": compile_times, "loss_memory": loss_memory, "checkpointing": checkpointing_costs}
    for name, measure in only.items():
        if getattr(args, name):
            print(f"device {device} | torch {torch.__version__} | threads {torch.get_num_threads()}")
            return measure(device_type)
    dtype = resolve_dtype("auto", device_type)
    torch.set_float32_matmul_precision("high")  # as train_gpt2 sets it: TF32 on GPUs that have it
    if device_type == "cpu":
        machinery.hardware.keep_freed_memory()  # process-wide: applies to both contestants alike
    p = plan(device_type, args.quick, args.levers)
    name = torch.cuda.get_device_name() if device_type == "cuda" else torch.backends.cpu.get_cpu_capability()
    print(f"device {device} ({name}) | dtype {str(dtype).replace('torch.', '')} | compile {p['compile']} | "
          f"vocab {p['vocab_size']} | torch {torch.__version__} | threads {torch.get_num_threads()}")
    peaks = {d: matmul_peak(device, device_type, d) for d in (torch.float32, torch.bfloat16)}
    print(f"matmul peak, measured now: float32 {peaks[torch.float32]:,.0f} GFLOP/s | "
          f"bfloat16 {peaks[torch.bfloat16]:,.0f} GFLOP/s")
    peak = peaks[dtype] if dtype in peaks else peaks[torch.float32]
    datasheet_peak = machinery.speed.bf16_peak_tflops(device_type)  # TFLOP/s, or None

    if p["in_process"]:
        in_process_tables(p["in_process"], p, peak, datasheet_peak, device, device_type, dtype)
    if p["programs"]:
        print("\nwhole programs: per-step time from two run lengths (start-up excluded), the median step time "
              "each printed, peak memory")
        print(f"{'shape':<12}{'program':<14}{'ms/step':>9}{'tok/s':>10}{'ratio':>7}{'peak MB':>9}"
              f"{'printed ms':>12}{'printed tok/s':>15}")
    for B, T, n_short, n_long, skip in p["programs"]:
        extra = ["--compile"] if p["compile"] else []
        r = whole_programs(B, T, n_short, n_long, extra, p["vocab_size"], skip)
        base = r["transformers"]["ms"]
        for name, m in r.items():
            print(f"{f'B={B} T={T}':<12}{name:<14}{m['ms']:>9.1f}{m['tok_s']:>10,.0f}{base / m['ms']:>6.2f}x"
                  f"{m['peak_mb']:>9,.0f}{m['printed_ms']:>12.1f}{B * T / m['printed_ms'] * 1e3:>15,.0f}",
                  flush=True)
    if p["levers"]:  # (last: CUDA's compile modes may compile for minutes; each table is printed as it ends)
        print("\nlevers: ours with each alternative, a group at a time")
        in_process_tables(p["levers"], p, peak, datasheet_peak, device, device_type, dtype)


def in_process_tables(runs, p, peak, datasheet_peak, device, device_type, dtype):
    """One table of in-process steps for each run (B, T, steps, warm-up steps, levers): ours, the levers,
    transformers' GPT-2, alternating step by step; each printed as it ends."""
    print("\nin-process training steps (medians, contestants alternating step by step; "
          "peak GiB: the contestant's own, CUDA only; first s: the first step, compile included)")
    print(f"{'shape':<12}{'model':<14}{'ms/step':>9}{'tok/s':>10}{'ratio':>7}{'fwd+bwd ms':>12}"
          f"{'optim ms':>10}{'GFLOP/s':>9}{'% peak':>8}{'MFU':>7}{'peak GiB':>10}{'first s':>9}")
    for B, T, steps, warmup, levers in runs:
        makers = [ours, *levers, transformers_baseline]
        r = in_process(B, T, steps, warmup, makers, p["vocab_size"], device, device_type, dtype, p["compile"])
        base = r["transformers"]["ms"]
        for name, m in r.items():
            mfu = 100 * m["gflops"] / 1e3 / datasheet_peak if datasheet_peak else float("nan")
            print(f"{f'B={B} T={T}':<12}{name:<14}{m['ms']:>9.1f}{m['tok_s']:>10,.0f}{base / m['ms']:>6.2f}x"
                  f"{m['fb_ms']:>12.1f}{m['opt_ms']:>10.1f}{m['gflops']:>9,.0f}{100 * m['gflops'] / peak:>7.0f}%"
                  f"{mfu:>6.1f}%{m['peak_gib']:>10.1f}{m['first_s']:>9.1f}".replace("nan%", "   -")
                  .replace("nan", "  -"), flush=True)


if __name__ == "__main__":
    main()
