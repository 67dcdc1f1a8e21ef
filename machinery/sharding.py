"""
Sharding: FSDP2 (torch's fully_shard) for models whose state does not fit one GPU beside the
activations, CPU offload (FSDP2's CPUOffloadPolicy) for a state that does not fit the GPU at all,
and the full state dicts that make a checkpoint the same file in every mode (one process, DDP, FSDP,
offload), so a run saved in one resumes in another. train_gpt2.py shards its model with --fsdp or
--cpu_offload and builds each checkpoint's weights and optimizer state here (and gives DDP, plain data
parallelism, the one setting it changes: buffers_not_resent).
"""

import inspect

import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from machinery.files import SettingError

# whole tensors, on the CPU: a GPU never holds a second copy of the model to save it
FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def check_fsdp(fsdp, cpu_offload, world_size, device_type):
    if device_type == "mps" and (fsdp or cpu_offload):
        raise SettingError(f"--{'fsdp' if fsdp else 'cpu_offload'} needs CUDA GPUs (or CPU processes): MPS has no "
                           "process group to shard over")
    if fsdp and world_size < 2:
        raise SettingError("--fsdp splits the model's state across processes: start two or more with torchrun, e.g. "
                           "torchrun --standalone --nproc_per_node=2 train_gpt2.py --fsdp (one GPU: --cpu_offload)")
    if cpu_offload and world_size > 1 and not fsdp:
        raise SettingError(f"--cpu_offload with {world_size} processes needs --fsdp too: each process offloads its "
                           "own share of the state")


def builds_the_model(fsdp_wrapped):
    """Whether this process builds the model's weights. Under FSDP only rank 0 does (or loads them) and
    sends them to the others, which build an empty model on the meta device (shapes, no memory): a node
    of 8 GPUs holds one copy of GPT-2 1.5B at the start instead of 8 (5.8 GiB each)."""
    return not fsdp_wrapped or not dist.is_initialized() or dist.get_rank() == 0


def from_rank0(value):
    """Rank 0's `value` (any picklable object, such as a model's config) in every process; in one
    process, `value` itself."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def join_group_of_one(device_type):
    """FSDP needs a process group even in one process (--cpu_offload without torchrun): a group of one,
    kept in this process's memory (no network, no port)."""
    if not dist.is_initialized():
        # (as train_gpt2.join_process_group: the offloaded state is CPU tensors, which NCCL cannot carry)
        dist.init_process_group("cuda:nccl,cpu:gloo" if device_type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)


def shard_model(model, blocks, device, cpu_offload):
    """FSDP2, in place: each Block is a unit whose weights are gathered from all processes just before
    it computes and freed after; the root unit holds the rest (embeddings, ln_f, the tied lm_head).
    Each process keeps 1/N of every parameter, its gradient and its AdamW moments: on `device`, or with
    cpu_offload in the machine's RAM, copied to the GPU a unit at a time for forward and backward, and
    updated there by AdamW on the CPU. Rank 0 built the model (builds_the_model); it sends the others
    their shards.

    The mesh is the run's device, given, never guessed: without one fully_shard picks CUDA whenever
    CUDA exists, and CPU processes (--device cpu) would take GPUs that are not theirs.

    Precision: the run's bf16 autocast, as without FSDP, not FSDP2's MixedPrecisionPolicy. Parameters
    and gradients stay float32, so gradients are reduced in float32 and the numbers are those of DDP;
    the price is gathering float32 weights, twice the bytes of bf16 ones."""
    device_type = device.split(":")[0]
    join_group_of_one(device_type)  # (--cpu_offload in one process)
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    # pinned (page-locked) RAM lets the copies to and from the GPU run asynchronously; CPUs have no GPU to copy to
    policy = CPUOffloadPolicy(pin_memory=device_type == "cuda") if cpu_offload else OffloadPolicy()
    full_state = model.state_dict() if dist.get_rank() == 0 else {}  # (the tensors; sharding copies them)
    for block in blocks:
        fully_shard(block, mesh=mesh, offload_policy=policy)
    fully_shard(model, mesh=mesh, offload_policy=policy)
    model.offloaded = cpu_offload  # (read by set_gradient_sync)
    if dist.get_world_size() > 1:  # rank 0 sends each tensor in turn; each process keeps its shard of it
        if dist.get_rank() != 0:
            model.to_empty(device="cpu" if cpu_offload else device)  # memory for the shards, to be filled
        set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True,
                                                                         broadcast_from_rank0=True))
        send_buffers(model, device)


def send_buffers(model, device):
    """Rank 0's buffers (constants such as the causal mask: not in the state dict, so not sent above) to
    the others, whose buffers to_empty left unset. On `device`, where fully_shard keeps buffers (with
    cpu_offload too: only parameters go to the CPU)."""
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            buffer = buffer.to(device)
            dist.broadcast(buffer, src=0)
            setattr(module, name, buffer)  # (an existing buffer's name: it stays a buffer, not persistent)


def full_model_state(model):
    """The model's state_dict as whole tensors. Under FSDP it is gathered from every process onto the CPU
    (all must call this; rank 0 gets the tensors, the others {}); otherwise it is the module's own, on its
    device (torch.save writes GPU tensors as they are; load_checkpoint maps them to the CPU)."""
    if not isinstance(model, FSDPModule):
        return model.state_dict()
    state = get_model_state_dict(model, options=FULL_ON_CPU)
    if "lm_head.weight" in state:  # tied to the token table: one tensor, saved once, as without FSDP
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def full_optimizer_state(model, optimizer):
    """AdamW's state keyed by parameter names, as whole tensors, in every mode alike (under FSDP
    gathered onto the CPU as full_model_state is). torch's plain optimizer.state_dict() numbers the parameters
    instead, and a sharded model cannot load that: it would silently start from fresh moments."""
    sharded = isinstance(model, FSDPModule)  # (unsharded: the tensors themselves, no copy, as state_dict())
    return get_optimizer_state_dict(model, optimizer, options=FULL_ON_CPU if sharded else StateDictOptions())


def load_optimizer_state(model, optimizer, state):
    """Put full_optimizer_state's dict back, sharded or not: each process takes its own slices of the
    (memory-mapped) tensors. Checkpoints from before it numbered the parameters: a plain optimizer still
    loads those; a sharded one would ignore them without a word."""
    if state["state"] and all(isinstance(k, int) for k in state["state"]):
        if isinstance(model, FSDPModule):
            raise ValueError("this checkpoint numbers its optimizer state (written before --fsdp existed): "
                             "resume it once without --fsdp or --cpu_offload, which saves it by parameter name")
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def set_gradient_sync(model, syncing):
    """FSDP2's no_sync: with syncing False, backward keeps this process's gradients to add the next
    micro-batch's to, and reduces them across processes only once syncing is True again. Offloaded
    (--cpu_offload), every micro-batch's gradients go to the CPU, where they add up: kept on the GPU, a
    whole model's float32 gradients (5.8 GiB for GPT-2 1.5B) would sit there between micro-batches."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(syncing or model.offloaded)


def buffers_not_resent():
    """DDP's setting that stops it sending rank 0's buffers to the others before every forward pass:
    forward_sync_buffers=False from torch 2.13, which deprecates the older broadcast_buffers=False (it
    warns); both still send them once, when DDP wraps the model."""
    renamed = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    return {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
