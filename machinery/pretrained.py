"""
OpenAI's GPT-2 through transformers: its weights loaded quietly, with every failure in one line, and
our model written back as a transformers GPT-2 directory. Used by GPT.from_pretrained and
GPT.save_pretrained in train_gpt2.py; check_config asks export_problem whether an export would replace
a file that is not an earlier export's.
"""

import glob
import json
import os
import shutil
import tempfile

import torch

from machinery.files import SettingError, first_line
from machinery.hub import hub_or_cache
from machinery.tokens import GPT2_VOCAB_SIZE

# OpenAI's released checkpoints, for reference: name -> shape (from_pretrained reads it from the files).
# All have vocab_size 50257 and block_size 1024.
PRETRAINED = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def load_transformers_gpt2(name_or_path, known_names):
    """transformers' GPT2LMHeadModel from the hub (a name) or a save_pretrained directory, with the
    hub's retries kept quiet and every failure said in one line."""
    ckpt = os.path.join(name_or_path, "ckpt.pt")  # (a run's out_dir named where a save_pretrained one goes)
    if os.path.isfile(ckpt) and not os.path.isfile(os.path.join(name_or_path, "config.json")):
        raise SettingError(f"{name_or_path!r} is a training run's folder, not a save_pretrained one: pass its "
                           f"checkpoint, {ckpt}")
    model_type = model_type_of(name_or_path)
    if model_type not in (None, "gpt2"):  # transformers would load it anyway, leaving every weight random
        raise SettingError(f"{name_or_path!r} is a {model_type} model, not GPT-2")
    try:
        from huggingface_hub.utils import logging as hub_logging
        from safetensors import SafetensorError
        from transformers import GPT2LMHeadModel, __version__
        from transformers.utils import logging as hf_logging
    except ImportError as e:
        raise SettingError(f"loading GPT-2 weights needs transformers: {first_line(e)}; "
                           "pip install -r requirements.txt") from None
    hf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()  # offline, the hub logs every retry: we say it once, below
    hf_logging.set_verbosity_error()  # its table of missing keys: check_complete says it in one line
    online = True
    try:
        with hub_or_cache() as online:  # no network: the hub's cache only, at once instead of after retries
            model, info = GPT2LMHeadModel.from_pretrained(name_or_path, output_loading_info=True)
    except ImportError as e:  # transformers found a torch too old for it and disabled its PyTorch models
        raise SettingError(f"transformers {__version__} cannot load PyTorch models with torch {torch.__version__} "
                           f"({first_line(e)[:120]}): install versions that fit, pip install -r requirements.txt"
                           ) from None
    # offline, not a GPT-2 directory, a truncated weights file, a config.json that does not fit them
    except (OSError, ValueError, TypeError, RuntimeError, SafetensorError) as e:
        why = first_line(e) if online or name_or_path not in known_names else \
            "not in the hub's cache, and the Hugging Face hub cannot be reached"
        hint = " (offline? load from a save_pretrained directory instead)" if name_or_path in known_names else ""
        raise SettingError(f"could not load GPT-2 weights from {name_or_path!r}: {why}{hint}") from None
    check_complete(model, info["missing_keys"], name_or_path)
    return model


def pretrained_shape(name_or_path):
    """The shape GPT.from_pretrained will make, by GPTConfig's names, read before any weights: OpenAI's
    models by name, a save_pretrained directory from its config.json (what it does not say as a whole
    number, a config that cannot be read or another model's, is left out: loading then says what is wrong)."""
    if name_or_path in PRETRAINED:
        return {**PRETRAINED[name_or_path], "block_size": 1024, "vocab_size": GPT2_VOCAB_SIZE}
    config = saved_config(name_or_path)
    if config.get("model_type", "gpt2") != "gpt2":  # (not GPT-2's: loading it says so)
        return {}
    ours = dict(n_layer="n_layer", n_head="n_head", n_embd="n_embd", block_size="n_positions", vocab_size="vocab_size")
    return {name: config[theirs] for name, theirs in ours.items()
            if type(config.get(theirs)) is int}  # (not a bool, a string or null)


def refuse_small_vocabulary(name_or_path, consequence):
    """A save_pretrained directory whose table has fewer rows than GPT-2's tokens: one line, with what
    those tokens would do (`consequence`). Read before the weights (transformers warns while loading)."""
    vocab_size = pretrained_shape(name_or_path).get("vocab_size", GPT2_VOCAB_SIZE)
    if vocab_size < GPT2_VOCAB_SIZE:
        raise SettingError(f"{name_or_path!r} has a vocabulary of {vocab_size:,} tokens, fewer than GPT-2's "
                           f"{GPT2_VOCAB_SIZE:,}: {consequence}")


def saved_config(directory):
    """A save_pretrained directory's config.json as a dict, or {} (a hub name, or no readable config:
    from_pretrained then says what is wrong). Read before loading: transformers warns first otherwise."""
    try:
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def model_type_of(directory):
    """The model_type a save_pretrained directory's config names, or None."""
    return saved_config(directory).get("model_type")


def export_problem(directory):
    """Why exporting into `directory` would replace a file of the user's, or None. An export writes
    config.json and model.safetensors: where either is there already, it must be an earlier export (a
    GPT-2 config.json), not another model's or another program's."""
    replaced = [name for name in ("config.json", "model.safetensors") if os.path.exists(os.path.join(directory, name))]
    if replaced and model_type_of(directory) != "gpt2":
        return (f"--export_dir {directory!r} holds {' and '.join(replaced)}, not a GPT-2 export's, which the export "
                "would replace: choose another folder")
    return None


def check_complete(model, missing, name_or_path):
    """transformers fills the tensors a weights file lacks with random numbers and only warns: a
    ValueError instead, naming how many and the first (lm_head.weight, tied to the token table, aside)."""
    needed = [k for k in model.state_dict() if k != "lm_head.weight"]
    lacking = [k for k in needed if k in missing]
    if lacking:
        raise SettingError(f"{name_or_path!r} lacks {len(lacking)} of GPT-2's {len(needed)} tensors, "
                           f"e.g. {lacking[0]}")


def shared_weight_names(ours, theirs, name_or_path):
    """The names of the weights to copy from transformers' state dict (`theirs`) into ours, both GPT-2's
    layout: all of them but lm_head.weight, the tied token table (transformers 5.x may leave it out) and
    the mask buffers transformers 4.x kept (attn.bias, attn.masked_bias: constants). Any other difference
    means the files are not GPT-2's, in one line."""
    skip = (".attn.bias", ".attn.masked_bias", "lm_head.weight")
    keys, keys_hf = (sorted(k for k in sd if not k.endswith(skip)) for sd in (ours, theirs))
    if keys != keys_hf:
        raise SettingError(f"{name_or_path!r} is not a GPT-2 checkpoint: parameter names differ "
                           f"({sorted(set(keys) ^ set(keys_hf))[:4]} ...)")
    return keys


def export_to_transformers(config, state_dict, directory, conv1d_weights):
    """Write a model of this GPTConfig and state_dict as a transformers GPT-2 directory (config.json +
    model.safetensors) that GPT2LMHeadModel.from_pretrained and GPT.from_pretrained both read.
    conv1d_weights: the keys that OpenAI's layout stores transposed. The files are made in a hidden folder
    inside `directory`, then moved out of it: a failure (a full disk) leaves what was there as it was."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    from transformers import GPT2Config

    c = config
    vocab = min(c.vocab_size, GPT2_VOCAB_SIZE)  # trim a padded table back to real tokens
    tensors = {}
    for k, v in state_dict.items():
        if k == "lm_head.weight":
            continue  # tied to wte: transformers re-ties it on load
        v = v.detach().float().cpu()
        if k.endswith(conv1d_weights):
            v = v.t()
        if k == "transformer.wte.weight":
            v = v[:vocab]
        tensors[k] = v.contiguous()
    staging = None
    try:
        os.makedirs(directory, exist_ok=True)
        for stale in glob.glob(os.path.join(directory, ".export-*")):  # what a killed export left
            shutil.rmtree(stale, ignore_errors=True)
        staging = tempfile.mkdtemp(prefix=".export-", dir=directory)  # (inside: the same file system)
        GPT2Config(vocab_size=vocab, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                   n_head=c.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                   attn_pdrop=0.0, tie_word_embeddings=True).save_pretrained(staging)
        save_file(tensors, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        for name in os.listdir(staging):  # (renames in one file system: nothing left to fail for lack of space)
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
    except (OSError, SafetensorError) as e:
        raise OSError(f"could not export to {directory!r}: {first_line(e)}; nothing there was changed") from None
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
