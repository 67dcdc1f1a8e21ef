"""--activation_checkpointing's settings (machinery/recompute.py): each gives the gradients of no
checkpointing; each recomputes in backward what it says (counted operator by operator) and keeps for
backward what it says (measured: the bytes glibc holds after forward); the command line takes each."""

import ctypes
import gc
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from machinery.command_line import parse_args
from machinery.hardware import glibc
from machinery.memory import activation_bytes
from machinery.recompute import MODES
from train_gpt2 import GPT, GPTConfig, TrainConfig

B, T, C = 4, 128, 128


def model(n_layer, mode):
    torch.manual_seed(0)  # the same weights for every setting
    gpt = GPT(GPTConfig(n_layer=n_layer, n_head=4, n_embd=C, block_size=T))
    gpt.activation_checkpointing = mode
    return gpt


def batch():
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 50257, (B, T), generator=g) for _ in range(2))


@pytest.mark.parametrize("mode", MODES[1:])
def test_each_setting_gives_the_gradients_of_no_checkpointing(mode):
    """float32 on the CPU: recomputing runs the same operators on the same inputs (to 1e-6, relative)."""
    x, y = batch()
    grads = {}
    for m in ("none", mode):
        gpt = model(4, m)
        loss = gpt(x, y)[1]
        loss.backward()
        grads[m] = [p.grad for p in gpt.parameters()]
    for reference, recomputed in zip(grads["none"], grads[mode]):
        torch.testing.assert_close(recomputed, reference, rtol=1e-6, atol=1e-9)


class CountOperators(TorchDispatchMode):
    """Counts the aten operators that run while it is active."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


# (setting, blocks, those run again in backward, and whether they recompute their matmuls and attention)
RECOMPUTED = [("none", 4, 0, False), ("full", 4, 4, True), ("every_other", 4, 2, True), ("selective", 4, 4, False),
              ("every_other", 3, 2, True)]  # (blocks 0 and 2 of 3: from the first, not the second)


@pytest.mark.parametrize("mode, n_layer, again, matmuls", RECOMPUTED)
def test_each_setting_runs_again_in_backward_what_it_says(mode, n_layer, again, matmuls):
    """Backward of a Linear layer needs only mm (addmm is forward's), and attention's backward has its own
    kernel, so addmm, attention's forward, layer norm's forward and GELU in backward are recomputation:
    full recomputes each block (but its last Linear, whose output backward does not read: torch stops
    the recomputation once it has what backward needs); selective only the layer norms and GELU, keeping
    matmuls and attention; every_other recomputes blocks 0 and 2 as full does."""
    x, y = batch()
    gpt = model(n_layer, mode)
    loss = gpt(x, y)[1]
    with CountOperators() as ops:
        loss.backward()
    layer_norms, gelus = ops.counts["native_layer_norm"], ops.counts["gelu"]
    linears, attentions = ops.counts["addmm"], ops.counts["_scaled_dot_product_flash_attention_for_cpu"]
    assert (layer_norms, gelus) == (2 * again, again)
    assert (linears, attentions) == ((3 * again, again) if matmuls else (0, 0))


class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def bytes_in_use():
    """What glibc's malloc has handed out and not taken back (its heaps and its mmapped blocks): the CPU's
    tensors, counted exactly, and the same on every run."""
    libc = glibc()
    libc.mallinfo2.restype = Mallinfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def kept_for_backward(n_layer, mode):
    """The bytes a forward pass leaves held (what backward will read), float32."""
    gpt = model(n_layer, mode)
    gpt.loss_in_chunks = True  # as on CPUs: no logits
    x, y = batch()
    gpt(x, y)[1].backward()  # once first: lazily made things (kernels' caches) are not counted
    gpt.zero_grad(set_to_none=True)
    gc.collect()  # what earlier tests left in reference cycles goes now, not mid-measurement (a negative count)
    gc.disable()
    try:
        before = bytes_in_use()
        loss = gpt(x, y)[1]
        held = bytes_in_use() - before
    finally:
        gc.enable()
    loss.backward()
    return held


@pytest.mark.skipif(glibc() is None or not hasattr(glibc(), "mallinfo2"), reason="needs glibc 2.33's mallinfo2")
@pytest.mark.parametrize("mode", MODES)
def test_each_setting_keeps_for_backward_what_the_memory_estimate_says(mode):
    """Four blocks more (8 against 4) keep this many more bytes after forward, per channel per token per
    block: measured, against the start line's estimate (machinery/memory.py, float32: twice bf16's bytes;
    it counts what bf16 keeps on a GPU, so float32's inputs count 8 where they hold 4) within 6.4 bytes,
    a tenth of what a block keeps without checkpointing. Measured here: none 64.7, selective 44.6,
    every_other 34.6, full 4.4; estimated 64, 48, 36, 8."""
    per_block = B * T * C * 4
    measured = (kept_for_backward(8, mode) - kept_for_backward(4, mode)) / per_block
    config = GPTConfig(n_layer=8, n_head=4, n_embd=C, block_size=T)
    estimated = (activation_bytes(config, B, T, mode, float32=True, loss_in_chunks=True) -
                 activation_bytes(GPTConfig(n_layer=4, n_head=4, n_embd=C, block_size=T), B, T, mode, float32=True,
                                  loss_in_chunks=True)) / per_block
    print(f"{mode}: measured {measured:.1f}, estimated {estimated:.1f} bytes a channel a token a block")
    assert measured == pytest.approx(estimated, abs=6.4)


def test_true_and_false_the_flags_values_before_it_had_settings_still_mean_full_and_none():
    x, y = batch()
    counts = {}
    for mode in (True, "full", False, "none"):
        gpt = model(4, mode)
        loss = gpt(x, y)[1]
        with CountOperators() as ops:
            loss.backward()
        counts[mode] = ops.counts
    assert counts[True] == counts["full"] and counts[False] == counts["none"] and counts[True] != counts[False]
    config = GPTConfig(n_layer=8, n_head=4, n_embd=C, block_size=T)
    assert activation_bytes(config, B, T, True) == activation_bytes(config, B, T, "full")
    assert activation_bytes(config, B, T, False) == activation_bytes(config, B, T, "none")


def test_the_command_line_takes_each_setting_and_the_bare_flag_for_full():
    assert parse_args(TrainConfig, [])[0].activation_checkpointing == "none"
    assert parse_args(TrainConfig, ["--activation_checkpointing"])[0].activation_checkpointing == "full"
    assert parse_args(TrainConfig, ["--activation_checkpointing", "--B", "2"])[0].activation_checkpointing == "full"
    for mode in MODES:
        assert parse_args(TrainConfig, ["--activation_checkpointing", mode])[0].activation_checkpointing == mode
        assert parse_args(TrainConfig, [f"--activation_checkpointing={mode}"])[0].activation_checkpointing == mode
    assert parse_args(TrainConfig, ["--activation_checkpointing", "--no-activation_checkpointing"])[0] \
        .activation_checkpointing == "none"
    # its values from when it was a boolean (issue 19) mean what they meant: true the bare flag's full, false none
    for word, mode in (("true", "full"), ("Yes", "full"), ("1", "full"), ("false", "none"), ("off", "none")):
        assert parse_args(TrainConfig, ["--activation_checkpointing", word])[0].activation_checkpointing == mode
        assert parse_args(TrainConfig, [f"--activation_checkpointing={word}"])[0].activation_checkpointing == mode
