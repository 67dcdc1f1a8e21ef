"""
Memory: what a run's model state needs per process, said before it runs out, and a CUDA out-of-memory
error said in one line with what to change. train_gpt2.py prints describe_memory at the start and
main() turns an out-of-memory error into describe_out_of_memory's line. docs/memory.md has the table
for every GPT-2 size.
"""

import math
import os
import traceback

import torch

from machinery.files import in_units

# bytes per parameter of the model's state in training: float32 weights (4), their gradients (4) and
# AdamW's two moments (4 + 4). Activations come on top, and scale with B x T, not with this.
WEIGHT_BYTES, GRAD_BYTES, ADAM_BYTES = 4, 4, 8


def parameters_per_process(model, shards):
    """The parameters one process holds: all of them, or under FSDP over `shards` processes the
    largest share (each tensor is split along its first dimension in pieces of ceil(rows / shards))."""
    params = list(model.parameters())
    if shards == 1:
        return sum(p.numel() for p in params)
    return sum(math.ceil(p.shape[0] / shards) * (p.numel() // p.shape[0]) for p in params)


def device_memory(device):
    """The device's memory in bytes (a CPU: the machine's RAM, shared by its processes), or None."""
    device_type = device.split(":")[0]
    if device_type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device_type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        return torch.mps.recommended_max_memory()
    if device_type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def describe_memory(model, fsdp, world_size, device):
    """The start-of-run line: the model state per process in GB, exact from the parameter counts."""
    n = parameters_per_process(model, world_size if fsdp else 1)
    mode = f"FSDP over {world_size}: a 1/{world_size} share" if fsdp else \
        f"DDP: all of it in each of {world_size}" if world_size > 1 else "one process"
    total = device_memory(device)
    return (f"memory per process: model state {in_units(n * (WEIGHT_BYTES + GRAD_BYTES + ADAM_BYTES))} = "
            f"weights {in_units(n * WEIGHT_BYTES)} + gradients {in_units(n * GRAD_BYTES)} + AdamW moments "
            f"{in_units(n * ADAM_BYTES)} ({mode}), activations on top"
            + (f" | {device} has {in_units(total)}" if total else ""))


def step_of(error):
    """The training step the error interrupted: the loop variable `step` of train_gpt2.train, read from
    the frame the error came through (main() catches it, outside the loop), or None before the loop."""
    for frame, _ in traceback.walk_tb(error.__traceback__):
        if frame.f_code.co_name == "train" and "step" in frame.f_locals:
            return frame.f_locals["step"]
    return None


def describe_out_of_memory(error, cfg, device):
    """One line for a CUDA out-of-memory error: where, and the three ways to need less memory."""
    total = device_memory(device)
    step = step_of(error)
    where = (f"at step {step} " if step is not None else "before training ") + \
        f"(micro-batch {cfg.B} x {cfg.T} on {device}" + (f", {in_units(total)})" if total else ")")
    total_batch_size = cfg.total_batch_size or cfg.B * cfg.T * int(os.environ.get("WORLD_SIZE", 1))
    saved = os.path.isfile(os.path.join(cfg.out_dir, "ckpt.pt"))
    return (f"out of memory {where}: lower --B and keep --total_batch_size {total_batch_size} (more accumulation, "
            f"the same training), add --activation_checkpointing, or split the model's state with --fsdp "
            f"under torchrun" + ("; the last checkpoint is intact" if saved else ""))
