"""
Sharding: FSDP2 (torch's fully_shard) for models whose state does not fit one GPU beside the
activations, and the full state dicts that make a checkpoint the same file in every mode (one
process, DDP, FSDP), so a run saved in one resumes in another. train_gpt2.py shards its model with
--fsdp and builds each checkpoint's weights and optimizer state here.
"""

from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard

# whole tensors, on the CPU: a GPU never holds a second copy of the model to save it
FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def check_fsdp(fsdp, world_size, device_type):
    if not fsdp:
        return
    if world_size < 2:
        raise ValueError("--fsdp splits the model's state across processes: start two or more with torchrun, "
                         "e.g. torchrun --standalone --nproc_per_node=2 train_gpt2.py --fsdp")
    if device_type == "mps":
        raise ValueError("--fsdp needs CUDA GPUs (or CPU processes): MPS has no process group to shard over")


def shard_model(model, blocks):
    """FSDP2, in place: each Block is a unit whose weights are gathered from all processes just before
    it computes and freed after; the root unit holds the rest (embeddings, ln_f, the tied lm_head).
    Each process keeps 1/N of every parameter, its gradient and its AdamW moments.

    Precision: the run's bf16 autocast, as without FSDP, not FSDP2's MixedPrecisionPolicy. Parameters
    and gradients stay float32, so gradients are reduced in float32 and the numbers are those of DDP;
    the price is gathering float32 weights, twice the bytes of bf16 ones."""
    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def full_model_state(model):
    """The model's state_dict as whole CPU tensors. Under FSDP it is gathered from every process (all
    must call this; rank 0 gets the tensors, the others {}); otherwise it is the module's own."""
    if not isinstance(model, FSDPModule):
        return model.state_dict()
    state = get_model_state_dict(model, options=FULL_ON_CPU)
    if "lm_head.weight" in state:  # tied to the token table: one tensor, saved once, as without FSDP
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def full_optimizer_state(model, optimizer):
    """AdamW's state keyed by parameter names, as whole CPU tensors, in every mode alike (under FSDP
    gathered as full_model_state is). torch's plain optimizer.state_dict() numbers the parameters
    instead, and a sharded model cannot load that: it would silently start from fresh moments."""
    sharded = isinstance(model, FSDPModule)  # (unsharded: the tensors themselves, no copy, as state_dict())
    return get_optimizer_state_dict(model, optimizer, options=FULL_ON_CPU if sharded else StateDictOptions())


def load_optimizer_state(model, optimizer, state):
    """Put full_optimizer_state's dict back, sharded or not. Checkpoints from before it numbered the
    parameters: a plain optimizer still loads those; a sharded one would ignore them without a word."""
    if state["state"] and all(isinstance(k, int) for k in state["state"]):
        if isinstance(model, FSDPModule):
            raise ValueError("this checkpoint numbers its optimizer state (written before --fsdp existed): "
                             "resume it once without --fsdp, which saves it by parameter name")
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def set_gradient_sync(model, syncing):
    """FSDP2's no_sync: with syncing False, backward keeps this process's gradients to add the next
    micro-batch's to, and reduces them across processes only once syncing is True again."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(syncing)
