"""
Memory: what a run will need per process, said before it runs out (the model state exact from the
counts, the activations from a formula fitted to measurements), training on CPUs, or a --cpu_offload
run, that the machine's RAM cannot hold refused before step 0, the peak a run really used, and memory
running out (a CUDA GPU's, an Apple GPU's, or RAM) said in one line with what to change. train_gpt2.py
prints plan_memory at the start and logs largest_peak_memory at the end (samples.finish_run prints it on
the run's last line); main() turns an out-of-memory error into describe_out_of_memory's line.
docs/memory.md has the table for every GPT-2 size and the measurements behind the formula.
"""

import math
import os
import resource
import sys
import traceback

import torch
import torch.distributed as dist

from machinery.files import SettingError, in_binary_units as size, ram_bytes
from machinery.loss import CHUNK_ROWS
from machinery.recompute import recomputed, setting

# bytes per parameter of the model's state in training: float32 weights (4), their gradients (4) and
# AdamW's two moments (4 + 4). Activations come on top, and scale with B x T, not with this.
WEIGHT_BYTES, GRAD_BYTES, ADAM_BYTES = 4, 4, 8
STATE_BYTES = WEIGHT_BYTES + GRAD_BYTES + ADAM_BYTES

# What backward keeps, in bytes a token, fitted (least squares, relative) to five peaks of allocated
# memory measured on an H200 with bf16 autocast and fused attention at T=1024, V=50,304, from which the
# state was taken away: GPT-2 124M at B=16 (9.0 GB) and B=64 (43.8 GB; 24.0 GB with checkpointing),
# GPT-2 1.5B at B=16 (76.1 GB; 35.2 GB with checkpointing). ACT_PER_CHANNEL_LAYER of every channel of
# every block (Korthikanti et al. 2022 count about 34 without the attention matrix), ACT_PER_LOGIT of
# every logit (bf16 logits and their float32 softmax); with activation checkpointing each block keeps
# its float32 input (4 a channel) and one block is recomputed at a time. Errors of the estimate (state
# included) on those five: +21.6%, -13.7%, -6.2%, -8.9%, -0.8% (docs/memory.md, tests/test_memory.py):
# hence "about", and FIT_MARGIN for "fits with room" (the largest underestimate, and then some).
ACT_PER_CHANNEL_LAYER, ACT_PER_LOGIT, FIT_MARGIN = 32, 5, 1.15
# What a recomputed block keeps, in bytes a channel a token: its float32 input (4); with selective
# checkpointing also its matmuls' bf16 outputs (3 + 1 + 4 + 1 channels' worth) and attention's (1): 24.
# Counted, not fitted: the GPU peaks of every_other and selective are not measured yet.
ACT_KEPT_BY_RECOMPUTED = {"full": 4, "every_other": 4, "selective": 4 + 2 * (3 + 1 + 4 + 1 + 1)}
# the explicit attention (--no-sdpa) keeps its (T, T) scores in every head: counted, not measured
ACT_PER_SCORE = 10


def parameters_per_process(model, shards=1):
    """The parameters one process holds: all of them, or under FSDP over `shards` processes the
    largest share (each tensor is split along its first dimension in pieces of ceil(rows / shards))."""
    return sum(share(p, shards) for p in model.parameters())


def share(tensor, shards):
    """The elements of the largest of a tensor's `shards` pieces along its first dimension."""
    return math.ceil(tensor.shape[0] / shards) * (tensor.numel() // tensor.shape[0])


def activation_bytes(config, B, T, checkpointing="none", sdpa=True, float32=False, loss_in_chunks=False):
    """An estimate of the activations one micro-batch of B x T keeps for backward (see the fit above) with
    --activation_checkpointing `checkpointing`: the blocks that run again in backward keep less, and one
    of them at a time holds all its own; float32 runs keep twice the bytes of bf16 ones. With
    loss_in_chunks (GPT.forward's, on CPUs) there are no logits: one chunk of them in float32 and its
    bf16 gradient, and the loss's own gradients of the token table (float32) and of its input, instead."""
    C, L, V, checkpointing = config.n_embd, config.n_layer, config.vocab_size, setting(checkpointing)
    again = sum(recomputed(checkpointing, i) for i in range(L))  # blocks run again in backward
    kept = ACT_KEPT_BY_RECOMPUTED.get(checkpointing, 0)
    blocks = ACT_PER_CHANNEL_LAYER * C * (L - again + (again > 0)) + kept * C * again
    # the explicit attention's (T, T) scores: selective keeps q @ k^T's in every block (counted as all they keep)
    scored = L if checkpointing == "selective" else L - again + (again > 0)
    scores = 0 if sdpa else ACT_PER_SCORE * config.n_head * T * scored
    if loss_in_chunks:
        loss = 6 * min(B * T, CHUNK_ROWS) * V + 6 * V * C + 4 * B * T * C
        return B * T * (blocks + scores) * (2 if float32 else 1) + loss
    return B * T * (blocks + scores + ACT_PER_LOGIT * V) * (2 if float32 else 1)


def gathered_bytes(config):
    """Under FSDP, the whole weights and gradients in flight on a GPU: the root unit's (token and position
    tables, held from forward to the end of backward) and two blocks' (one computing, one prefetched)."""
    C = config.n_embd
    root, block = (config.vocab_size + config.block_size) * C, 12 * C * C + 13 * C
    return (WEIGHT_BYTES + GRAD_BYTES) * (root + 2 * block)


def device_name(device):
    """'cuda:0 (NVIDIA H200)', 'cpu (AMD EPYC 9454)': the device and what it is."""
    device_type = device.split(":")[0]
    if device_type == "cuda":
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device_type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
            return f"cpu ({model})"
        except (OSError, StopIteration):
            return "cpu"
    return device


def device_memory(device):
    """The device's memory in bytes (a CPU: the machine's RAM, shared by its processes), or None."""
    device_type = device.split(":")[0]
    if device_type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device_type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        return torch.mps.recommended_max_memory()
    if device_type == "cpu":
        return ram_bytes()
    return None


def available_ram():
    """The RAM free for a new allocation now, in bytes (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def plan_memory(model, cfg, world_size, device, dtype, start_step=0):
    """The start-of-run line: what each process needs and where it lives, beside what the device has.
    Training on CPUs that their RAM cannot hold, or a --cpu_offload run whose state it cannot hold, stops
    here, in one line. A run with nothing to train (--max_steps 0, --eval_only, a resume past its
    --max_steps) only needs the weights. Every process must call it (they agree on a refusal)."""
    total = device_memory(device)
    has = f"{device_name(device)} has {size(total)}" if total else device_name(device)
    if cfg.eval_only or start_step >= cfg.max_steps:  # no gradients, no AdamW: the weights and a forward pass
        n = parameters_per_process(model, world_size if cfg.fsdp else 1)  # (FSDP: this process's share)
        where = " in RAM" if cfg.cpu_offload else f" (its 1/{world_size} share)" if cfg.fsdp else ""
        return f"memory per process: weights {size(WEIGHT_BYTES * n)}{where} (no training) | {has}"
    parts = memory_needs(model, cfg, world_size, dtype, device)  # [(what, bytes)]
    need = sum(bytes_ for _, bytes_ in parts)
    here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # the processes sharing this machine's RAM
    shared = here if device.startswith("cpu") else 1  # (a CPU's processes all live in this RAM)
    together = f", {size(shared * need)} for the {shared} processes of this machine" if shared > 1 else ""
    line = (f"memory per process: {' + '.join(what for what, _ in parts)} = about {size(need)}{together}"
            f"{fit(shared * need, total)} | {has}")
    # on CPUs, refused when even the estimate, which runs low there (docs/memory.md), passes the RAM: a
    # process that runs out of it is ended by the kernel without a word (a run under it may still be)
    fits_here = not (device.startswith("cpu") and total and shared * need > total)
    if not everyone_agrees(fits_here, device):
        raise SettingError(too_little_ram(cfg, need, here, total if not fits_here else None, world_size))
    if cfg.cpu_offload:  # the state, in the machine's RAM
        line += "\n" + plan_ram(model, cfg, world_size, device)
    return line


def memory_needs(model, cfg, world_size, dtype, device="cuda"):
    """What one process keeps on its device while it trains, as [(words, bytes)]: the state (unless
    offloaded), DDP's buckets, the activations (an estimate) and, under FSDP, the units in flight."""
    # (MPS has no fused attention that trains: torch's math attention keeps the (T, T) scores, as --no-sdpa does)
    fused_attention = cfg.sdpa and not device.startswith("mps")
    fsdp_wrapped, n = cfg.fsdp or cfg.cpu_offload, parameters_per_process(model, world_size if cfg.fsdp else 1)
    parts = [] if cfg.cpu_offload else [(describe_state(n, cfg, world_size), STATE_BYTES * n)]
    if world_size > 1 and not fsdp_wrapped:  # DDP reduces gradients through buckets: a second copy of them
        parts.append((f"DDP's gradient buckets {size(GRAD_BYTES * n)}", GRAD_BYTES * n))
    act = activation_bytes(model.config, cfg.B, cfg.T, cfg.activation_checkpointing, fused_attention,
                           dtype == torch.float32, getattr(model, "loss_in_chunks", False))
    mode = setting(cfg.activation_checkpointing)
    checkpointing = {"none": "", "full": " with activation checkpointing"}.get(
        mode, f" with activation checkpointing ({mode})")
    parts.append((f"activations about {size(act)} at B={cfg.B}, T={cfg.T}{checkpointing} (estimate)", act))
    if fsdp_wrapped:
        parts.append((f"gathered units {size(gathered_bytes(model.config))}", gathered_bytes(model.config)))
    return parts


def describe_state(n, cfg, world_size):
    mode = (f"FSDP over {world_size}: a 1/{world_size} share" if cfg.fsdp else
            f"DDP: all of it in each of {world_size}" if world_size > 1 else "one process")
    return (f"model state {size(STATE_BYTES * n)} = weights {size(WEIGHT_BYTES * n)} + gradients "
            f"{size(GRAD_BYTES * n)} + AdamW moments {size(ADAM_BYTES * n)} ({mode})")


def fit(need, total):
    """Nothing where `need` fits in `total` bytes with the estimate's margin, else what to expect."""
    if not total or need * FIT_MARGIN <= total:
        return ""
    return ": likely does not fit" if need > total else ": may not fit (within the estimate's error)"


def too_little_ram(cfg, need, here, total, world_size):
    """The line for training on CPUs whose RAM (`total` bytes on this machine; None: another machine's)
    cannot hold `here` processes' `need` bytes each, with the ways to need less."""
    where = f"this machine's {size(total)}" if total else "another machine of this run has"
    each = f" ({here} processes x {size(need)})" if here > 1 else ""
    ways = ways_to_need_less(cfg, cfg.total_batch_size or cfg.B * cfg.T * world_size)
    ways += ["split the state with --fsdp", "start fewer processes a machine"] if here > 1 else []
    return f"training needs about {size(here * need)} of RAM{each}, more than {where}: {one_of(ways)}"


def ways_to_need_less(cfg, total_batch_size):
    """The changes that make a run need less memory, whatever the device: a smaller micro-batch (the same
    training), and recomputing activations where more can be."""
    ways = [f"lower --B and keep --total_batch_size {total_batch_size} (more accumulation, the same training)"]
    return ways + {"none": ["add --activation_checkpointing"], "full": []}.get(
        setting(cfg.activation_checkpointing), ["recompute more with --activation_checkpointing full"])


def one_of(ways):
    """'a', 'a or b', 'a, b, or c'."""
    if len(ways) == 1:
        return ways[0]
    return ", ".join(ways[:-1]) + ("," if len(ways) > 2 else "") + " or " + ways[-1]


def everyone_agrees(fits, device):
    """Whether `fits` holds in every process (their machines may differ): all stop, or none, so that no
    process waits for another that stopped. Every process must call it."""
    if dist.is_initialized() and dist.get_world_size() > 1:  # (NCCL reduces CUDA tensors; gloo CPU ones)
        agreed = torch.tensor(float(fits), device=device if device.startswith("cuda") else "cpu")
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        fits = bool(agreed.item())
    return fits


def page_locked_bytes(model, shards):
    """What one process's float32 shards of every weight take in page-locked (pinned) RAM: torch's
    allocator for it rounds each tensor up to a power of two (1.5x the bytes for GPT-2 1.5B)."""
    return sum(1 << (WEIGHT_BYTES * share(p, shards) - 1).bit_length() for p in model.parameters())


def plan_ram(model, cfg, world_size, device):
    """The --cpu_offload line: the state this machine's processes keep in its RAM (their shares; weights
    and gradients page-locked where a GPU copies them; on rank 0's machine also the whole weights and
    moments while a checkpoint is gathered), beside what is free (counting the weights rank 0 built,
    which sharding frees). Where it cannot hold them: a ValueError in every process, before step 0."""
    shards, pinned = (world_size if cfg.fsdp else 1), device.startswith("cuda")
    n = parameters_per_process(model, shards)
    held = 2 * page_locked_bytes(model, shards) + ADAM_BYTES * n if pinned else STATE_BYTES * n  # one process
    here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    gathers = world_size > 1 and int(os.environ.get("RANK", 0)) < here  # rank 0 runs on this machine
    need = here * held + (WEIGHT_BYTES + ADAM_BYTES) * parameters_per_process(model) * gathers
    free = available_ram()
    if free is not None and not any(p.is_meta for p in model.parameters()):  # this process built the weights
        free += WEIGHT_BYTES * parameters_per_process(model)
    if not everyone_agrees(free is None or need <= free, device):
        where = "more RAM than another machine of this run has free" if free is None or need <= free else \
            f"about {size(need)} of RAM on this machine, which has {size(free)} for it"
        raise SettingError(f"--cpu_offload needs {where} ({here} process(es)' share of the state" +
                           (", and a checkpoint gathered" if gathers else "") +
                           "): free some, or spread the state over more machines' RAM with --fsdp under torchrun")
    return (f"memory in RAM (--cpu_offload): {describe_state(n, cfg, world_size)}" +
            (f", {size(held)} with weights and gradients page-locked" if pinned else "") +
            (f"; this machine: {size(need)} of {size(free)} free" if free is not None else ""))


def peak_memory(device):
    """(bytes, what they count): the most this process held so far. CUDA: torch's peak of allocated
    memory on the GPU; CPUs and MPS: the process's peak resident memory."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device), "allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024), "resident"  # macOS counts bytes, Linux kB


def largest_peak_memory(device):
    """peak_memory's bytes, the largest over all processes (every process must call this)."""
    peak = torch.tensor(float(peak_memory(device)[0]), device=device)
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return int(peak.item())


def describe_peak(peak, device):
    several = dist.is_initialized() and dist.get_world_size() > 1
    return f"peak memory {size(peak)} ({peak_memory(device)[1]}{', the largest process' if several else ''})"


def step_of(error):
    """The training step the error interrupted: the loop variable `step` of train_gpt2.training_loop, read
    from the frame the error came through (main() catches it, outside the loop), or None before the loop."""
    return train_local(error, "step")


def train_local(error, name):
    """The value of a local variable `name` of train_gpt2.train or its training_loop (the innermost the error
    came through) where the error left it, or None."""
    found = None
    for frame, _ in traceback.walk_tb(error.__traceback__):  # (from main() inwards)
        if frame.f_code.co_name in ("train", "training_loop") and name in frame.f_locals:
            found = frame.f_locals[name]
    return found


def out_of_memory(error):
    """Whether an error is memory running out: a CUDA GPU's torch.OutOfMemoryError, or a RuntimeError in the
    words of torch's CPU allocator (RAM, or a `ulimit -v`, exhausted) or of its MPS one (an Apple GPU's share
    of memory; or one tensor past Metal's largest buffer, "Invalid buffer size")."""
    words = ("DefaultCPUAllocator: can't allocate memory", "MPS backend out of memory", "Invalid buffer size")
    return isinstance(error, torch.OutOfMemoryError) or any(w in str(error) for w in words)


def describe_out_of_memory(error, cfg, device):
    """One line for an out-of-memory error: where, and the ways to need less memory (on a CUDA GPU, also
    moving the state off it; a CPU's processes share one RAM, which those do not shrink). The settings are train's
    own where the error came through it (a resume's batch is the checkpoint's, not cfg's)."""
    total = device_memory(device)
    step, cfg = step_of(error), train_local(error, "cfg") or cfg
    where = (f"at step {step} " if step is not None else "before training ") + \
        f"(micro-batch {cfg.B} x {cfg.T} on {device_name(device)}" + (f", {size(total)})" if total else ")")
    total_batch_size = cfg.total_batch_size or cfg.B * cfg.T * int(os.environ.get("WORLD_SIZE", 1))
    saved = os.path.isfile(os.path.join(cfg.out_dir, "ckpt.pt"))
    ways = ways_to_need_less(cfg, total_batch_size)
    if device.startswith("cuda"):  # (not what is already on; a CPU's processes share one RAM, MPS has neither)
        ways += [] if cfg.fsdp else ["split the model's state with --fsdp under torchrun"]
        ways += [] if cfg.cpu_offload else ["keep it in RAM with --cpu_offload"]
    return f"out of memory {where}: {one_of(ways)}" + ("; the last checkpoint is intact" if saved else "")
