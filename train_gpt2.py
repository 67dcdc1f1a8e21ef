"""
Train GPT-2 from scratch, or fine-tune / sample OpenAI's GPT-2 weights: the story in one readable file.

    setup:       pip install -r requirements.txt
    CPU/GPU/MPS: python train_gpt2.py                       (GPT-2 124M, 50 steps on input.txt)
    learn:       python train_gpt2.py @configs/learner.args     (a small model writes verse, minutes on a CPU)
    sample:      python train_gpt2.py --init_from gpt2 --max_steps 0 --prompt "Hello, I'm a"
    your model:  python train_gpt2.py --init_from out/verse/ckpt.pt --max_steps 0 --prompt "ROMEO:"
    fine-tune:   python train_gpt2.py @configs/finetune_gpt2.args
    reproduce:   python prepare.py fineweb-edu
                 torchrun --standalone --nproc_per_node=8 train_gpt2.py @configs/gpt2_124m.args
    GPT-2's bar: python train_gpt2.py @configs/eval_gpt2.args
    resume:      the same command plus --resume; options: --help (recipes: configs/, a flag a line)

Reading order: the model, the data, device and precision, the learning rate, the settings, then the run.
What a first reading may skip is in the package machinery/, called by names that say what they do.
Shapes: B batch, T time, C channels, nh heads, hs head size, V vocabulary.
"""

import contextlib
import gc
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from machinery.checkpoints import (checkpoint_due, load_weights, restore_training_state, save_checkpoint,
                                   starting_checkpoint)
from machinery.command_line import SettingError, check_block_size, check_config, flag, parse_args
from machinery.console import (describe_data, describe_evaluation, describe_model, describe_plan, print0,
                               say_error, step_line)
from machinery.hardware import (DTYPES, attention_kernels, compile_model, cpu_allocator_for, resolve_dtype,
                                select_device, synchronize, torchrun_ranks)
from machinery.hellaswag_eval import accuracy_across_ranks, load_items_across_ranks
from machinery.loss import linear_cross_entropy
from machinery.memory import describe_out_of_memory, largest_peak_memory, out_of_memory, plan_memory
from machinery.pretrained import PRETRAINED, export_to_transformers, load_transformers_gpt2, shared_weight_names
from machinery.random_streams import get_rng_state
from machinery.recompute import MODES, checkpoint_options, recomputed
from machinery.samples import finish_run, print_samples
from machinery.run_log import RunLog, plot_log  # noqa: F401 (plot_log: importers take it from here)
from machinery.sharding import (buffers_not_resent, builds_the_model, check_fsdp, from_rank0, full_model_state,
                                full_optimizer_state, set_gradient_sync, shard_model)
from machinery.speed import bf16_peak_tflops, hardware_use
from machinery.stopping import (StopRequested, TrainingDiverged, another_process_stopped, check_finite,
                                sigterm_stops_at_once, stop_requested_anywhere, stopped_after_saving, stopped_at_once,
                                stopped_before_saving)
from machinery.tokens import (GPT2_VOCAB_SIZE, check_data, open_shard, shard_files, text_file_split, validation_batches,
                              get_tokenizer)  # noqa: F401 (get_tokenizer: importers take it from here, as plot_log)

# -----------------------------------------------------------------------------
# The model


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the model reads (positions in wpe)
    vocab_size: int = 50257  # rows of the token table: 50,000 BPE merges + 256 bytes + <|endoftext|>
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # channels of the residual stream
    sdpa: bool = True  # True: F.scaled_dot_product_attention; False: the explicit softmax (--sdpa overrides a ckpt's)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head, self.sdpa = config.n_head, config.sdpa
        # query, key and value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.NANOGPT_SCALE_INIT = True  # adds to the residual stream: smaller init, see GPT._init_weights
        # the explicit path's causal mask: position t may attend to positions <= t. Not persistent: a constant
        # of block_size, so checkpoints do not carry it ("bias" is GPT-2's name for it). Bool: 1 MB a layer at 1024.
        causal = torch.ones(config.block_size, config.block_size, dtype=torch.bool).tril()
        self.register_buffer("bias", causal.view(1, 1, config.block_size, config.block_size), persistent=False)

    def forward(self, x):
        B, T, C = x.size()
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if self.sdpa:
            # the same arithmetic as below, fused (flash and cuDNN kernels never build the (T, T) matrix)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        else:
            # 1/sqrt(hs) keeps the scores' variance near 1, so softmax does not saturate at init
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
            att = att.masked_fill(~self.bias[:, :, :T, :T], float("-inf"))  # no peeking ahead
            att = F.softmax(att, dim=-1)
            y = att @ v  # (B, nh, T, T) x (B, nh, T, hs) -> (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again: (B, T, C)
        return self.c_proj(y)  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 was trained with the tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.NANOGPT_SCALE_INIT = True  # adds to the residual stream too: see GPT._init_weights

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


# OpenAI's Conv1D stores these as (in, out) for x @ W, nn.Linear's (out, in) transposed: load and export transpose
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


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
        self.activation_checkpointing = "none"  # set by make_model for each run: not kept with the weights
        self.loss_in_chunks = False  # set by make_model on CPUs: forward gives (None, the loss without the logits)
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
        """(logits (B, T, V), the mean loss if targets are given); with targets and loss_in_chunks, (None, loss)."""
        B, T = idx.size()  # idx: (B, T) token ids
        if T > self.config.block_size:
            raise ValueError(f"sequence length T={T} exceeds block_size={self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C) + (T, C) -> (B, T, C)
        for i, block in enumerate(self.transformer.h):
            # activation checkpointing: keep the block's input, not all its activations; backward reruns it
            if recomputed(self.activation_checkpointing, i) and torch.is_grad_enabled():  # (training only)
                x = checkpoint(block, x, use_reentrant=False, **checkpoint_options(self.activation_checkpointing))
            else:
                x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None and self.loss_in_chunks:  # CPUs (make_model): never all (B*T, V) logits at once:
            return None, linear_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1))  # by rows
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            # mean negative log-likelihood of the next token, over all B*T positions
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))  # (B*T, V), (B*T,)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, device_type):
        """AdamW with weight decay on matrices and embeddings only: decay pulls weights toward zero, which
        regularises the 2-D tensors but would only hurt biases and LayerNorm gains."""
        params = [p for p in self.parameters() if p.requires_grad]  # tied weight appears once
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        for name, group in zip(("decayed", "not decayed"), groups):  # (print0: under torchrun, rank 0 speaks)
            n_params = sum(p.numel() for p in group["params"])
            print0(f"optimizer {name}: {len(group['params'])} tensors, {n_params:,} parameters")
        fused = device_type in ("cuda", "cpu")  # all tensors in one pass: faster than a loop (MPS: the loop)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)  # (GPT-3's betas)

    def flops_per_token(self, T):
        """Training FLOPs per token at length T: 6 per weight of a matmul (2 forward, 4 backward), N weights (all but
        the position table, a lookup; the tied matrix once), plus attention's q @ k^T and att @ v: 12 n_layer C T."""
        n_params = sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()
        return 6 * n_params + 12 * self.config.n_layer * self.config.n_embd * T

    @classmethod
    def from_pretrained(cls, name_or_path, vocab_size=None, sdpa=True):
        """GPT-2 weights from the Hugging Face hub by name (gpt2 ... gpt2-xl) or from a directory written
        by save_pretrained (the offline path). vocab_size pads the token table (e.g. to 50304)."""
        hf_model = load_transformers_gpt2(name_or_path, PRETRAINED)  # quiet, and one-line errors (an unknown name)
        hf = hf_model.config
        model = cls(GPTConfig(block_size=hf.n_positions, vocab_size=max(hf.vocab_size, vocab_size or 0),
                              n_layer=hf.n_layer, n_head=hf.n_head, n_embd=hf.n_embd, sdpa=sdpa))
        sd, sd_hf = model.state_dict(), hf_model.state_dict()
        keys = shared_weight_names(sd, sd_hf, name_or_path)  # all but the tied lm_head and transformers 4.x's masks
        with torch.no_grad():
            for k in keys:
                w = sd_hf[k].t() if k.endswith(CONV1D_WEIGHTS) else sd_hf[k]
                target = sd[k][: w.shape[0]] if k == "transformer.wte.weight" else sd[k]  # (padding rows: random init)
                if w.shape != target.shape:
                    raise ValueError(f"shape mismatch for {k}: {tuple(w.shape)} vs ours {tuple(target.shape)}")
                target.copy_(w)
        return model

    def save_pretrained(self, directory, state_dict=None):
        """A transformers GPT-2 directory, read by GPT2LMHeadModel and us (state_dict: e.g. FSDP's, gathered)."""
        export_to_transformers(self.config, state_dict or self.state_dict(), directory, CONV1D_WEIGHTS)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None, seed=42):
        """Append max_new_tokens sampled tokens to idx (B, T) and return it (B, T + max_new_tokens);
        temperature 0 is greedy. Sampling draws on the CPU from its own `generator` (seeded with `seed` if
        None), never the global stream: sampling mid-training changes nothing, and devices draw alike."""
        generator = generator or torch.Generator().manual_seed(seed)
        n_vocab = min(self.config.vocab_size, GPT2_VOCAB_SIZE)  # never emit a padding row's id
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]  # the model sees at most block_size tokens
            logits, _ = self(idx_cond)  # (B, T, V)
            logits = logits[:, -1, :n_vocab].float()  # (B, V): last position only, in float32
            if temperature < torch.finfo(torch.float32).tiny:  # 0, or so small that logits / it overflow: greedy
                next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                k = min(top_k, n_vocab) if top_k else n_vocab
                top_logits, top_ids = torch.topk(logits, k, dim=-1)  # (B, k), best first: sample among the k best
                probs = F.softmax((top_logits - top_logits[:, :1]) / temperature, dim=-1).cpu()  # max 0: no overflow
                choice = torch.multinomial(probs, 1, generator=generator).to(idx.device)  # (B, 1)
                next_id = torch.gather(top_ids, -1, choice)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)  # (B, T + 1)
        return idx


# -----------------------------------------------------------------------------
# The data: batches of GPT-2 tokens (text_file_split tokenizes a text file with GPT-2's BPE, machinery/tokens.py)


class DataLoaderLite:
    """Serves (x, y) batches of shape (B, T); y is x shifted by one token. The tokens: a text file (input_file)
    tokenized in memory, all of it (split None), its first 90% ("train") or last 10% ("val"); or prepare.py's
    shards (data_dir), read a window at a time, training's in a new seeded order each epoch (unless shuffle is
    False). Each next_batch reads the next window of B*T*num_processes tokens (+1, the last target), process r its
    r-th B*T of them; a shard too short for the next window gives way to the next."""

    def __init__(self, B, T, input_file="input.txt", split=None, process_rank=0, num_processes=1,
                 val_fraction=0.1, data_dir=None, shuffle=True, seed=1337):
        self.B, self.T, self.seed, self.process_rank, self.num_processes = B, T, seed, process_rank, num_processes
        if data_dir is not None:  # shard files, opened one at a time by load_shard
            self.shards, self.n_tokens = shard_files(data_dir, split, B, T, num_processes)  # each >= 1 window
            self.shuffle = shuffle and split == "train"
        else:  # one array of tokens, in memory
            self.shards, self.n_tokens = text_file_split(input_file, split, val_fraction, B, T, num_processes)
            self.tokens, self.shuffle = self.shards[0], False  # (self.tokens: the split's ids, for a reader or a test)
        self.reset()

    def shard_order(self, epoch):
        """Indices of the shards in the order this epoch reads them."""
        if not self.shuffle:
            return list(range(len(self.shards)))
        # a new order each epoch: a fixed one would feed every epoch the same shards in the same sequence
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()

    def load_shard(self):
        shard = self.shards[self.order[self.shard]]
        self.file = None if isinstance(shard, np.ndarray) else os.path.basename(shard)  # (text: no file)
        self.current = shard if self.file is None else open_shard(shard)  # (read a window at a time)

    def next_batch(self):
        B, T = self.B, self.T
        start = self.position + self.process_rank * B * T
        buf = torch.from_numpy(self.current[start: start + B * T + 1].astype(np.int64))  # (B*T+1,) uint16 -> int64
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

    def state_dict(self):  # (file, tokens: checkpoints.restore_data_position finds the shard by name, checks the count)
        return dict(epoch=self.epoch, shard=self.shard, position=self.position, file=self.file, tokens=self.n_tokens)

    def load_state_dict(self, state):
        self.epoch, self.shard, self.position = (int(state.get(k, 0)) for k in ("epoch", "shard", "position"))
        self.order = self.shard_order(self.epoch)
        self.load_shard()


# -----------------------------------------------------------------------------
# Device, precision and seeding


def resolve_device(name="auto"):
    """The device to run on ("cuda:3") and its type ("cuda"): every backend choice keys on the type."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device_type = name.split(":")[0]
    select_device(name, device_type)  # a known name, present on this machine (cuda:N: made the current GPU)
    return name, device_type


def make_precision(dtype_name, device_type, fsdp_wrapped=False):
    """The dtype, autocast context and loss scaler for --dtype (resolve_dtype: what "auto" picks, and why)."""
    dtype = resolve_dtype(dtype_name, device_type)
    # autocast takes the device TYPE ("cuda", never "cuda:3"); float32 means full precision, no autocast. Under
    # FSDP, which frees each block's weights after use, its cache of bf16 copies would keep them all (docs/memory.md)
    autocast = (torch.autocast(device_type, dtype=dtype, cache_enabled=not fsdp_wrapped)
                if dtype != torch.float32 else contextlib.nullcontext())
    # float16's narrow range underflows small gradients: scale the loss up, gradients back down
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == torch.float16))
    return dtype, autocast, scaler


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


# -----------------------------------------------------------------------------
# The learning rate


def get_lr(step, max_lr, min_lr, warmup_steps, max_steps):
    """Linear warmup to max_lr over warmup_steps, cosine decay to min_lr at max_steps, then flat."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps  # step + 1: the very first step is not wasted at lr 0
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


# -----------------------------------------------------------------------------
# The settings: edit the defaults here, or set any on the command line (--name value); flag(default, help)


@dataclass
class TrainConfig:
    # data and model
    input_file: str = flag("input.txt", "UTF-8 text file to train on (last 10% of its tokens: validation)")
    data_dir: str = flag("", "a folder of token shards written by prepare.py (takes precedence over input_file)")
    shuffle: bool = flag(True, "with data_dir, read the train shards in a new seeded order each epoch")
    init_from: str = flag("scratch", "scratch, a GPT-2 name (gpt2 ... gpt2-xl), a save_pretrained dir or a ckpt.pt")
    n_layer: int = flag(12, "transformer blocks (scratch models)")
    n_head: int = flag(12, "attention heads (scratch models)")
    n_embd: int = flag(768, "channels (scratch models)")
    block_size: int = flag(1024, "longest context in tokens (scratch models)")
    vocab_size: int = flag(50257, "token table rows; 50304 (a multiple of 128) makes GPU matmuls faster")
    sdpa: bool = flag(True, "fused scaled_dot_product_attention; --no-sdpa: explicit masked softmax")
    # batch
    B: int = flag(4, "micro-batch size: sequences per forward pass")
    T: int = flag(32, "sequence length in tokens")
    total_batch_size: int = flag(0, "tokens per optimizer step (gradient accumulation); 0: B*T*processes")
    # optimisation
    max_steps: int = flag(50, "optimizer steps; 0 only samples")
    lr: float = flag(3e-4, "peak learning rate")
    min_lr: Optional[float] = flag(None, "learning rate at max_steps after cosine decay (None: lr, a constant rate)")
    warmup_steps: int = flag(0, "steps of linear learning-rate warmup")
    weight_decay: float = flag(0.1, "AdamW weight decay on matrices and embeddings")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this")
    # hardware
    device: str = flag("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    dtype: str = flag("auto", "autocast precision", choices=("auto", *DTYPES))
    compile: bool = flag(False, "torch.compile the model (falls back to eager if the compiler fails)")
    fsdp: bool = flag(False, "under torchrun, shard weights, gradients and AdamW moments across processes (FSDP2)")
    cpu_offload: bool = flag(False, "keep weights, gradients and AdamW moments in RAM, the GPU only the blocks at work")
    activation_checkpointing: str = flag("none", "recompute activations in backward for less memory: none, selective, "
                                         "every_other or full (the flag alone)", choices=MODES, bare="full")
    seed: int = flag(1337, "random seed")
    # evaluation, logging, checkpoints
    eval_interval: int = flag(250, "steps between evaluations (also at step 0 and of the trained model)")
    eval_iters: int = flag(20, "validation steps per evaluation, each of total_batch_size tokens")
    eval_only: bool = flag(False, "evaluate once as the end of a run would (--init_from or --resume), then exit")
    hellaswag: str = flag("", "HellaSwag at every evaluation: a local jsonl file, or auto (downloaded once, cached)")
    sample_interval: int = flag(0, "steps between printed samples (0: only at the end)")
    checkpoint_interval: int = flag(0, "steps between checkpoints (0: only at the end)")
    out_dir: str = flag("out", "where the run writes its log and checkpoint")
    resume: bool = flag(False, "continue from the checkpoint in out_dir")
    export_dir: str = flag("", "at the end, write a transformers GPT-2 directory here")
    wandb_project: str = flag("", "also send the log's records and the config to this Weights & Biases project")
    wandb_run_name: str = flag("", "the W&B run's name (empty: W&B picks one)")
    # sampling
    prompt: str = flag("Hello, I'm a language model,", "text the samples continue")
    num_samples: int = flag(4, "samples to print")
    max_new_tokens: int = flag(32, "tokens per sample")
    top_k: int = flag(50, "sample among the k most likely tokens (0: all)")
    temperature: float = flag(1.0, "sampling temperature (0: greedy)")


# -----------------------------------------------------------------------------
# The run: setup. Under torchrun, N processes (ranks 0 to N-1, one per GPU) each run this file on their own part
# of every batch. DDP averages their gradients in backward, so all keep the same weights; FSDP (--fsdp) instead
# gives each 1/N of the weights, gradients and AdamW moments, and gathers a block's weights when it runs.


def join_process_group(device, device_type):
    """(distributed, rank, world_size, device): torchrun's processes (one per GPU) join one group of them."""
    if "RANK" not in os.environ:  # a plain `python train_gpt2.py`: rank 0 of 1
        return False, 0, 1, device
    rank, local_rank, world_size = torchrun_ranks(device_type)  # from RANK, LOCAL_RANK and WORLD_SIZE
    if device_type == "cuda":
        device = f"cuda:{local_rank}"  # one GPU per process: the local rank numbers them on each machine
        torch.cuda.set_device(device)
    # NCCL carries GPU tensors; gloo the CPU ones (a CPU run's, and --cpu_offload's state and checkpoints on a GPU run)
    dist.init_process_group(backend="cuda:nccl,cpu:gloo" if device_type == "cuda" else "gloo")
    return True, rank, world_size, device


def batch_arithmetic(cfg, world_size, start_step=0):
    """(cfg with total_batch_size, a step's tokens, filled in; micro-batches a step): it must divide if it trains."""
    tokens_per_micro_step = cfg.B * cfg.T * world_size
    total_batch_size = cfg.total_batch_size or tokens_per_micro_step
    if total_batch_size % tokens_per_micro_step and start_step < cfg.max_steps and not cfg.eval_only:
        raise SettingError(f"--total_batch_size {total_batch_size} is not a multiple of B*T*processes "
                           f"= {cfg.B}*{cfg.T}*{world_size} = {tokens_per_micro_step}")
    return replace(cfg, total_batch_size=total_batch_size), total_batch_size // tokens_per_micro_step


def make_model(cfg, ckpt, ckpt_path, fsdp_wrapped, device_type):
    """The model to train: a checkpoint's (its model_config), a fresh one, or OpenAI's weights.
    Sharded, only rank 0 makes it; the others get its shape now and their shards of it in shard_model."""
    if not builds_the_model(fsdp_wrapped):  # FSDP's other processes: rank 0's shape, on the meta device
        with torch.device("meta"):
            model = GPT(from_rank0(None))  # (the GPTConfig rank 0 sends below)
    elif ckpt is not None:
        model = GPT(GPTConfig(**{**ckpt["model_config"], "sdpa": cfg.sdpa}))
        load_weights(model, ckpt, ckpt_path)
    elif cfg.init_from == "scratch":
        model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, sdpa=cfg.sdpa))
    else:
        model = GPT.from_pretrained(cfg.init_from, vocab_size=cfg.vocab_size, sdpa=cfg.sdpa)
    if fsdp_wrapped and builds_the_model(fsdp_wrapped):
        from_rank0(model.config)  # rank 0 sends its shape to the others' from_rank0(None)
    check_block_size(cfg, model.config.block_size)  # T within the position table
    model.activation_checkpointing = cfg.activation_checkpointing  # (how this run trains it: not kept with it)
    model.loss_in_chunks = device_type == "cpu"  # where RAM runs out first (docs/performance.md)
    return model


def make_loader(cfg, split, rank, world_size):
    """The loader of one split, "train" or "val"; for "val", None when the data has too little for a batch."""
    source = dict(data_dir=cfg.data_dir, shuffle=cfg.shuffle, seed=cfg.seed) if cfg.data_dir else \
        dict(input_file=cfg.input_file)
    try:
        return DataLoaderLite(cfg.B, cfg.T, split=split, process_rank=rank, num_processes=world_size, **source)
    except ValueError as e:  # too little data (a damaged shard is an OSError: the run stops)
        if split == "train":
            raise
        print0(f"no validation: {e}")  # train without
        return None


# -----------------------------------------------------------------------------
# The run: one optimizer step's gradients, evaluation, what a checkpoint holds; train() sets up, training_loop steps


def forward_backward(model, raw_model, loader, grad_accum_steps, autocast, scaler, device):
    """One step's gradients, accumulated over micro-batches; returns the mean loss, on the device (no .item(): no wait
    for the GPU). `model` runs the step (compiled, DDP-wrapped); `raw_model` is the module (FSDP's switch is there)."""
    loss_accum = torch.zeros((), device=device)
    for micro_step in range(grad_accum_steps):
        x, y = loader.next_batch()
        x, y = x.to(device), y.to(device)  # (B, T) each
        # DDP and FSDP average gradients across processes in backward. Only the last micro-batch needs that; on
        # the others, DDP's no_sync (it must wrap forward too) and FSDP's set_gradient_sync skip it.
        syncing = micro_step == grad_accum_steps - 1
        set_gradient_sync(raw_model, syncing)  # (FSDP only; --cpu_offload syncs each micro-batch: they add up in RAM)
        with model.no_sync() if isinstance(model, DDP) and not syncing else contextlib.nullcontext():
            with autocast:
                _, loss = model(x, y)
            # gradients add up over micro-batches; dividing makes their sum the big batch's mean
            loss = loss / grad_accum_steps
            loss_accum += loss.detach()
            scaler.scale(loss).backward()
    return loss_accum


@torch.no_grad()
def estimate_val_loss(model, loader, n_batches, device, autocast):
    """Mean loss of n_batches batches from the start of `loader` (each rank's; the same every time), over all ranks."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(n_batches):
        x, y = loader.next_batch()
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        total += loss.float()
    model.train()
    val_loss = total / n_batches
    if dist.is_initialized():
        dist.all_reduce(val_loss, op=dist.ReduceOp.AVG)  # each rank read its own part of the batches
    return val_loss.item()


def evaluate(model, val_loader, hellaswag_items, step, cfg, device, autocast):
    """The validation loss (and HellaSwag with --hellaswag) over all ranks: printed, and returned for the log."""
    results = {}
    if val_loader is not None:  # eval_iters steps of total_batch_size tokens (or the split's whole steps): any B, GPUs
        n_batches = validation_batches(val_loader, cfg.eval_iters, cfg.total_batch_size)  # each rank's
        results["val_loss"] = estimate_val_loss(model, val_loader, n_batches, device, autocast)
    if hellaswag_items is not None:  # (resumable: with --eval_only, a killed pass continues where it stopped)
        results.update(accuracy_across_ranks(model, hellaswag_items, device, autocast, resumable=cfg.eval_only))
    if results:  # (a run without validation data or HellaSwag has nothing to say)
        print0(describe_evaluation(step, results))
    return results


def write_checkpoint(model, optimizer, scaler, steps_done, cfg, train_loader, sample_generator, master):
    """Rank 0 writes out_dir/ckpt.pt: everything an exact resume needs, not the weights alone, and the settings."""
    if not (master or cfg.fsdp):  # (under FSDP every process takes part: the state is gathered from all)
        return
    state = {
        # whole tensors (FSDP: gathered from the shards), named as the plain module's (no "module." or "_orig_mod.")
        "model": full_model_state(model),
        "optimizer": full_optimizer_state(model, optimizer),  # AdamW's exp_avg and exp_avg_sq of every weight
        "steps_done": steps_done,  # the next step to run
        "model_config": asdict(model.config),  # the shape: a checkpoint rebuilds its own model
        "train_config": asdict(cfg),
        "train_loader": train_loader.state_dict(),  # epoch, shard (and its file name) and position
        "rng": get_rng_state(sample_generator),  # Python, NumPy, torch (CUDA) and sampling streams
        "scaler": scaler.state_dict(),  # float16's loss scale (empty for bf16 and float32)
    }
    if master:
        save_checkpoint(state, os.path.join(cfg.out_dir, "ckpt.pt"))  # atomically: the last one stays intact


def stop_mid_run(model, optimizer, scaler, steps_done, cfg, train_loader, sample_generator, master, log):
    """A stop signal mid-run: save the steps done for --resume (none over another run's checkpoint). Returns 130."""
    if log.keeps_other_checkpoint:  # this run saved nothing yet, over another run's checkpoint: keep that one whole
        return stopped_before_saving(steps_done, cfg.out_dir)
    write_checkpoint(model, optimizer, scaler, steps_done, cfg, train_loader, sample_generator, master)
    log.checkpointed()
    return stopped_after_saving(steps_done, cfg.out_dir)  # (then the loop's `with` closes the log, restores handlers)


def train(cfg, flags_given, distributed, rank, world_size, device, device_type):
    """Set up the run (checkpoint, model, data, optimizer), then training_loop; or only evaluate, or only sample."""
    master = rank == 0  # rank 0 prints, logs and saves
    fsdp_wrapped = cfg.fsdp or cfg.cpu_offload  # FSDP2 holds the state (--cpu_offload: in RAM, one process too)
    dtype, autocast, scaler = make_precision(cfg.dtype, device_type, fsdp_wrapped)
    print0(f"device {device} | dtype {str(dtype).replace('torch.', '')} | processes {world_size}")
    ckpt, ckpt_path, cfg = starting_checkpoint(cfg, flags_given, world_size)  # cfg gets its shape (resumed: B, T, data)
    hellaswag_items = load_items_across_ranks(cfg.hellaswag, cfg.block_size) if cfg.hellaswag else None
    start_step = ckpt["steps_done"] if cfg.resume else 0
    cfg, grad_accum_steps = batch_arithmetic(cfg, world_size, start_step)  # (a resume keeps its run's, any B or GPUs)
    # evaluation, sampling and checkpoints use this module, never the compiled or DDP-wrapped one
    raw_model = make_model(cfg, ckpt, ckpt_path, fsdp_wrapped, device_type)
    print0(describe_model(raw_model, cfg, start_step, ckpt))
    print0(plan_memory(raw_model, cfg, world_size, device, dtype, start_step))  # (a CPU: raises if RAM can't hold it)
    if fsdp_wrapped:  # each process keeps 1/N of the state (in RAM with --cpu_offload) and joins every forward
        shard_model(raw_model, raw_model.transformer.h, device, cfg.cpu_offload)
    else:
        raw_model.to(device)
    sample_generator = torch.Generator().manual_seed(cfg.seed + rank)  # apart from training's stream
    if cfg.eval_only:  # the evaluation that ends a run, once; nothing trained, nothing written to out_dir
        val_loader = make_loader(cfg, "val", rank, world_size)  # (the data may have no training split)
        if not evaluate(raw_model, val_loader, hellaswag_items, start_step, cfg, device, autocast):
            raise SettingError("nothing to evaluate: the data has no validation batch, and --hellaswag is not set")
        return 0
    if start_step >= cfg.max_steps:  # nothing to train: sample, and --export_dir (e.g. --init_from gpt2 --max_steps 0)
        return finish_run(raw_model, cfg, device, autocast, sample_generator, master, trained=False)
    train_loader, val_loader = make_loader(cfg, "train", rank, world_size), make_loader(cfg, "val", rank, world_size)
    print0(describe_data(cfg, train_loader, val_loader, world_size, grad_accum_steps))
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.lr, device_type)  # (after sharding: its shards)
    print0(describe_plan(cfg, raw_model, start_step))  # what the run will write, and how big
    if cfg.resume:  # the optimizer's moments, the loss scale, the data's position and the random streams, as they were
        restore_training_state(ckpt, ckpt_path, raw_model, optimizer, scaler, train_loader, sample_generator)
    del ckpt  # free the CPU copy (or the file's mapping)
    model = compile_model(raw_model, cfg.B, cfg.T, device, autocast) if cfg.compile else raw_model
    if distributed and not fsdp_wrapped:  # DDP averages gradients across processes during backward
        model = DDP(model, device_ids=[torch.device(device).index] if device_type == "cuda" else None,
                    **buffers_not_resent())  # (the buffers, the causal masks, never change: no resending)
    return training_loop(cfg, start_step, model, raw_model, optimizer, scaler, train_loader, val_loader,
                         hellaswag_items, sample_generator, grad_accum_steps, master, device, autocast)


def training_loop(cfg, start_step, model, raw_model, optimizer, scaler, train_loader, val_loader, hellaswag_items,
                  sample_generator, grad_accum_steps, master, device, autocast):
    """Steps to max_steps, each: evaluate and save when due, update the weights, print its line, log its record."""
    min_lr = cfg.lr if cfg.min_lr is None else cfg.min_lr
    # MFU, model FLOPs utilization: the FLOPs a process's tokens need, per second, over its GPU's bf16 peak
    flops_per_token, peak_tflops = raw_model.flops_per_token(cfg.T), bf16_peak_tflops(device)
    step_times = []  # (step_line's median step and time left)
    with RunLog(cfg, start_step) as log, StopRequested(log) as stop:  # Ctrl-C/SIGTERM: stop.requested, saved below
        # step s's record (log.jsonl): the losses of the model after s updates, then update s's lr, norm, tokens
        for step in range(start_step, cfg.max_steps + 1):
            done = step == cfg.max_steps  # all steps done: evaluate and save the trained model, then stop
            record = {"step": step}
            if step % cfg.eval_interval == 0 or done:  # step 0 too: from scratch, about ln(V) = 10.8
                record.update(evaluate(raw_model, val_loader, hellaswag_items, step, cfg, device, autocast))
            if done:  # the trained model's record before its checkpoint: a stop while that is written keeps it
                log.write({**record, "peak_memory_bytes": largest_peak_memory(device)}, picture=True)  # (all ranks')
            if done or checkpoint_due(step, start_step, cfg.checkpoint_interval):
                write_checkpoint(raw_model, optimizer, scaler, step, cfg, train_loader, sample_generator, master)
                log.checkpointed()  # (a fresh run's log now replaces the other run's, if any: see RunLog)
            if done:
                break
            if cfg.sample_interval and step > 0 and step % cfg.sample_interval == 0:
                print_samples(raw_model, cfg, device, autocast, sample_generator)  # (finish_run samples the last)
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = forward_backward(model, raw_model, train_loader, grad_accum_steps, autocast, scaler, device)
            if dist.is_initialized():  # for the log: each process saw its part of the batch, whose loss is their mean
                dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones (float16 only: else a no-op)
            norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)  # (FSDP: over all shards)
            lr = get_lr(step, cfg.lr, min_lr, cfg.warmup_steps, cfg.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            scaler.step(optimizer)  # optimizer.step(), skipped if float16 gradients overflowed
            scaler.update()
            synchronize(device)  # the GPU runs ahead of Python: all its work is done before the clock
            dt = time.perf_counter() - t0
            loss, norm = loss.item(), norm.item()
            stop_now = stop_requested_anywhere(stop.requested, device)  # every process stops after the same step
            check_finite(loss, norm, scaler.is_enabled(), step, cfg.out_dir)  # (inf or nan: stop before saving it)
            record.update(loss=loss, lr=lr, norm=norm, ms=dt * 1000, tok_per_s=cfg.total_batch_size / dt,
                          tokens=(step + 1) * cfg.total_batch_size,
                          **hardware_use(flops_per_token, cfg.B * cfg.T * grad_accum_steps, dt, peak_tflops))
            step_times.append(dt)
            print0(step_line(record, step_times, cfg.max_steps))
            log.write(record, picture=step % cfg.eval_interval == 0 or stop_now)  # progress.png: at evaluations, a stop
            if stop_now and step + 1 < cfg.max_steps:  # (in the last step: the next pass saves, finish_run returns 130)
                return stop_mid_run(raw_model, optimizer, scaler, step + 1, cfg, train_loader, sample_generator,
                                    master, log)
    return finish_run(raw_model, cfg, device, autocast, sample_generator, master, trained=True, stopped=stop.requested)


def main(argv=None):
    cfg, flags_given = parse_args(TrainConfig, argv)  # (flags_given: those typed, which a checkpoint's must match)
    try:
        check_config(cfg)
        device, device_type = resolve_device(cfg.device)
        cpu_allocator_for(device_type, cfg.fsdp)  # CPUs: freed memory kept for the next step, or (FSDP) given back
        distributed, rank, world_size, device = join_process_group(device, device_type)
        check_fsdp(cfg.fsdp, cfg.cpu_offload, world_size, device_type)  # on CUDA or CPUs; --fsdp: 2+ processes
        check_data(cfg, flags_given)  # before anything heavy (--resume: the run's data, once its checkpoint is read)
        seed_everything(cfg.seed)
        torch.set_float32_matmul_precision("high")  # float32 matmuls in TF32 on Ampere+ GPUs (bf16 ones are unaffected)
        with attention_kernels(device_type), sigterm_stops_at_once():  # (cuDNN's attention first on Hopper GPUs)
            code = train(cfg, flags_given, distributed, rank, world_size, device, device_type)
        if distributed:
            dist.barrier()  # no rank leaves while rank 0 still samples or saves (that can abort the group)
        return code
    except (ValueError, OSError, TrainingDiverged) as e:  # exit code 1; under torchrun one line, not one per process
        return say_error(e)
    except RuntimeError as e:  # out of GPU memory or RAM; or, under torchrun, a collective whose peer stopped first
        if out_of_memory(e):  # what ran out, and what to change (processes of one shape run out alike)
            return say_error(describe_out_of_memory(e, cfg, device), every_process=True)
        return another_process_stopped(e)  # one line (any other error: raised again, with its traceback)
    except KeyboardInterrupt as e:  # Ctrl-C/SIGTERM outside the loop, or a second in it: stop at once, without saving
        return stopped_at_once(e, cfg.out_dir)
    finally:
        if dist.is_initialized():
            gc.collect()  # FSDP's modules (in reference cycles) hold the group: free them before it goes
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
