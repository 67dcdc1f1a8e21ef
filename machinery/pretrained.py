"""
OpenAI's GPT-2 through transformers: its weights loaded quietly, with every failure in one line, and
our model written back as a transformers GPT-2 directory. Used by GPT.from_pretrained and
GPT.save_pretrained in train_gpt2.py; check_config asks check_export_dir whether an export would replace
a file that is not an earlier export's. A save_pretrained directory is checked before transformers
reads it (checked_config) and after (check_fits, check_finite_weights, check_tied): transformers would
load a model ours cannot hold, or weights that are not its config's, without a word, or fail in a
traceback.
"""

import glob
import json
import os
import pickle
import shutil
import tempfile

import torch

from machinery.files import SettingError, first_line, first_missing_folder, in_binary_units, ram_bytes
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
# config.json's shape, by GPTConfig's names; a field left out is transformers' default (GPT-2 124M's)
SHAPE_FIELDS = dict(n_layer="n_layer", n_head="n_head", n_embd="n_embd", block_size="n_positions",
                    vocab_size="vocab_size")
# what our GPT has built in, as OpenAI's models (and transformers' defaults) have it: a config.json that says
# otherwise loads in transformers, and our model would compute other logits with its weights
BUILT_IN = dict(activation_function=("gelu_new", "gelu_pytorch_tanh"),  # (the same tanh approximation)
                layer_norm_epsilon=(1e-5,), scale_attn_weights=(True,), scale_attn_by_inverse_layer_idx=(False,))
# the precisions a GPT-2's weights are saved in, as config.json's dtype names them (null: float32); transformers
# fails in a traceback on a name torch lacks, and cannot read float8 or float4 weights back
SAVED_DTYPES = (None, "float32", "float16", "bfloat16", "float64")
# the weights files transformers reads from a directory, in the order it looks for them
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
# transformers 4.x's attention masks, constants that OpenAI's files still hold (ours make their own)
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


def load_transformers_gpt2(name_or_path, known_names):
    """transformers' GPT2LMHeadModel from the hub (a name) or a save_pretrained directory, with the
    hub's retries kept quiet and every failure said in one line (a name not among known_names first)."""
    if name_or_path not in known_names and not os.path.isdir(name_or_path):
        a_path = os.sep in name_or_path or name_or_path.startswith(".")  # (not a misspelled name: a folder not there)
        where = " (not a folder or a file: a device?)" if os.path.exists(name_or_path) else \
            " (no such folder)" if a_path else ""
        raise SettingError(f"unknown model {name_or_path!r}{where}: use one of "
                           f"{', '.join(known_names)}, a directory written by save_pretrained or a run's ckpt.pt")
    if os.path.isdir(name_or_path):  # (what transformers would stumble on, or load without a word, said first)
        checked_config(name_or_path)
    try:
        from huggingface_hub.errors import StrictDataclassError
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
            # (ignore_mismatched_sizes: a tensor of another shape than config.json's is listed in `info`, for
            # check_fits to name, instead of an error that names none)
            model, info = GPT2LMHeadModel.from_pretrained(name_or_path, output_loading_info=True,
                                                          ignore_mismatched_sizes=True)
    except ImportError as e:  # transformers found a torch too old for it and disabled its PyTorch models
        raise SettingError(f"transformers {__version__} cannot load PyTorch models with torch {torch.__version__} "
                           f"({first_line(e)[:120]}): install versions that fit, pip install -r requirements.txt"
                           ) from None
    except StrictDataclassError as e:  # a config.json field of the wrong type, one checked_config does not read
        raise SettingError(f"{name_or_path!r} config.json: {first_line(e.__cause__ or e)}") from None
    # offline, or a weights file cut short or damaged (each format fails in its own way)
    except (OSError, ValueError, TypeError, RuntimeError, EOFError, IndexError, pickle.UnpicklingError,
            SafetensorError) as e:
        raise SettingError(load_failure_line(name_or_path, known_names, online, e)) from None
    check_complete(model, info["missing_keys"], name_or_path)
    check_fits(info, name_or_path)
    check_finite_weights(model, name_or_path)
    check_tied(model, name_or_path)
    return model


def load_failure_line(name_or_path, known_names, online, error):
    """The line for a GPT-2 that transformers could not load: from a directory (its config.json checked
    already), naming its weights file (where it holds none, this raises that SettingError instead); by
    name, the hub (or its cache: a file missing is an OSError, one there but damaged any other error)."""
    if os.path.isdir(name_or_path):
        return (f"{name_or_path!r}: its weights file {weights_file(name_or_path)} cannot be read (damaged or "
                f"truncated?): {first_line(error)}")
    if not isinstance(error, OSError):
        from huggingface_hub.constants import HF_HUB_CACHE
        cached = os.path.join(HF_HUB_CACHE, f"models--{name_or_path}")
        return (f"could not load GPT-2 weights from {name_or_path!r}: its copy in the hub's cache cannot be read "
                f"(damaged or truncated?): {first_line(error)}; delete {cached} to download it again")
    why = first_line(error) if online or name_or_path not in known_names else \
        "not in the hub's cache, and the Hugging Face hub cannot be reached"
    hint = " (offline? load from a save_pretrained directory instead)" if name_or_path in known_names else ""
    return f"could not load GPT-2 weights from {name_or_path!r}: {why}{hint}"


def pretrained_shape(name_or_path):
    """The shape GPT.from_pretrained will make, by GPTConfig's names, read before any weights: OpenAI's
    models by name, a save_pretrained directory from its config.json (checked: what it leaves out is
    transformers' default, and left out here too); {} for anything else (from_pretrained says what)."""
    if name_or_path in PRETRAINED:
        return {**PRETRAINED[name_or_path], "block_size": 1024, "vocab_size": GPT2_VOCAB_SIZE}
    if not os.path.isdir(name_or_path):
        return {}
    config = checked_config(name_or_path)
    return {name: config[theirs] for name, theirs in SHAPE_FIELDS.items() if theirs in config}


def refuse_small_vocabulary(name_or_path, consequence):
    """A save_pretrained directory whose table has fewer rows than GPT-2's tokens: one line, with what
    those tokens would do (`consequence`). Read before the weights (transformers warns while loading)."""
    vocab_size = pretrained_shape(name_or_path).get("vocab_size", GPT2_VOCAB_SIZE)
    if vocab_size < GPT2_VOCAB_SIZE:
        raise SettingError(f"{name_or_path!r} has a vocabulary of {vocab_size:,} tokens, fewer than GPT-2's "
                           f"{GPT2_VOCAB_SIZE:,}: {consequence}")


def config_if_readable(directory):
    """A directory's config.json as a dict, or {} where there is none or it cannot be read: what
    check_export_dir asks of a folder an export would write into (loading reads it with checked_config)."""
    try:
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def model_type_of(directory):
    """The model_type a save_pretrained directory's config names, or None."""
    return config_if_readable(directory).get("model_type")


def checked_config(directory):
    """A save_pretrained directory's config.json, checked before transformers reads it: one that is not
    there or not JSON, another model's, a shape that is not whole numbers (transformers fails in a
    traceback), or a setting our GPT has built in set otherwise (it would load, and compute other logits)."""
    config = config_json(directory)
    model_type = config.get("model_type")
    if model_type not in (None, "gpt2"):  # transformers would load it anyway, leaving every weight random
        raise SettingError(f"{directory!r} is a {model_type} model, not GPT-2")
    for field in SHAPE_FIELDS.values():
        value = config.get(field, 1)
        if type(value) is not int or value < 1:  # (not a bool, a float, a string or null)
            raise SettingError(f"{directory!r} config.json: {field} is {json.dumps(value)}, not a whole number >= 1")
    n_embd, n_head = config.get("n_embd", 768), config.get("n_head", 12)  # (transformers' defaults: GPT-2's)
    if n_embd % n_head:
        raise SettingError(f"{directory!r} config.json: n_embd {n_embd} is not a multiple of n_head {n_head}")
    for field, ours in BUILT_IN.items():
        if config.get(field, ours[0]) not in ours:
            raise SettingError(f"{directory!r} config.json: {field} is {json.dumps(config[field])}, where GPT-2's "
                               f"is {json.dumps(ours[0])}: this model cannot hold it")
    for field in ("dtype", "torch_dtype"):  # (the precision the weights were saved in: transformers 5.x, 4.x)
        if config.get(field) not in SAVED_DTYPES:
            raise SettingError(f"{directory!r} config.json: {field} is {json.dumps(config[field])}, not one of "
                               f"{', '.join(map(json.dumps, SAVED_DTYPES))}")
    if config.get("n_inner") not in (None, 4 * n_embd):  # (the MLP's width; null: 4 x n_embd, as GPT-2's)
        raise SettingError(f"{directory!r} config.json: n_inner is {json.dumps(config['n_inner'])}, where GPT-2's "
                           f"is 4 x n_embd = {4 * n_embd}: this model cannot hold it")
    check_shape_fits_in_ram(directory, config)
    return config


def check_shape_fits_in_ram(directory, config):
    """transformers makes the model config.json describes, in float32, before it reads a weight: a shape
    (edited to a huge n_positions, say) that RAM cannot hold is said here, not blamed on the weights file."""
    C, n_positions = config.get("n_embd", 768), config.get("n_positions", 1024)
    tables = (config.get("vocab_size", GPT2_VOCAB_SIZE) + n_positions) * C  # the token and position tables
    n_params = tables + config.get("n_layer", 12) * (12 * C * C + 13 * C) + 2 * C
    ram = ram_bytes()
    if ram is not None and 4 * n_params > ram:
        raise SettingError(f"{directory!r} config.json describes a model of {n_params:,} parameters (n_layer "
                           f"{config.get('n_layer', 12)}, n_embd {C}, n_positions {n_positions}): "
                           f"{in_binary_units(4 * n_params)} in float32, more than this machine's "
                           f"{in_binary_units(ram)} of RAM")


def config_json(directory):
    """A save_pretrained directory's config.json as a dict; a SettingError where there is none (a run's
    out_dir named instead: its checkpoint is the file to pass) or it is not a JSON object."""
    path = os.path.join(directory, "config.json")
    if not os.path.lexists(path):
        ckpt = os.path.join(directory, "ckpt.pt")
        if os.path.isfile(ckpt):
            raise SettingError(f"{directory!r} is a training run's folder, not a save_pretrained one: pass its "
                               f"checkpoint, {ckpt}")
        raise SettingError(f"{directory!r} has no config.json (save_pretrained writes one beside the weights)")
    if not os.path.isfile(path):
        raise SettingError(f"{directory!r} config.json is not a file")
    try:
        with open(path) as f:
            config = json.load(f)
    except OSError as e:
        raise SettingError(f"could not read {path!r}: {first_line(e)}") from None
    except ValueError as e:  # (UnicodeDecodeError too)
        raise SettingError(f"{directory!r} config.json is not JSON: {first_line(e)}") from None
    if not isinstance(config, dict):
        raise SettingError(f"{directory!r} config.json is not a JSON object")
    return config


def weights_file(directory):
    """The name of the weights file transformers reads in a save_pretrained directory; a SettingError where
    it holds none."""
    for name in WEIGHTS_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            return name
    raise SettingError(f"{directory!r} holds no weights file ({' or '.join(WEIGHTS_FILES[::2])})")


def check_export_dir(directory, init_from):
    """A SettingError where exporting into `directory` would replace a file of the user's. An export writes
    config.json and model.safetensors: where either is there already, it must be an earlier export (a
    GPT-2 config.json), not another model's or another program's, and not the folder the run's weights
    came from (--init_from; a resume's, the run's): fine-tuned, they would replace the model it started from."""
    if not directory:
        return
    if os.path.isdir(directory) and os.path.isdir(init_from) and os.path.samefile(directory, init_from):
        raise SettingError(f"--export_dir {directory!r} is the folder --init_from reads: the export would replace "
                           "the model this run starts from: choose another folder")
    replaced = [name for name in ("config.json", "model.safetensors") if os.path.exists(os.path.join(directory, name))]
    if replaced and model_type_of(directory) != "gpt2":
        raise SettingError(f"--export_dir {directory!r} holds {' and '.join(replaced)}, not a GPT-2 export's, which "
                           "the export would replace: choose another folder")


def check_complete(model, missing, name_or_path):
    """transformers fills the tensors a weights file lacks with random numbers and only warns: a
    ValueError instead, naming how many and the first (lm_head.weight, tied to the token table, aside)."""
    needed = [k for k in model.state_dict() if k != "lm_head.weight"]
    lacking = [k for k in needed if k in missing]
    if lacking:
        raise SettingError(f"{name_or_path!r} lacks {len(lacking)} of GPT-2's {len(needed)} tensors, "
                           f"e.g. {lacking[0]}")


def check_fits(info, name_or_path):
    """Weights that are not the shape config.json says: transformers lists a tensor of another shape as
    mismatched (and leaves it random), one the config has no place for (a layer past n_layer) as
    unexpected (and drops it). A SettingError instead, naming one and how many."""
    mismatched = sorted(info["mismatched_keys"])  # (name, shape in the file, shape config.json gives it)
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.endswith(MASK_BUFFERS))
    if mismatched:
        name, in_file, by_config = mismatched[0]
        detail = f"{name} is {tuple(in_file)} in the weights, {tuple(by_config)} by config.json"
    elif unexpected:
        detail = f"{unexpected[0]} is in the weights, not in a model of config.json's shape"
    else:
        return
    more = len(mismatched) + len(unexpected) - 1  # (besides the one named)
    raise SettingError(f"{name_or_path!r}: its weights do not fit its config.json: {detail}"
                       + (f" (and {more} more)" if more else ""))


def check_finite_weights(model, name_or_path):
    """A weight that holds NaN or inf loads without a word, and every logit it reaches is NaN: sampling
    then fails in a traceback and HellaSwag scores chance."""
    name = non_finite_weight(model)
    if name:
        raise SettingError(f"{name_or_path!r}: its weight {name} holds NaN or inf")


def non_finite_weight(model):
    """The name of the first parameter that holds NaN or inf, or None. (A sum is NaN or inf where any element
    is, and takes about a tenth of the time of isfinite over every element, which only confirms it: finite
    weights too large to sum are rare, and are fine.)"""
    return next((name for name, p in model.named_parameters()
                 if not torch.isfinite(p.detach().sum()) and not torch.isfinite(p).all()), None)


def check_tied(model, name_or_path):
    """GPT-2's output layer is its token table (weight tying), and ours has no other: a model saved with
    an lm_head of its own (tie_word_embeddings false) would lose it without a word."""
    head, table = model.lm_head.weight, model.transformer.wte.weight
    if head is not table and not torch.equal(head, table):
        raise SettingError(f"{name_or_path!r}: its lm_head is not tied to its token table, as GPT-2's is: "
                           "this model cannot hold it")


def shared_weight_names(ours, theirs, name_or_path):
    """The names of the weights to copy from transformers' state dict (`theirs`) into ours, both GPT-2's
    layout: all of them but lm_head.weight, the tied token table (transformers 5.x may leave it out) and
    the mask buffers transformers 4.x kept (attn.bias, attn.masked_bias: constants). Any other difference
    means the files are not GPT-2's, in one line."""
    skip = (*MASK_BUFFERS, "lm_head.weight")
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
    staging, made = None, first_missing_folder(directory)  # (made here: removed again if the export fails)
    try:
        os.makedirs(directory, exist_ok=True)
        for stale in glob.glob(os.path.join(glob.escape(directory), ".export-*")):  # what a killed export left
            shutil.rmtree(stale, ignore_errors=True)
        staging = tempfile.mkdtemp(prefix=".export-", dir=directory)  # (inside: the same file system)
        GPT2Config(vocab_size=vocab, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                   n_head=c.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                   attn_pdrop=0.0, tie_word_embeddings=True).save_pretrained(staging)
        save_file(tensors, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        # (safetensors makes its file readable by its owner only: the umask's mode instead, as config.json has)
        shutil.copymode(os.path.join(staging, "config.json"), os.path.join(staging, "model.safetensors"))
        for name in os.listdir(staging):  # (renames in one file system: nothing left to fail for lack of space)
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
    except BaseException as e:  # (a full disk; a Ctrl-C: the folders this export made go again either way)
        if made:
            shutil.rmtree(made, ignore_errors=True)
        if not isinstance(e, (OSError, SafetensorError)):
            raise
        raise OSError(f"could not export to {directory!r}: {first_line(e)}; nothing there was changed") from None
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)

