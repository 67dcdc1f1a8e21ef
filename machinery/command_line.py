"""
The command line, built from a dataclass of settings (train_gpt2.py's TrainConfig): every field is a
flag with its help text; a recipe is a file of flags read with @configs/NAME.args; a misspelled flag
is answered with the flag meant; settings that cannot work stop the run in one line before anything
heavy (a SettingError, which train_gpt2.py imports from here for its own checks: under torchrun it is
said once). The sibling scripts use ArgumentParser for the same one-line errors.
"""

import argparse
import difflib
import importlib.util
import math
import os
import re
import stat
import sys
from dataclasses import field, fields
from typing import get_args

from machinery.files import SettingError, check_folder_free, folder_problem, in_binary_units, ram_bytes, say_once
from machinery.tokens import GPT2_VOCAB_SIZE, input_file_path


# the files a run writes in its out_dir (a fresh run beside another run's: its log and picture as .new first)
RUN_FILES = {"ckpt.pt": "checkpoint", "log.jsonl": "log", "log.new.jsonl": "log", "progress.png": "picture",
             "progress.new.png": "picture"}

# the settings that name files or folders (a ~ in them is the home folder, as in the shell)
PATHS = {"input_file", "data_dir", "init_from", "out_dir", "export_dir", "hellaswag"}


def flag(default, help, **kwargs):
    """A settings field with its --help text (and argparse extras such as choices)."""
    return field(default=default, metadata=dict(help=help, **kwargs))


class NoneOr:
    """argparse's type for an Optional setting (--min_lr): the word None (the default's meaning, which a
    flag after a recipe may want back), or a value of `kind`."""

    def __init__(self, kind):
        self.kind, self.__name__ = kind, kind.__name__  # (argparse names the type in its errors: "invalid float")

    def __call__(self, text):
        return None if text.strip().lower() == "none" else self.kind(text)


TRUTH = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def truth_value(text):
    """argparse's type for a boolean setting given a value (--compile true, --sdpa=no): true/false, yes/no, on/off,
    1/0, in any case."""
    word = text.strip().lower()
    if word not in TRUTH:  # (a recipe line's rest is the value: "--compile --lr 1e-3" on one)
        more = "; a recipe line holds one flag and its value: put each flag on a line of its own" if " " in word else ""
        raise argparse.ArgumentTypeError(f"invalid true/false value: {text!r}{more}")
    return TRUTH[word]


class OnceBoolean:
    """argparse's type for a setting that was a boolean before it had settings (--activation_checkpointing):
    its old values still mean what they meant, true (yes, on, 1) its bare value and false its default."""

    def __init__(self, bare, default):
        self.bare, self.default, self.__name__ = bare, default, "setting"

    def __call__(self, text):
        meaning = TRUTH.get(text.strip().lower())
        return text if meaning is None else self.bare if meaning else self.default


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors, and recipes: `@configs/NAME.args` stands for the flags in that file,
    one per line (`--lr 6e-4`, `--prompt Once upon a time`, `--compile`); lines starting with # are
    comments. Flags after it override it, as a later flag overrides an earlier one."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)
        self.recipes_of = {}  # a flag that only recipes gave -> those recipes (named in an error about it)
        # a value such as -1e-3 or -inf is a number (to be checked), not a flag: argparse's own test knows -5
        # and -.5 only, and "--lr -1e-3" would be "expected one argument"
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$", re.I)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else [str(a) for a in args]
        self.recipes_of = {}
        expanded = self.expanded = self.expand_recipes(args)  # (kept: parse_args reads a recipe once)
        for typed in args:  # (an error about a flag also typed may be about the typed one)
            self.recipes_of.pop(typed.split("=")[0], None)
        return super().parse_known_args(expanded, namespace)

    def expand_recipes(self, args, reading=()):
        """args with each @FILE replaced by the flags in FILE (a recipe may name others, not itself). A flag's
        value is never a recipe: --prompt @someone is that text (on a recipe's line, as on the command line)."""
        expanded = []
        for i, arg in enumerate(args):
            if not arg.startswith("@") or (i and self.takes_a_value(args[i - 1])):
                expanded.append(arg)
                continue
            path = arg[1:]
            if path in reading:
                self.error(f"recipe {path!r} includes itself")
            mode = os.stat(path).st_mode if os.path.exists(path) else None  # (a pipe is read: <(...), /dev/stdin)
            if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):  # (a device has no end)
                self.error(f"recipe {path!r} is not a file (nor a pipe)")
            try:
                with open(path, encoding="utf-8-sig") as f:  # (-sig: a byte-order mark some editors add)
                    lines = f.read().splitlines()
            except OSError as e:
                self.error(f"cannot read recipe {path!r}: {e.strerror or e}")
            except UnicodeDecodeError:
                self.error(f"recipe {path!r} is not UTF-8 text")
            flag_lines = [words for words in map(self.convert_arg_line_to_args, lines) if words]  # (no comments)
            if not flag_lines:  # (empty, or cut short: not the recipe meant)
                self.error(f"recipe {path!r} holds no flags")
            for words in flag_lines:  # a flag and its value, or @ another recipe
                for word in words:  # (a line's flag, and a value that looks like one: two flags on a line)
                    self.recipes_of.setdefault(word.split()[0].split("=")[0], set()).add(path)
                expanded += self.expand_recipes(words, (*reading, path)) if words[0][0] == "@" else words
        return expanded

    def takes_a_value(self, word):
        """Whether `word` is a flag that takes the next word as its value (--prompt; not --compile, nor
        --activation_checkpointing, whose value is optional, nor --prompt=TEXT, which holds its own)."""
        action = self._option_string_actions.get(word)
        return action is not None and action.nargs is None

    def convert_arg_line_to_args(self, line):
        line = line.strip()
        if not line or line.startswith("#"):
            return []
        return line.split(maxsplit=1)  # the flag, and its value with any spaces in it

    def error(self, message):  # one line, no usage dump
        words = re.findall(r"-[-\w]+", message)  # the flags it names, and what argparse could not take
        words += message.removeprefix("unrecognized arguments: ").split() if message.startswith("unrecognized") else []
        recipes = sorted(set().union(*(self.recipes_of.get(word, ()) for word in words)))
        where = f" (in recipe {', '.join(recipes)})" if recipes else ""
        # (under torchrun: one line, not one from each process; files.say_once, as prepare.py, which uses this
        # parser too, does not import the torch that console.say_error's module brings)
        say_once(f"error: {message}{where}{self.did_you_mean(message)} (see --help)")
        self.exit(2)

    def did_you_mean(self, message):
        """'; did you mean --max_steps?' when an unknown flag is close to a known one."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        known = [option for action in self._actions for option in action.option_strings]
        typed = [word.split("=")[0] for word in message.split(":", 1)[1].split() if word.startswith("-")]
        if set(typed) & set(known):  # a known flag, unrecognized: a recipe line's value after a flag that takes none
            return "; a recipe line holds one flag and its value: put each flag on a line of its own"
        meant = [close for word in typed for close in difflib.get_close_matches(word, known, n=1, cutoff=0.7)]
        return f"; did you mean {' '.join(meant)}?" if meant else ""


def settings_parser(config_class, description, defaults=True):
    """A parser with a flag for every field of the dataclass: --name value or --name=value; booleans also
    --name alone (true) and --no-name (false); a setting with a `bare` value (once a boolean) takes --name
    alone for it, and --no-name for its default. Without defaults, a parse returns only the flags given."""
    parser = ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                            argument_default=None if defaults else argparse.SUPPRESS)
    for f in fields(config_class):
        kind = (get_args(f.type) or (f.type,))[0]  # Optional[float] -> float
        convert = NoneOr(kind) if type(None) in get_args(f.type) else kind
        default = f.default if defaults else argparse.SUPPRESS
        help = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if kind is bool:  # --name, --name true (or false), --name=false; and --no-name
            more = f"; --no-{f.name}: false" if f.default and f"--no-{f.name}" not in help else ""
            parser.add_argument(f"--{f.name}", nargs="?", const=True, type=truth_value, default=default,
                                help=help + more, metavar="true|false")
            parser.add_argument(f"--no-{f.name}", dest=f.name, action="store_false", default=default,
                                help=argparse.SUPPRESS)
        elif "bare" in f.metadata:  # --activation_checkpointing alone: full; --no-activation_checkpointing: none
            parser.add_argument(f"--{f.name}", nargs="?", const=f.metadata["bare"], default=default, help=help,
                                type=OnceBoolean(f.metadata["bare"], f.default), choices=f.metadata.get("choices"))
            parser.add_argument(f"--no-{f.name}", dest=f.name, action="store_const", const=f.default,
                                default=default, help=argparse.SUPPRESS)
        else:
            parser.add_argument(f"--{f.name}", type=convert, default=default, help=help,
                                choices=f.metadata.get("choices"),
                                metavar=None if "choices" in f.metadata else kind.__name__.upper())
    return parser


class FlagsGiven(set):
    """The names of the flags given (a set), and `recipes`: for a flag only recipes gave, those recipes."""

    def __init__(self, names, recipes_of=None):
        super().__init__(names)
        self.recipes = {flag.lstrip("-").removeprefix("no-"): paths for flag, paths in (recipes_of or {}).items()}


def in_recipes(given, names):
    """' (in recipe configs/NAME.args)' where recipes gave these flags, for a line about them (else '')."""
    recipes = sorted(set().union(*(getattr(given, "recipes", {}).get(name, ()) for name in names)))
    return f" (in recipe {', '.join(recipes)})" if recipes else ""


def parse_args(config_class, argv=None, description="Train or sample GPT-2."):
    """(the settings, the names of the flags that were given): a run started from a checkpoint takes
    the model's shape from it, and only a shape flag the user gave can contradict it."""
    parser = settings_parser(config_class, description)
    settings = vars(parser.parse_args(argv))
    # (the flags as the recipes expanded to: a recipe read from a pipe can be read only once)
    given = settings_parser(config_class, description, defaults=False).parse_args(parser.expanded)
    for name in PATHS & settings.keys():  # ~ is the shell's: in a recipe or --out_dir=~/run it reaches us as typed
        settings[name] = os.path.expanduser(settings[name])
    if "input_file" in settings and "input_file" not in vars(given):  # (run from another folder: the one beside
        settings["input_file"] = input_file_path(settings["input_file"])  # the script; one typed is the one read)
    return config_class(**settings), FlagsGiven(vars(given), parser.recipes_of)


def check_config(cfg):
    """Bad settings stop the run before anything heavy, each with a line that names the flag (a
    SettingError: under torchrun, said once)."""
    for name in ("B", "T", "n_layer", "n_head", "n_embd", "block_size", "vocab_size", "eval_iters", "eval_interval"):
        if getattr(cfg, name) <= 0:
            raise SettingError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("max_steps", "warmup_steps", "total_batch_size", "sample_interval",
                 "checkpoint_interval", "num_samples", "max_new_tokens", "top_k"):
        if getattr(cfg, name) < 0:
            raise SettingError(f"--{name} must not be negative, got {getattr(cfg, name)}")
    if not 0 < cfg.lr < math.inf:  # (NaN fails every comparison)
        raise SettingError(f"--lr must be a positive number, got {cfg.lr}")
    if not cfg.grad_clip > 0:
        raise SettingError(f"--grad_clip must be positive (inf: no clipping), got {cfg.grad_clip}")
    for name in ("weight_decay", "temperature"):
        if not 0 <= getattr(cfg, name) < math.inf:
            raise SettingError(f"--{name} must be a number >= 0, got {getattr(cfg, name)}")
    if cfg.lr * cfg.weight_decay >= 1:  # (AdamW multiplies each decayed weight by 1 - lr x weight_decay a step)
        raise SettingError(f"--weight_decay {cfg.weight_decay} with --lr {cfg.lr} would scale each decayed weight by "
                           f"1 - {cfg.lr * cfg.weight_decay:g} a step: lr x weight_decay must be below 1 (GPT-2's: "
                           "6e-4 x 0.1)")
    if cfg.min_lr is not None and not 0 <= cfg.min_lr <= cfg.lr:
        raise SettingError(f"--min_lr {cfg.min_lr} must be between 0 and --lr {cfg.lr}")
    if not 0 <= cfg.seed < 2**32:
        raise SettingError(f"--seed must be between 0 and 2**32 - 1, got {cfg.seed}")
    if not cfg.out_dir:  # (the run's log and checkpoint need a folder; export_dir "" means no export)
        raise SettingError("--out_dir is empty: name the folder the run writes its log and checkpoint to")
    writes_run = cfg.max_steps and not cfg.eval_only  # (sampling or evaluating writes nothing to out_dir)
    for name, written in (("out_dir", writes_run), ("export_dir", cfg.export_dir)):
        problem = folder_problem(getattr(cfg, name)) if written else None
        if problem:
            raise SettingError(f"--{name} {getattr(cfg, name)!r} {problem}")
    for name, what in RUN_FILES.items():
        if writes_run and os.path.isdir(os.path.join(cfg.out_dir, name)):
            raise SettingError(f"{os.path.join(cfg.out_dir, name)!r} is a folder: the run's {what} is written there")
    if writes_run and not cfg.resume:  # (a resume: once its checkpoint says whether it trains, resumed_batch)
        check_folder_free(cfg.out_dir)  # (another run writing it: said now, not after minutes of loading)
    from machinery.pretrained import check_export_dir  # (here, not above: prepare.py imports this module, not torch)
    check_export_dir(cfg.export_dir, cfg.init_from)
    if cfg.eval_only and cfg.export_dir:
        raise SettingError("--eval_only writes nothing, so --export_dir would not be written: export with "
                           "--max_steps 0 instead of --eval_only")
    # (a scratch model's shape; any other's is its source's, and a flag that contradicts it is named there)
    if cfg.n_embd % cfg.n_head and cfg.init_from == "scratch" and not cfg.resume:
        raise SettingError(f"--n_embd {cfg.n_embd} must be a multiple of --n_head {cfg.n_head}")
    if cfg.vocab_size < GPT2_VOCAB_SIZE and cfg.init_from == "scratch":
        raise SettingError(f"--vocab_size {cfg.vocab_size} is below the tokenizer's {GPT2_VOCAB_SIZE} ids")
    check_model_fits_in_ram(cfg)
    if cfg.wandb_run_name and not cfg.wandb_project:
        raise SettingError("--wandb_run_name names a run in --wandb_project, which is not set: add it, or leave "
                           "both out")
    if cfg.wandb_project and importlib.util.find_spec("wandb") is None:
        raise SettingError("--wandb_project needs the wandb package, which is not installed: pip install wandb")


def check_block_size(cfg, block_size):
    """Training and evaluation read sequences of T tokens, which the model's position table must hold.
    (Sampling alone, --max_steps 0, reads none: its context is the last block_size tokens.)"""
    if (cfg.max_steps or cfg.eval_only) and cfg.T > block_size:
        raise SettingError(f"T={cfg.T} exceeds block_size={block_size}; lower --T")


def check_model_fits_in_ram(cfg):
    """A model from scratch is made in RAM first, in float32: a shape whose weights (and attention masks)
    the machine's RAM cannot hold stops here in one line, not in the allocator's traceback. (Counted from
    the shape: this module, which prepare.py imports too, does not import torch.)"""
    ram = ram_bytes()
    if cfg.init_from != "scratch" or cfg.resume or ram is None:  # (a resume's shape is its checkpoint's)
        return
    C = cfg.n_embd
    masks = cfg.n_layer * cfg.block_size ** 2  # the attention masks: a byte a position pair
    # bytes (float32 weights), by the flags that would make each part smaller
    parts = {"--vocab_size or --n_embd": 4 * cfg.vocab_size * C,  # the token table
             "--n_layer or --n_embd": 4 * (cfg.n_layer * (12 * C * C + 13 * C) + 2 * C),  # the blocks, the last norm
             "--block_size": 4 * cfg.block_size * C + masks}  # the position table, the masks
    need = sum(parts.values())
    if need > ram:
        raise SettingError(f"a model of {(need - masks) // 4:,} parameters, block_size {cfg.block_size}, needs "
                           f"{in_binary_units(need)} of RAM to be made; this machine has {in_binary_units(ram)} "
                           f"(smaller {max(parts, key=parts.get)})")
