"""
Hardware: which device and precision a run gets and why (train_gpt2.py's resolve_device asks select_device),
and the quirks of each device: waiting for a GPU's queued work (synchronize), glibc's memory on CPUs,
cuDNN's attention on Hopper GPUs, torch.compile with a fallback, torchrun's process numbers
(torchrun_ranks), one process per GPU.
train_gpt2.py calls these while it sets up. Measurements behind the choices: docs/performance.md.
"""

import contextlib
import ctypes
import logging
import os
import sys
import time

import torch

from machinery.console import print0
from machinery.files import SettingError, first_line


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name, device_type):
    """The autocast dtype for `--dtype name` (float32 means no autocast). Decided from what the
    hardware reports, never by timing, so the same command always runs the same arithmetic."""
    if name != "auto":
        return DTYPES[name]
    if device_type == "cuda":
        # bf16 needs no loss scaling but is only native from Ampere (compute capability 8.0) on;
        # is_bf16_supported() also says yes on a T4, where bf16 is emulated and slow
        return torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    if device_type == "mps":
        # half-precision SDPA with is_causal=True has leaked future tokens on MPS in some releases
        return torch.float32
    # CPUs: bf16 is faster than float32 where the CPU multiplies it natively, and much slower where
    # oneDNN emulates it (docs/performance.md, "CPU"). So bf16 only where the CPU has it natively.
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16():
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX). Linux lists the feature
    flags in /proc/cpuinfo; elsewhere we assume not."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def select_device(name, device_type):
    """Check that a device name is known and present on this machine. cuda:N also becomes the current CUDA
    device, so that what asks the current one (its capability for the dtype, the memory it holds)
    asks GPU N, not GPU 0 (torchrun's processes: join_process_group sets their local rank's instead)."""
    if device_type not in ("cpu", "cuda", "mps") or (":" in name and not name.split(":")[1].isdigit()):
        raise SettingError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SettingError(f"device {name!r} requested but CUDA is not available")
    if device_type == "cuda" and ":" in name:
        if int(name.split(":")[1]) >= torch.cuda.device_count():
            raise SettingError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(name)
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise SettingError(f"device {name!r} requested but MPS is not available")


def synchronize(device):
    """Wait for queued GPU work, to read a clock ("cuda:1", or a type: "cuda"). CPU work is synchronous: no wait."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        torch.cuda.synchronize(device)  # (that GPU; "cuda": the current one)
    elif device_type == "mps":
        torch.mps.synchronize()


def torchrun_ranks(device_type):
    """(RANK, LOCAL_RANK, WORLD_SIZE), as torchrun sets them in each process it starts: one line where
    RANK is set but the others are not numbers that fit beside it (RANK set by something else), on CUDA where
    torchrun started more processes than the node has GPUs, and on MPS (one GPU, which gloo cannot carry)."""
    try:
        rank, local_rank, world_size = (int(os.environ[name]) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    except (KeyError, ValueError):
        raise ValueError("RANK is set, but not with LOCAL_RANK and WORLD_SIZE as torchrun sets them: start the run "
                         "with torchrun, or unset RANK for one process") from None
    if not 0 <= local_rank <= rank < world_size:  # (a process numbered past the group waits for it forever)
        raise ValueError(f"RANK {rank}, LOCAL_RANK {local_rank} and WORLD_SIZE {world_size} do not fit together "
                         "(0 <= LOCAL_RANK <= RANK < WORLD_SIZE): start the run with torchrun")
    processes_here = os.environ.get("LOCAL_WORLD_SIZE", str(world_size))  # (read again where RAM is shared)
    if not processes_here.isdigit() or not local_rank < int(processes_here) <= world_size:
        raise ValueError(f"LOCAL_WORLD_SIZE {processes_here!r} is not a process count beside LOCAL_RANK {local_rank} "
                         f"and WORLD_SIZE {world_size} (LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE): start the run "
                         "with torchrun")
    if device_type == "cuda":
        check_one_process_per_gpu(world_size)
    if device_type == "mps":  # (gloo, the group's CPU backend, carries no MPS tensors: the first all-reduce fails)
        raise SettingError("torchrun runs one process per GPU, and a Mac's GPU (mps) is one: run python "
                           "train_gpt2.py, or several processes on its CPU with --device cpu")
    return rank, local_rank, world_size


def check_one_process_per_gpu(world_size):
    """torchrun must start at most one process per GPU of the node. Every rank checks the node's
    process count, not only its own rank, so that all of them stop with the same line instead of some
    waiting forever for the ones that could not start."""
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if processes_here > torch.cuda.device_count():
        raise SettingError(f"torchrun started {processes_here} processes on a node with "
                           f"{torch.cuda.device_count()} GPU(s): one process per GPU, so pass "
                           f"--nproc_per_node={torch.cuda.device_count()} (or --device cpu)")


def cpu_allocator_for(device_type, fsdp):
    """glibc's handling of large freed blocks, set for how a CPU run uses memory (Linux; elsewhere nothing).
    One process, or DDP: keep them (keep_freed_memory). FSDP: give them back (release_freed_memory)."""
    if device_type == "cpu" and fsdp:
        release_freed_memory()
    elif device_type == "cpu":
        keep_freed_memory()


def glibc():
    """The C library's handle, where it is glibc on Linux (other C libraries, musl, lack these knobs)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters


def keep_freed_memory():
    """Stop glibc from handing large freed blocks back to the OS.

    A training step frees and re-allocates gigabytes of activations and gradients. By default glibc
    serves each large block with a fresh mmap and unmaps it on free, so the next step page-faults the
    same memory back in, one 4 KB page at a time (a quarter of a step, measured: docs/performance.md).
    Keeping freed blocks in the heap lets the next step reuse them (PyTorch's CPU allocator keeps no
    cache of its own)."""
    libc = glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_MAX, 0)  # serve large blocks from the heap, not from fresh mmaps
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # and keep the heap's free top instead of returning it


def release_freed_memory():
    """Make glibc hand every block of 1 MB or more back to the OS when it is freed. FSDP gathers a
    block's weights, uses them and frees them, block after block: kept in the heap (as keep_freed_memory
    does, and as glibc's default threshold, which grows with the blocks freed, ends up doing) they would
    add up to the whole model again, and a process would peak as high as under DDP (docs/memory.md)."""
    libc = glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 2**20)  # fixed: glibc's own threshold would climb to 32 MB


def attention_kernels(device_type):
    """A context in which F.scaled_dot_product_attention prefers the fastest kernel for this device.

    PyTorch tries flash attention first and cuDNN's fused attention last. On Hopper GPUs (compute
    capability 9) cuDNN's made a compiled GPT-2 124M bf16 step faster on an H200, with the same loss to
    bf16 precision (docs/performance.md, "CUDA"). There it goes first,
    the others after it, for what it cannot run (float32, say); elsewhere PyTorch's order stands."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device_type != "cuda" or torch.cuda.get_device_capability()[0] != 9:
        return contextlib.nullcontext()
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def compile_model(model, B, T, device, autocast):
    """torch.compile `model` and compile it now, with one forward and backward on a dummy (B, T) batch,
    so a missing compiler shows up here (and its time is not billed to step 0). Falls back to the
    eager model, with one line saying why."""
    t0 = time.perf_counter()
    # its warning for selective checkpointing (a recomputed in-place op would be wrong): the blocks have none
    logging.getLogger("torch._higher_order_ops.wrap").setLevel(logging.ERROR)
    try:
        compiled = torch.compile(model)
        # two distinct tensors, like real batches (the compiler specialises on inputs that alias)
        x, y = (torch.zeros((B, T), dtype=torch.long, device=device) for _ in range(2))
        with autocast:
            _, loss = compiled(x, y)
        loss.backward()
    except Exception as e:  # no C compiler, an unsupported platform or Python, ...
        print0(f"compile failed, running eagerly: {first_line(e)[:200]}")
        return model
    finally:
        model.zero_grad(set_to_none=True)
    print0(f"compiled in {time.perf_counter() - t0:.1f} s")
    return compiled
