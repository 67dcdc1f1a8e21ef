"""
Checkpoint files: written atomically, read safely (tensors and plain data only) with one-line errors,
checked against the command line, and the random streams they carry. What a checkpoint holds is said
in train_gpt2.py (write_checkpoint); this module writes, reads and checks the file.
"""

import os
import random
import warnings
from dataclasses import replace

import numpy as np
import torch

from machinery.files import DiskFull, first_line, write_atomically
from machinery.sharding import load_optimizer_state

# the keys every checkpoint has (train_gpt2.write_checkpoint); "steps_done" was "step" before 2026-12
CHECKPOINT_KEYS = ("model", "optimizer", "steps_done", "model_config", "train_config", "train_loader", "rng")
# the settings a checkpoint decides: its model's shape, and for a resume what the model started from
SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


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


def disk_full_hint(path):
    """What to do after a full disk stopped a run whose checkpoint is `path`: resume from it, or, when it
    has none yet (None: the one there is another run's), start again."""
    if path and os.path.isfile(path):
        return "the last checkpoint is intact: free some space and continue with --resume"
    return "no checkpoint was saved yet: free some space and run the same command again"


SAVED_HERE = set()  # the checkpoints this process wrote: a fresh run's own, not another run's it replaces


def save_checkpoint(state, path):
    """Write atomically: a crash or a full disk mid-write leaves the previous checkpoint as it was."""
    try:
        write_atomically(path, lambda f: torch.save(state, f))
    except DiskFull as e:
        ours = state.get("train_config", {}).get("resume") or os.path.abspath(path) in SAVED_HERE
        raise DiskFull(f"{e}; {disk_full_hint(path if ours else None)}") from None
    SAVED_HERE.add(os.path.abspath(path))


def load_checkpoint(path, missing="no checkpoint to resume from", mmap=False, resume=False):
    """Load a checkpoint on the CPU (a resume never holds two copies in GPU memory). weights_only:
    tensors and plain containers only, so loading a file can never run code from it. mmap: the tensors
    stay in the file until read (under FSDP each process reads only its shards of them). resume: its
    training state is checked too, not only its model."""
    if not os.path.isfile(path):
        raise ValueError(f"{missing} at {path!r}")
    try:
        with warnings.catch_warnings():  # a foreign pickle also gets a multi-line warning: we say it once
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except PermissionError as e:
        raise ValueError(f"cannot read {path!r}: {e.strerror}") from None
    except Exception as e:
        if str(e).startswith("Weights only load failed"):
            raise ValueError(f"{path!r} is not a train_gpt2 checkpoint: not tensors and plain data "
                             "(a pickle of anything else is refused: loading it could run code)") from None
        raise ValueError(f"{path!r} is not a readable checkpoint (truncated or corrupt?): {first_line(e)}") from None
    if isinstance(ckpt, dict) and "step" in ckpt and "steps_done" not in ckpt:
        ckpt["steps_done"] = ckpt.pop("step")  # the key's name before 2026-12
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        raise ValueError(f"{path!r} is not a train_gpt2 checkpoint")
    problem = checkpoint_problem(ckpt, resume)
    if problem:
        raise ValueError(f"{path!r} is not a usable train_gpt2 checkpoint: {problem}")
    return ckpt


def whole(value, least=0):
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def checkpoint_problem(ckpt, resume):
    """What in the checkpoint's plain parts is not as write_checkpoint makes them (a hand-edited or
    foreign file), or None: said here in one line, not as a TypeError deep in the run. Only a resume
    reads the training state (its batch, data position, optimizer and random streams)."""
    numbers = {"steps_done": (ckpt, 0), **{f"model_config {name}": (ckpt["model_config"], 1) for name in SHAPE}}
    if resume:
        numbers.update({"train_config B": (ckpt["train_config"], 1), "train_config T": (ckpt["train_config"], 1),
                        "train_config total_batch_size": (ckpt["train_config"], 0)})
        numbers.update({f"train_loader {name}": (ckpt["train_loader"], 0) for name in ("epoch", "shard", "position")})
    for where, (part, least) in numbers.items():
        if not isinstance(part, dict):
            return f"{where.split()[0]} is a {type(part).__name__}, not a dict"
        optional = where.startswith("train_loader") or where.endswith("total_batch_size")  # (older files lack them)
        value = part.get(where.split()[-1], 0 if optional else None)
        if not whole(value, least):
            return f"{where} is {value!r}, not a whole number >= {least}"
    unknown = set(ckpt["model_config"]) - {*SHAPE, "sdpa"}
    if unknown:
        return f"model_config has {', '.join(sorted(map(str, unknown)))}, which GPTConfig does not"
    if not resume:
        return None
    if not isinstance(ckpt["train_loader"].get("file"), (str, type(None))):
        return f"train_loader file is {ckpt['train_loader']['file']!r}, not a shard's file name"
    for name, keys in (("optimizer", ("state", "param_groups")), ("rng", ("python", "numpy", "torch", "sample"))):
        if not isinstance(ckpt[name], dict) or set(keys) - set(ckpt[name]):
            return f"{name} does not hold {', '.join(keys)}"
    return None


def settings_from_checkpoint(cfg, given, ckpt, path, resume, world_size):
    """cfg with the model's shape (and, resuming, its init_from and batch) taken from the checkpoint. A
    flag the user gave (`given`) that contradicts the checkpoint is an error, all of them named in one line."""
    saved = {**ckpt["train_config"], **ckpt["model_config"]}
    names = SHAPE + (("init_from",) if resume else ())
    clashes = [name for name in names if name in given and getattr(cfg, name) != saved.get(name)]
    if clashes:
        has = ", ".join(f"{name}={saved.get(name)!r}" for name in clashes)
        says = ", ".join(f"{name}={getattr(cfg, name)!r}" for name in clashes)
        raise ValueError(f"checkpoint {path!r} has {has}; the command line says {says} "
                         "(leave these flags out: the checkpoint decides them)")
    cfg = replace(cfg, **{name: saved[name] for name in names if name in saved})
    return resumed_batch(cfg, given, saved, path, world_size) if resume else cfg


def resumed_batch(cfg, given, saved, path, world_size):
    """A resume continues its run: the same tokens a step, in sequences of the same T, of the same data
    unless the command names other. --B may change (the same tokens a step by more or less accumulation:
    the same arithmetic); those two may not."""
    # (checkpoints before 2026-12 may hold 0, "one micro-batch a process": taken as this many processes)
    tokens = saved.get("total_batch_size") or saved["B"] * saved["T"] * world_size
    for name, run_value in (("T", saved["T"]), ("total_batch_size", tokens)):
        if name in given and getattr(cfg, name) != run_value:
            raise ValueError(f"--{name} {getattr(cfg, name)} instead of the run's {run_value}: a resume continues "
                             f"the run as it was; leave --{name} out, or start a new run from these weights "
                             f"with --init_from {path}")
    # the run's data too, unless the command names some (a data_dir run resumed without --data_dir would
    # otherwise read input.txt)
    data = {} if {"data_dir", "input_file"} & set(given) else \
        {name: saved[name] for name in ("data_dir", "input_file") if name in saved}
    return replace(cfg, B=cfg.B if "B" in given else saved["B"], T=saved["T"], total_batch_size=tokens, **data)


def load_weights(model, ckpt, path):
    try:
        model.load_state_dict(ckpt["model"])
    except (TypeError, KeyError, RuntimeError) as e:  # the right keys, but not what we saved
        raise ValueError(f"{path!r} is not a usable train_gpt2 checkpoint: {first_line(e)}") from None


def restore_training_state(ckpt, path, model, optimizer, scaler, train_loader, sample_generator):
    """Put the optimizer, loss scaler, random streams and data position back as the checkpoint saved them."""
    try:  # (what these hold was not checked on loading: one that does not fit this run is one line too)
        load_optimizer_state(model, optimizer, ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], sample_generator)
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
        raise ValueError(f"cannot resume from {path!r}: {first_line(e)}") from None
    restore_data_position(train_loader, ckpt["train_loader"])


def restore_data_position(loader, saved):
    """The loader where the run left it (`saved`: its state_dict): the same shard, found by file name,
    not index (another --B or number of processes changes which short shards shard_files passes over,
    so the shuffled list and its indices change), the same token. A window that no longer fits the
    shard's end (a bigger --B) moves on to the next shard, as the loader itself would. A place this data
    does not have (other data) is an error, before the run's log is touched."""
    shard, token, file = int(saved.get("shard", 0)), int(saved.get("position", 0)), saved.get("file")
    past_the_end = ValueError(f"the checkpoint's data position (shard {shard}, token {token}) is past the "
                              "end of this data's train split; resume with the data the run trained on")
    if file is not None and loader.file is not None:  # (checkpoints before 2026-12-05 name no file)
        files = [os.path.basename(loader.shards[i]) for i in loader.shard_order(int(saved.get("epoch", 0)))]
        if file not in files:  # not in the split, or now too short for one batch
            window = loader.B * loader.T * loader.num_processes + 1
            raise ValueError(f"the checkpoint's shard {file} is not among this data's train shards that hold one "
                             f"batch ({window} tokens); resume with the data and --B the run trained with")
        shard = files.index(file)
    if not 0 <= shard < len(loader.shards):
        raise past_the_end
    loader.load_state_dict({**saved, "shard": shard})
    if token > len(loader.current):
        raise past_the_end
    if loader.position + loader.B * loader.T * loader.num_processes + 1 > len(loader.current):
        loader.advance_shard()  # (the next window would run past the end)


def checkpoint_due(step, start_step, checkpoint_interval):
    """Whether --checkpoint_interval asks for a checkpoint of the model after `step` steps (the loop
    also saves the last step, and on a stop signal)."""
    return bool(checkpoint_interval) and step > start_step and step % checkpoint_interval == 0


def starting_checkpoint(cfg, given, world_size):
    """(the checkpoint a run starts from, its path, cfg with its model shape, and for a resume its batch):
    the run's own with --resume, a ckpt.pt named by --init_from (weights only), else none."""
    if cfg.resume:
        path, missing = os.path.join(cfg.out_dir, "ckpt.pt"), "no checkpoint to resume from"
    elif cfg.init_from.endswith(".pt"):
        path, missing = cfg.init_from, "--init_from: no checkpoint"
    else:
        return None, None, cfg
    ckpt = load_checkpoint(path, missing, mmap=cfg.fsdp or cfg.cpu_offload, resume=cfg.resume)
    return ckpt, path, settings_from_checkpoint(cfg, given, ckpt, path, cfg.resume, world_size)
