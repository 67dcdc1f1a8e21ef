"""
Checkpoint files. What a checkpoint holds is said in train_gpt2.py (write_checkpoint); this module does
the rest, in the order a run meets it:
- starting_checkpoint: the checkpoint a run starts from (--resume, or --init_from a ckpt.pt), read
  safely (load_checkpoint: tensors and plain data only, each part checked, one-line errors), and the
  settings it decides (its shape; for a resume, its batch, data and order: resumed_batch).
- load_weights, restore_training_state: the model's weights, then a resumed run's optimizer, loss scale,
  place in the data (restore_data_position) and random streams.
- checkpoint_due, save_checkpoint: when a checkpoint is written, and the atomic write (its RNG: random_streams.py).
"""

import os
import warnings
import zipfile
from dataclasses import replace

import torch

from machinery.command_line import in_recipes
from machinery.files import (DiskFull, SettingError, check_folder_free, first_line, is_whole_number, number_problem,
                             write_atomically)
from machinery.memory import out_of_memory
from machinery.pretrained import check_export_dir, non_finite_weight, pretrained_shape, refuse_small_vocabulary
from machinery.random_streams import set_rng_state
from machinery.run_log import disk_full_hint
from machinery.sharding import load_optimizer_state
from machinery.stopping import SignalsHeld
from machinery.tokens import GPT2_VOCAB_SIZE, check_data, read_manifest

# the keys every checkpoint has (train_gpt2.write_checkpoint); "steps_done" was "step" before 2026-12
CHECKPOINT_KEYS = ("model", "optimizer", "steps_done", "model_config", "train_config", "train_loader", "rng")
# the settings a checkpoint decides: its model's shape (a resume: its init_from too, settings_from_checkpoint)
SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


# -----------------------------------------------------------------------------
# Where a run starts: the checkpoint it reads, and the settings that checkpoint decides


def starting_checkpoint(cfg, given, world_size):
    """(the checkpoint a run starts from, its path, cfg with its model shape, and for a resume its batch):
    the run's own with --resume, a ckpt.pt named by --init_from (weights only), else none (where --init_from
    names OpenAI's weights or a save_pretrained folder, cfg takes their shape as from a checkpoint)."""
    if cfg.resume:
        path, missing = os.path.join(cfg.out_dir, "ckpt.pt"), "no checkpoint to resume from"
    elif names_a_checkpoint(cfg.init_from):
        refuse_fine_tuning_over_its_source(cfg)
        path, missing = cfg.init_from, "--init_from: no checkpoint"
    else:
        return None, None, cfg if cfg.init_from == "scratch" else settings_from_pretrained(cfg, given)
    ckpt = load_checkpoint(path, missing, mmap=cfg.fsdp or cfg.cpu_offload, resume=cfg.resume)
    cfg = settings_from_checkpoint(cfg, given, ckpt, path, cfg.resume, world_size)
    check_export_dir(cfg.export_dir, cfg.init_from)  # (again: a resume's --init_from is the run's, read just now)
    return ckpt, path, cfg


def names_a_checkpoint(init_from):
    """Whether --init_from names a checkpoint file: a .pt name, or any file (a model by name or a
    save_pretrained folder is never one file)."""
    return init_from.endswith(".pt") or os.path.isfile(init_from)


def refuse_fine_tuning_over_its_source(cfg):
    """A run that starts from the very checkpoint it would write (out_dir/ckpt.pt: with the defaults,
    --init_from out/ckpt.pt and no --out_dir) would replace the weights it was given: one line instead."""
    own = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.max_steps and not cfg.eval_only and os.path.isfile(own) and same_setting(cfg.init_from, own):
        raise SettingError(f"--init_from {cfg.init_from} is the checkpoint this run would write over in --out_dir "
                           f"{cfg.out_dir!r}: give this run another --out_dir (or continue that run with --resume)")


def settings_from_pretrained(cfg, given):
    """cfg with the shape of OpenAI's weights (or a save_pretrained folder's), which decide it as a checkpoint
    does: a shape flag typed against it is one line, and so is a vocabulary below GPT-2's (a bigger --vocab_size
    is the same weights, their table padded: kept)."""
    refuse_small_vocabulary(cfg.init_from, "GPT-2's tokens would index past its table")  # (as a checkpoint's)
    shape = pretrained_shape(cfg.init_from)
    if cfg.vocab_size >= shape.get("vocab_size", 0):
        shape.pop("vocab_size", None)
    refuse_clashes(cfg, given, shape, repr(cfg.init_from), "the model")
    return replace(cfg, **shape)  # (block_size: what HellaSwag's items and T must fit, before the weights load)


def settings_from_checkpoint(cfg, given, ckpt, path, resume, world_size):
    """cfg with the model's shape (and, resuming, its init_from and batch) taken from the checkpoint. A
    flag the user gave (`given`) that contradicts the checkpoint is an error, all of them named in one line."""
    saved = {**ckpt["train_config"], **ckpt["model_config"]}
    names = SHAPE + (("init_from",) if resume else ())
    refuse_clashes(cfg, given, {name: saved.get(name) for name in names}, f"checkpoint {path!r}", "the checkpoint")
    cfg = replace(cfg, **{name: saved[name] for name in names if name in saved})
    return resumed_batch(cfg, given, saved, path, world_size, ckpt["steps_done"]) if resume else cfg


def refuse_clashes(cfg, given, decided, source, decider):
    """A flag the user gave (`given`) that contradicts what the model's source decides (`decided`, by
    setting name) is an error, all of them named in one line."""
    clashes = [name for name in decided if name in given and not same_setting(getattr(cfg, name), decided[name])]
    if clashes:
        has = ", ".join(f"{name}={decided[name]!r}" for name in clashes)
        says = ", ".join(f"{name}={getattr(cfg, name)!r}" for name in clashes)
        raise SettingError(f"{source} has {has}; the command line says {says}{in_recipes(given, clashes)} (leave "
                           f"these flags out: {decider} decides them)")


def same_setting(typed, decided):
    """Whether a typed setting agrees with the one decided: two paths to one file or folder do, however written."""
    if isinstance(typed, str) and isinstance(decided, str) and os.path.exists(typed) and os.path.exists(decided):
        return os.path.samefile(typed, decided)
    return typed == decided


def resumed_batch(cfg, given, saved, path, world_size, steps_done):
    """A resume continues its run: the same tokens a step, in sequences of the same T, of the same data
    in the same order unless the command names other. --B may change (the same tokens a step by more or
    less accumulation: the same arithmetic); T and the tokens a step may not."""
    # (checkpoints before 2026-12 may hold 0, "one micro-batch a process": taken as this many processes)
    tokens = saved.get("total_batch_size") or saved["B"] * saved["T"] * world_size
    B = cfg.B if "B" in given else saved["B"]
    typed_tokens = cfg.total_batch_size or B * saved["T"] * world_size  # (0 typed: one micro-batch a process)
    for name, typed, run_value in (("T", cfg.T, saved["T"]), ("total_batch_size", typed_tokens, tokens)):
        if name in given and typed != run_value:
            says = getattr(cfg, name) if typed == getattr(cfg, name) else f"0 (B*T*processes = {typed})"
            raise SettingError(f"--{name} {says}{in_recipes(given, [name])} instead of the run's {run_value}: a resume "
                               f"continues the run as it was; leave --{name} out, or start a new run from these "
                               f"weights with --init_from {path}")
    # the run's data too, unless the command names some (a data_dir run resumed without --data_dir would
    # otherwise read input.txt), in the run's order unless it names another (without the run's --seed, the
    # rest of an epoch's shards would come in another order: some read twice, some not at all)
    data = {} if {"data_dir", "input_file"} & set(given) else \
        {name: saved[name] for name in ("data_dir", "input_file") if name in saved}
    order = {name: saved[name] for name in ("seed", "shuffle") if name in saved and name not in given}
    cfg = replace(cfg, B=B, T=saved["T"], total_batch_size=tokens, **data, **order)
    micro_batch = cfg.B * cfg.T * world_size  # tokens of one forward pass over all processes
    trains = steps_done < cfg.max_steps and not cfg.eval_only  # (evaluating or sampling accumulates nothing)
    if tokens % micro_batch and trains:
        raise SettingError(f"the run's {tokens:,} tokens per step are not a multiple of B*T*processes = "
                           f"{cfg.B}*{cfg.T}*{world_size} = {micro_batch:,}: resume with a --B that makes them one")
    check_data(cfg, steps_done=steps_done)  # the data it will read, now that the checkpoint has said which
    if trains:  # (writes out_dir: another run writing it is said now, before a model is built)
        check_folder_free(cfg.out_dir)
    return cfg


# -----------------------------------------------------------------------------
# Reading the file: tensors and plain data only, each part checked before the run uses it


def load_checkpoint(path, missing="no checkpoint to resume from", mmap=False, resume=False):
    """Load a checkpoint on the CPU (a resume never holds two copies in GPU memory). weights_only:
    tensors and plain containers only, so loading a file can never run code from it. mmap: the tensors
    stay in the file until read (under FSDP each process reads only its shards of them). Its model's
    settings are checked, and for a resume its training state's too."""
    if not os.path.isfile(path):
        machines = int(os.environ.get("WORLD_SIZE", 1)) > int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        raise SettingError(f"{missing} at {path!r}" + (" on this machine (a run across machines needs its out_dir on "
                                                       "a filesystem they share)" if machines and resume else ""))
    try:
        with warnings.catch_warnings():  # a foreign pickle also gets a multi-line warning: we say it once
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except PermissionError as e:
        raise SettingError(f"cannot read {path!r}: {e.strerror}") from None
    except Exception as e:
        if out_of_memory(e):  # (not the file's fault: the one out-of-memory line)
            raise
        if str(e).startswith("Weights only load failed") and not saved_by_torch(path):  # (a text file, say)
            raise SettingError(f"{path!r} is not a checkpoint (not a file torch.save writes)") from None
        if str(e).startswith("Weights only load failed"):
            raise SettingError(f"{path!r} is not a train_gpt2 checkpoint: not tensors and plain data "
                               "(a pickle of anything else is refused: loading it could run code)") from None
        raise SettingError(f"{path!r} is not a readable checkpoint (truncated or corrupt?): {first_line(e)}") from None
    damaged = damaged_record(path)
    if damaged:
        raise SettingError(f"{path!r} is damaged: the bytes of {damaged} no longer match the checksum saved with "
                           "them (a disk or copy error): use an intact copy")
    if isinstance(ckpt, dict) and "step" in ckpt and "steps_done" not in ckpt:
        ckpt["steps_done"] = ckpt.pop("step")  # the key's name before 2026-12
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        raise SettingError(f"{path!r} is not a train_gpt2 checkpoint")
    problem = model_problem(ckpt) or (training_state_problem(ckpt) if resume else None)
    if problem:
        raise SettingError(f"{path!r} is not a usable train_gpt2 checkpoint: {problem}")
    return ckpt


def saved_by_torch(path):
    """Whether the file starts as torch.save's do: a zip archive, or a pickle (torch before 1.6, pickle.dump)."""
    with open(path, "rb") as f:
        return f.read(2) in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def damaged_record(path):
    """The first record (a tensor's bytes, the pickle) whose bytes do not match the CRC-32 torch.save wrote with
    them, or None (torch's format before 1.6 has none). torch.load does not compare them: bits flipped on a disk
    or in a copy would load as other numbers, and a resume would save them on. (0.2 s a GB from the page cache.)"""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:  # (torch.load read it: seldom)
        return f"the archive ({first_line(e)})"


def model_problem(ckpt):
    """What in the settings of the checkpoint's model is not as write_checkpoint makes them (a file
    edited by hand, or another program's), or None: one line here, not a TypeError deep in the run."""
    config = ckpt["model_config"]
    if not is_whole_number(ckpt["steps_done"]):
        return f"steps_done is {ckpt['steps_done']!r}, not a whole number >= 0"
    if problem := number_problem([("model_config", config, name, 1, None) for name in SHAPE]):
        return problem
    unknown = set(config) - {*SHAPE, "sdpa"}
    if unknown:
        return f"model_config has {', '.join(sorted(map(str, unknown)))}, which GPTConfig does not"
    if config["n_embd"] % config["n_head"]:  # (GPT would refuse it with an assert)
        return f"model_config n_embd {config['n_embd']} is not a multiple of its n_head {config['n_head']}"
    if config["vocab_size"] < GPT2_VOCAB_SIZE:  # GPT-2's tokens would index past its table
        return f"model_config vocab_size is {config['vocab_size']}, below the tokenizer's {GPT2_VOCAB_SIZE} ids"
    return weights_problem(ckpt["model"], config)


def weights_problem(weights, config):
    """Where the weights do not have the shape model_config gives them, or None. Checked before the model
    is built: a model_config edited to an absurd width would otherwise first try to allocate it."""
    if not isinstance(weights, dict):
        return f"model is a {type(weights).__name__}, not a dict of weights"
    tables = {"transformer.wte.weight": (config["vocab_size"], config["n_embd"]),
              "transformer.wpe.weight": (config["block_size"], config["n_embd"])}
    for name, shape in tables.items():
        held = tuple(weights[name].shape) if isinstance(weights.get(name), torch.Tensor) else None
        if held != shape:
            return f"model_config makes {name} {shape}, and the weights hold {held or 'no such tensor'}"
    blocks = sum(1 for name in weights if str(name).endswith(".ln_1.weight"))
    if blocks != config["n_layer"]:
        return f"model_config n_layer is {config['n_layer']}, and the weights hold {blocks} blocks"
    return None


def training_state_problem(ckpt):
    """The same for what only a resume reads: its batch, data position, optimizer state and random streams.
    (total_batch_size and the loader's epoch, shard and file are missing from older checkpoints.)"""
    train_config, loader = ckpt["train_config"], ckpt["train_loader"]
    numbers = [("train_config", train_config, name, least, default) for name, least, default in
               (("B", 1, None), ("T", 1, None), ("total_batch_size", 0, 0), ("seed", 0, 0))]
    numbers += [("train_loader", loader, name, 0, 0) for name in ("epoch", "shard", "position", "tokens")]
    problem = number_problem(numbers)
    if problem:
        return problem
    if train_config.get("seed", 0) >= 2**32:  # (NumPy's seeds end there, and so does --seed)
        return f"train_config seed is {train_config['seed']}, past 2**32 - 1"
    # (what a resume reads back when the command does not name it: a wrong type would be a TypeError there)
    kinds = {"data_dir": ((str, type(None)), "a path"), "input_file": ((str, type(None)), "a path"),
             "shuffle": (bool, "True or False")}
    for name, (types, kind) in kinds.items():
        if name in train_config and not isinstance(train_config[name], types):
            return f"train_config {name} is {train_config[name]!r}, not {kind}"
    if not isinstance(loader.get("file"), (str, type(None))):
        return f"train_loader file is {loader['file']!r}, not a shard's file name"
    for name, keys in (("optimizer", ("state", "param_groups")), ("rng", ("python", "numpy", "torch", "sample"))):
        if not isinstance(ckpt[name], dict) or set(keys) - set(ckpt[name]):
            return f"{name} does not hold {', '.join(keys)}"
    if not isinstance(ckpt["optimizer"]["state"], dict) or not isinstance(ckpt["optimizer"]["param_groups"], list):
        return "optimizer state is not a dict, or its param_groups not a list"
    return None


def load_weights(model, ckpt, path):
    """The checkpoint's weights into `model`, all of them finite: a run never saves NaN or inf weights (its
    loss check stops it first), so such a file is damaged, and would sample or evaluate to nonsense."""
    try:
        model.load_state_dict(ckpt["model"])
    except (TypeError, KeyError, RuntimeError) as e:  # the right keys, but not what we saved
        what = " ".join(str(e).split()).removeprefix("Error(s) in loading state_dict for GPT: ")  # (torch's lines)
        raise SettingError(f"{path!r} is not a usable train_gpt2 checkpoint: {first_line(what)[:300]}") from None
    if not_finite := non_finite_weight(model):
        raise SettingError(f"{path!r} is not a usable train_gpt2 checkpoint: its {not_finite} holds NaN or inf")


# -----------------------------------------------------------------------------
# A resumed run put back where it was: optimizer, loss scale, data position, random streams


def restore_training_state(ckpt, path, model, optimizer, scaler, train_loader, sample_generator):
    """Put the optimizer, loss scaler, random streams and data position back as the checkpoint saved them."""
    try:  # (what these hold was not checked on loading: one that does not fit this run is one line too)
        check_saved_moments(model, ckpt["optimizer"])
        load_optimizer_state(model, optimizer, ckpt["optimizer"])
        check_optimizer_state(model, optimizer)  # (its ValueError: "cannot resume from ..." below)
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], sample_generator)
    except (torch.OutOfMemoryError, torch.distributed.DistError):
        raise  # (the machine's, not the file's)
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
        raise SettingError(f"cannot resume from {path!r}: {first_line(e)}") from None
    restore_data_position(train_loader, ckpt["train_loader"])


def check_saved_moments(model, state):
    """A pair of AdamW moments saved for every parameter (a run saves after its first update, which makes
    them all): loading would start a missing one from zero without a word (set_optimizer_state_dict fills
    it in), and the resume would not be the run's. Older checkpoints number the parameters."""
    names, saved = [name for name, _ in model.named_parameters()], state["state"]
    keys = range(len(names)) if saved and all(isinstance(key, int) for key in saved) else names
    for key, name in zip(keys, names):
        missing = {"exp_avg", "exp_avg_sq"} - set(saved.get(key, {}))
        if missing:
            raise ValueError(f"its optimizer holds no {' or '.join(sorted(missing))} for {name}")
        odd = [field for field, value in dict(saved[key]).items() if not torch.is_tensor(value)]
        if odd:  # (a step saved as text, say: load_state_dict's own error about it is garbled)
            raise ValueError(f"its optimizer's {odd[0]} for {name} is not a tensor")


def check_optimizer_state(model, optimizer):
    """AdamW's moments, as loaded, each of its parameter's shape: load_state_dict takes them as they are,
    and one of another shape would crash the first step (the fused kernel reads past its end)."""
    names = {id(param): name for name, param in model.named_parameters()}
    for group in optimizer.param_groups:  # (a setting edited into text would be the first step's TypeError)
        numbers = [group["lr"], group["eps"], group["weight_decay"], *group["betas"]]
        if not all(isinstance(number, (int, float)) for number in numbers):
            raise ValueError(f"its optimizer's lr, eps, weight_decay and betas are {numbers}: not all numbers")
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() and value.shape != param.shape:
                    raise ValueError(f"its optimizer's {key} for {names.get(id(param), 'a parameter')} has shape "
                                     f"{tuple(value.shape)}, the parameter {tuple(param.shape)}")


def restore_data_position(loader, saved):
    """The loader where the run left it (`saved`: its state_dict): the same shard, found by file name,
    not index (another --B or number of processes changes which short shards shard_files passes over,
    so the shuffled list and its indices change), the same token. A window that no longer fits the
    shard's end (a bigger --B) moves on to the next shard, as the loader itself would. Other data (a train
    split of another token count than the run's) or a place this data does not have is an error, before
    the run's log is touched."""
    if saved.get("tokens", loader.n_tokens) != loader.n_tokens:  # (older checkpoints hold no count)
        raise SettingError(f"the run trained on a train split of {saved['tokens']:,} tokens, and this data's has "
                           f"{loader.n_tokens:,}: resume with the data the run trained on, or start a new run from "
                           "these weights with --init_from")
    shard, token, file = int(saved.get("shard", 0)), int(saved.get("position", 0)), saved.get("file")
    past_the_end = SettingError(f"the checkpoint's data position (shard {shard}, token {token}) is past the "
                                "end of this data's train split; resume with the data the run trained on")
    if file is not None and loader.file is not None:  # (checkpoints before 2026-12-05 name no file)
        epoch = int(saved.get("epoch", 0))
        files = [os.path.basename(loader.shards[i]) for i in loader.shard_order(epoch)]
        if file not in files:  # now shorter than one batch (a bigger --B): passed over, as the loader passes those
            file, token = shard_after(loader, file), 0
            if file is None:  # (no shard after it holds one batch: the epoch is over)
                loader.load_state_dict({"epoch": epoch + 1})
                return
        shard = files.index(file)
    if not 0 <= shard < len(loader.shards):
        raise past_the_end
    loader.load_state_dict({**saved, "shard": shard, "position": token})
    if token > len(loader.current):
        raise past_the_end
    if loader.position + loader.B * loader.T * loader.num_processes + 1 > len(loader.current):
        loader.advance_shard()  # (the next window would run past the end)


def shard_after(loader, file):
    """The first of the train split's shards after `file`, in the manifest's order, that holds one of the
    loader's batches (None where none does): where a resume goes on when the run's shard is too short for
    its batch now. A SettingError where `file` is not one of the split's shards."""
    data_dir = os.path.dirname(loader.shards[0])
    names = [os.path.basename(s["file"]) for s in read_manifest(data_dir)["shards"] if s["split"] == "train"]
    if file not in names:
        raise SettingError(f"the checkpoint's shard {file} is not among the train shards of {data_dir!r}; resume "
                           "with the data the run trained on")
    holding_a_batch = {os.path.basename(path) for path in loader.shards}
    return next((name for name in names[names.index(file) + 1:] if name in holding_a_batch), None)


# -----------------------------------------------------------------------------
# Writing: when, and the file itself


def checkpoint_due(step, start_step, checkpoint_interval):
    """Whether --checkpoint_interval asks for a checkpoint of the model after `step` steps (the loop
    also saves the last step, and on a stop signal)."""
    return bool(checkpoint_interval) and step > start_step and step % checkpoint_interval == 0


def save_checkpoint(state, path):
    """Write atomically: a crash or a full disk mid-write leaves the previous checkpoint as it was. The
    run's paths are kept absolute, so that a resume that names no data finds the run's from any folder
    (and one that names its --init_from, however written, is not told it names another)."""
    config = state.get("train_config", {})
    data = {name: os.path.abspath(config[name]) for name in ("input_file", "data_dir") if config.get(name)}
    if os.path.exists(config.get("init_from", "")):  # (a file or folder; not a GPT-2 name, not "scratch")
        data["init_from"] = os.path.abspath(config["init_from"])
    state = {**state, "train_config": {**config, **data}} if data else state
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # (out_dir removed mid-run: the model is not lost)
        with SignalsHeld():  # (a signal mid-write: once the file is whole)
            write_atomically(path, lambda f: torch.save(state, f))
    except DiskFull as e:
        resumed = state.get("train_config", {}).get("resume", False)
        raise DiskFull(f"{e}; {disk_full_hint(os.path.dirname(path), resumed)}") from None
