"""
Activation checkpointing (--activation_checkpointing): which blocks run again in backward, and what each
keeps meanwhile. GPT.forward wraps block i in torch.utils.checkpoint.checkpoint when recomputed(mode, i),
with checkpoint_options(mode). The modes, from most memory to least (docs/memory.md has the figures):

- none: every block keeps all it made for backward (about 32 bytes a channel a token in bf16).
- selective: every block keeps the outputs of its matmuls and of attention (the work that costs FLOPs;
  in bf16, 2 bytes for each of 3 + 1 + 4 + 1 + 1 channels: 20) and its input (4), and recomputes the
  rest in backward (layer norms, GELU, residual adds, bf16 casts: elementwise work that costs memory
  traffic, not FLOPs). torch's selective checkpointing, with a policy by operator. (It keeps the last
  matmul's output too, which backward does not read: a policy by operator cannot tell it apart.)
- every_other: blocks 0, 2, 4, ... keep only their input and run again, whole, in backward; the
  others keep everything: about half the saving of full for half its recomputation.
- full: every block keeps only its float32 input (4 bytes) and runs again, whole, in backward: the
  least memory, for one more forward pass of the blocks (a third more FLOPs; measured on an H200 at
  GPT-2 1.5B, a fifth of the step: 46% MFU without, 37% with).
"""

from torch import ops
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

MODES = ("none", "selective", "every_other", "full")  # from most memory to least

# The operators whose outputs a block keeps under "selective": Linear layers' matmuls (addmm with a bias,
# mm without), the explicit attention's batched matmuls (--no-sdpa), and fused attention as each device's
# kernel names it (its output and the softmax statistics its backward needs).
KEPT_BY_SELECTIVE = {ops.aten.mm.default, ops.aten.addmm.default, ops.aten.bmm.default,
                     ops.aten._scaled_dot_product_flash_attention.default,
                     ops.aten._scaled_dot_product_efficient_attention.default,
                     ops.aten._scaled_dot_product_cudnn_attention.default,
                     ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
                     ops.aten._scaled_dot_product_attention_math_for_mps.default}


def setting(mode):
    """The setting's name: True and False, the values of --activation_checkpointing before it had
    settings (and of GPT.activation_checkpointing), stand for full and none."""
    return {True: "full", False: "none"}.get(mode, mode)


def recomputed(mode, index):
    """Whether block `index` runs again in backward under `mode` (one of MODES)."""
    mode = setting(mode)
    return mode in ("full", "selective") or (mode == "every_other" and index % 2 == 0)


def checkpoint_options(mode):
    """The keyword arguments for torch.utils.checkpoint.checkpoint under `mode`: for selective, a
    context_fn, which makes the contexts that apply the policy below; otherwise none, and checkpoint keeps
    only the block's input. (Not context_fn=torch's own default: torch.compile cannot trace that one when
    it is passed explicitly, only a context_fn that makes a policy's contexts.)"""
    return {"context_fn": selective_contexts} if setting(mode) == "selective" else {}


def selective_contexts():
    return create_selective_checkpoint_contexts(keep_matmuls)


def keep_matmuls(ctx, op, *args, **kwargs):
    """The policy, asked for every operator a checkpointed block runs in forward: keep its output, or
    run it again in backward."""
    return CheckpointPolicy.MUST_SAVE if op in KEPT_BY_SELECTIVE else CheckpointPolicy.PREFER_RECOMPUTE
