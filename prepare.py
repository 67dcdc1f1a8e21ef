"""
Tokenize a corpus into shards of GPT-2 tokens, for `python train_gpt2.py --data_dir DIR`. A sibling of
train_gpt2.py (the story) that needs only the package machinery/ (the tokenizer, the manifest's name,
file writes).

    python prepare.py fineweb-edu                      # HuggingFaceFW/fineweb-edu, sample-10BT -> data/fineweb-edu
    python prepare.py my_texts/ --out_dir data/mine    # every *.txt, *.jsonl, *.parquet in a folder
    python prepare.py input.txt --out_dir data/shakespeare --shard_size 100000

What it writes in out_dir:
- shards: `val_000000.npy`, `train_000001.npy`, ... each a 1-D uint16 array of `--shard_size` tokens
  (the last one the remainder); `np.load(path, mmap_mode="r")` reads one without loading it.
- `manifest.json`: the tokenizer, the source, the shard size, for a local source `source_fingerprint`
  (each file's name, size and mtime_ns), one entry per shard in stream order (`file`, `split`,
  `tokens`, `sha256`, and where the next shard starts in the document stream: `next_document` its
  index, `next_offset` how many of its tokens the shards so far took, and when that is past the first
  piece of a text file (below), `next_byte` where in the file that piece begins and
  `next_byte_offset` the document's tokens before it), the totals `documents` and `tokens`, and
  `complete`. The shards concatenated in manifest order are the corpus's tokens. For fineweb-edu also
  `source_files`, the dataset's parquet files as listed by the first run (hf:// paths pinned to that
  commit; later runs read the list from here), and in each shard entry `next_file` and `next_row`: the
  file and row where `next_document` is.

Every document is <|endoftext|> (50256) followed by its tokens, as GPT-2 was trained, and a document
may run across two shards. A text file is one document, read and tokenized in pieces of about
PIECE_BYTES, cut where the pieces' tokens are exactly the whole text's (safe_cut): a big one shows its
progress and is held in memory a few pieces at a time. The first shard is validation when the corpus
fills more than one shard; a smaller corpus is split into train (its first 90%) and val (its last 10%).

Killed at any point, the same command continues: each shard is written under a temporary name and
renamed when complete, the manifest lists only complete shards (checked against their SHA-256 when
the command runs again), and it records where in the document stream the next shard begins. Inside
a text file that is also a byte, where a piece begins: a resumed run reads the file from there. For
FineWeb-Edu that is also a source file and row, and a resumed run, or a retry after a network error,
starts there: it reads again at most the row group it stopped in (at worst its one ~2 GB file), never
the files before it. A dropped connection, a timeout or a server error is retried (one line each,
DOWNLOAD_RETRIES tries in a row); offline mode, a hub whose name does not resolve, a dataset or subset
the hub does not know, or a refused permission end the run at once, in one line. A local source whose
files changed since the shards were begun (source_fingerprint), or while it was read, is refused in
one line: the shards would be of the old version, or mix both.

Before writing, the free space in out_dir is checked against an estimate of what the shards need
(2 bytes a token: about 20 GB for fineweb-edu, half the size of a local source); a disk that fills up
during the run ends it in one line, and the same command continues once space is freed.
"""

import argparse
import contextlib
import glob
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time

import numpy as np

from machinery.command_line import ArgumentParser
from machinery.files import DiskFull, exception_chain, first_line, in_units, ram_bytes, write_atomically
from machinery.hub import hub_reachable
from machinery.tokens import FINEWEB_EDU, MANIFEST, SHARD_SIZE, get_tokenizer, manifest_problem

FINEWEB_EDU_TOKENS = 10_000_000_000  # for the progress bar's ETA and the disk-space estimate only
EOT = 50256  # <|endoftext|>: starts every document
VAL_FRACTION = 0.1  # of a corpus that fits in one shard
BATCH_CHARS = 1_000_000  # text handed to a worker at once: big enough to amortise the hand-over
PIECE_BYTES = 1 << 20  # a .txt document is read and tokenized in pieces of about this size (safe_cut)
DOWNLOAD_RETRIES, RETRY_PAUSE_S = 5, 10.0  # hub streaming: tries in a row before giving up, pause between them
STAND_IN_ENV = "PREPARE_FINEWEB_EDU_FOLDER"  # names a folder of parquet files read in place of the hub's (tests)
TEXT_BYTES_PER_TOKEN = 4  # GPT-2 on English: ~4 bytes of UTF-8 a token; for the disk-space estimate only
DISK_SLACK = 0.9  # refuse to start below 90% of the estimated space: it is an estimate, and a full disk is survivable


class PrepareError(Exception):
    """Bad input: reported as one line."""


# -----------------------------------------------------------------------------
# Documents: a stream of texts from local files


SOURCE_TYPES = (".txt", ".jsonl", ".parquet")  # what a folder source's files may be


def local_files(source):
    """The files that make up a local source, in the order their documents are read: the file, or the
    folder's source files in sorted order. A file that two links (or a link and its own name) reach is
    read once, under the name that sorts first."""
    if os.path.isfile(source):
        return [source]
    if not os.path.isdir(source):
        raise PrepareError(f"source {source!r} not found (a .txt file, a folder, or fineweb-edu)")
    files, seen = [], set()
    for path in sorted(folder_files(source)):
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            files.append(path)
    if not files:
        raise PrepareError(f"folder {source!r} has no .txt, .jsonl or .parquet files")
    return files


def folder_files(folder):
    """The source files in a folder and its subfolders (a folder named like a file, "sub.txt", is walked
    as a folder). Links are followed, but each real folder is walked once: a link to a folder above it
    would loop. Hidden files and folders (named ".something") are left out, as a shell's * leaves them
    out. A link to nothing is refused: the corpus would silently lack a file."""
    walked = {os.path.realpath(folder)}
    for top, folders, names in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(folders):  # (os.walk descends into what is left in `folders`)
            real = os.path.realpath(os.path.join(top, name))
            if not name.startswith(".") and real not in walked:
                walked.add(real)
                kept.append(name)
        folders[:] = kept
        for name in names:
            path = os.path.join(top, name)
            if name.startswith(".") or not name.endswith(SOURCE_TYPES):
                continue
            if not os.path.exists(path):  # (os.walk lists a link to nothing among the files)
                raise PrepareError(f"{path!r} is a link to {os.readlink(path)!r}, which does not exist: "
                                   "remove the link or restore its file")
            if not os.path.isfile(path):
                raise PrepareError(f"{path!r} is not a regular file (a pipe or a device?): move it out of the folder")
            yield path


def source_fingerprint(source, files):
    """[name, size, mtime_ns] of each file of a local source, the name relative to the folder (a file
    source: its own name). An edited, added, removed or renamed file changes it, and taking it reads no
    file: a resumed run, or a repeat on a finished out_dir, compares it with the manifest's."""
    folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    return [file_fingerprint(path, folder) for path in files]


def file_fingerprint(path, folder):
    stat = os.stat(path)  # (a link's: its file's size and time)
    return [os.path.relpath(path, folder), stat.st_size, stat.st_mtime_ns]


def read_documents(path, start=0):
    """The documents of one file in pieces: (text, bytes read, where the text starts in its document, in
    bytes: 0 begins a document). A row or a line is a whole document; a text file is one document, read
    from byte `start` (0, or where one of its pieces begins) in pieces (text_pieces)."""
    if not path.endswith((".parquet", ".jsonl")):
        yield from text_pieces(path, start)
        return
    try:
        if path.endswith(".parquet"):
            for text, n_bytes in read_parquet(path):
                yield text, n_bytes, 0
        else:
            with open(path, encoding="utf-8") as f:
                for line_number, line in enumerate(f, 1):
                    if line.strip():
                        yield jsonl_text(line, path, line_number), len(line), 0
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None


# A place to cut a text: a whitespace character (ASCII) before one that is not whitespace: an ASCII one
# from "!" to "~", or any other but Unicode's other spaces, U+0085, U+00A0, U+1680, U+2000 to U+200A,
# U+2028, U+2029, U+202F, U+205F and U+3000 (in UTF-8: C2 85, C2 A0, E1 9A 80, E2 80 80-8A, A8, A9, AF,
# E2 81 9F and E3 80 80). So Japanese lines that begin with kana (E3 ...) can be cut before, too.
# (Those are whole characters: a cut before the last bytes read waits for what follows them.)
CUT = re.compile(rb"[\t\n\x0b\x0c\r ](?=[!-~\xc3-\xe0\xe4-\xf4]|\xc2[^\x85\xa0]|\xe1(?!\x9a\x80)..|\xe3(?!\x80\x80)..|"
                 rb"\xe2(?!\x80[\x80-\x8a\xa8\xa9\xaf]|\x81\x9f)..)", re.DOTALL)


def safe_cut(data, since=1):
    r"""Where UTF-8 `data` can be cut so that the two sides' tokens, one after the other, are the whole's:
    before its last whitespace character that precedes a non-whitespace one (CUT; not at 0, which would
    leave an empty piece), at `since` or after. None if it has no such place.

    Why that is exact: GPT-2's pre-tokenizer (tiktoken's r50k pattern, which has no look-behind) splits
    the text into pre-tokens, and BPE merges only within one. Whitespace followed by a non-whitespace
    character is in one pre-token only as the one space a word, number or punctuation may take in front,
    and a run of whitespace before a non-whitespace character leaves its last one to what follows
    (\s+(?!\S)), so a pre-token starts at the cut, and from there on the text is the same. Before the
    cut the pre-tokens are the same when the text ends there: each stops at the cut either way, a run of
    whitespace just before it included (\s++$ takes at the end of the text what \s+(?!\S) takes when it
    goes on). A cut after the whole run is not exact: "a\n\n" ends in one pre-token, "\n\n", where
    "a\n\nb" has two, "\n" and "\n"."""
    window = 1 << 16  # the last place is near the end: look there first
    while True:
        start = max(since, len(data) - window)
        places = [m.start() for m in CUT.finditer(data, start)]
        if places:
            return places[-1]
        if start == since:
            return None
        window *= 16


def text_pieces(path, start=0):
    """A text file, one document, from byte `start` on, in pieces: (text, bytes, its first byte in the
    file). Each piece is the PIECE_BYTES from its first byte, cut back by safe_cut (a stretch with nowhere
    to cut is read on until there is one), so memory stays about one piece, the pieces' tokens are the
    whole text's, and where the pieces begin depends only on the file: a resumed run reading from one
    of them cuts the rest where the first run did."""
    with open(path, "rb") as f:
        at = start
        while True:
            f.seek(at)
            data, since = bytearray(f.read(PIECE_BYTES)), 1  # (a bytearray grows in place: no copy a read)
            while (cut := safe_cut(data, since)) is None and (more := f.read(PIECE_BYTES)):
                since = max(1, len(data) - 3)  # only what is new is searched (a place's look-ahead: 3 bytes)
                data += more
            if cut is None:  # the end of the file: the rest is the last piece (an empty file, an empty document)
                if data or at == 0:
                    yield utf8_text(data, path, at), len(data), at
                return
            yield utf8_text(data[:cut], path, at), cut, at
            at += cut


def utf8_text(data, path, at):
    """`data`, bytes of `path` from byte `at`, as text (a cut by safe_cut falls between two characters)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path!r} is not UTF-8 text (byte {at + e.start}: {e.reason})") from None


def jsonl_text(line, path, line_number):
    try:
        record = json.loads(line)
    except ValueError as e:
        raise PrepareError(f"{path}:{line_number} is not JSON: {first_line(e)}") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise PrepareError(f"{path}:{line_number} has no \"text\" string field")
    return record["text"]


def read_parquet(path):
    import pyarrow as pa  # comes with datasets; only parquet sources need it
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        if "text" not in table.schema_arrow.names:
            raise PrepareError(f"{path!r} has no 'text' column (columns: {', '.join(table.schema_arrow.names)})")
        kind = table.schema_arrow.field("text").type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise PrepareError(f"{path!r} has a 'text' column of {kind}, not of strings")
        for batch in table.iter_batches(columns=["text"], batch_size=1024):
            for text in batch.column(0).to_pylist():
                yield text or "", len((text or "").encode("utf-8"))
    except PrepareError:
        raise
    except Exception as e:  # pyarrow's own errors: not a parquet file, truncated, ...
        raise PrepareError(f"{path!r} is not a readable parquet file: {first_line(e)}") from None


def local_documents(files, skip, byte=0):
    """Every document of `files` after the first `skip`, in pieces (read_documents); the first one from
    `byte` on (where one of the pieces of a text file begins). What an earlier run did comes as
    (None, its bytes, 0): not tokenized again, only counted, so a resumed run's progress bar starts
    where the last one stopped."""
    seen = 0
    for path in files:
        if not path.endswith((".parquet", ".jsonl")):  # a text file, one document: skipped unread
            seen += 1
            start = byte if seen == skip + 1 else 0
            if seen <= skip or start:
                yield None, os.path.getsize(path) if seen <= skip else start, 0
            if seen > skip:
                yield from read_documents(path, start)
            continue
        for text, n_bytes, at in read_documents(path):
            seen += 1
            yield (text if seen > skip else None), n_bytes, at


# -----------------------------------------------------------------------------
# FineWeb-Edu: its parquet files read one after another, from the position the manifest records


def stand_in_files():
    """The parquet files, sorted, of the folder STAND_IN_ENV names, which stand in for the hub's and are
    read by the same code (the tests' FineWeb-Edu, offline); None when it is not set."""
    folder = os.environ.get(STAND_IN_ENV)
    if not folder:
        return None
    files = sorted(glob.glob(os.path.join(os.path.abspath(folder), "*.parquet")))
    if not files:
        raise PrepareError(f"{STAND_IN_ENV}={folder!r} names no folder of .parquet files")
    return files


def check_online():
    """Offline mode (HF_HUB_OFFLINE), or a hub whose name does not resolve, is one line at once: no retry
    can fix it, and datasets would only say that it "couldn't reach" the hub after minutes of retries."""
    try:
        import datasets
    except ImportError:
        raise PrepareError("fineweb-edu needs the datasets library: pip install -r requirements.txt") from None
    # (the hub's switch, and datasets' own, HF_DATASETS_OFFLINE)
    switches = (getattr(datasets.config, name, False) for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if any(switches):
        raise PrepareError(f"fineweb-edu streams {FINEWEB_EDU[0]} from the Hugging Face Hub, but offline mode is on "
                           "(HF_HUB_OFFLINE): unset it, or prepare a local copy with python prepare.py FOLDER")
    if not hub_reachable():
        raise PrepareError(f"fineweb-edu streams {FINEWEB_EDU[0]} from the Hugging Face Hub, but its host name "
                           "does not resolve (no network?): connect, or prepare a local copy with "
                           "python prepare.py FOLDER")


def hub_files():
    """FineWeb-Edu's parquet files (hf:// paths, pinned to the commit they were listed at), in the order
    `load_dataset(..., streaming=True)` reads them."""
    import datasets

    name, subset = FINEWEB_EDU
    failures = 0
    while True:
        try:  # one listing of the dataset's files (a few small requests): the dataset card says which are the subset's
            return list(datasets.load_dataset_builder(name, subset).config.data_files["train"])
        except Exception as e:  # the hub's errors come from several libraries: retry_or_raise sorts them
            failures += 1
            retry_or_raise(e, failures, f"listing the files of {name} ({subset})")


class HubStream:
    """The documents of a list of parquet files, read file by file from a (file, row) position.

    A file is opened where the stream is, and only the row groups from the one holding that row are read
    (the file's footer says how many rows each holds), so a resumed run, or a retry after a network
    error, reads again at most one row group of one file, not the documents before it. `position` turns
    a document's index in the stream back into the (file, row) to start from, for the manifest."""

    def __init__(self, files, shards):
        self.files = files
        last = shards[-1] if shards else dict(next_document=0, next_file=files[0], next_row=0)
        self.document = last["next_document"]  # index in the stream of the next document to deliver
        if "next_file" in last:
            self.file, self.row = files.index(last["next_file"]), last["next_row"]
        else:  # a manifest of an older prepare.py: from the first file, whole files skipped by their footers
            self.file, self.row = 0, self.document
        self.starts = {}  # file index -> index in the stream of its row 0, for each file opened

    def documents(self):
        """(text, characters, 0) for each document (a whole one: it starts at 0), retrying transient errors
        from where the stream stopped."""
        failures = 0
        while self.file < len(self.files):
            try:
                for text in self.read_file():
                    failures = 0  # progress: the next error gets a full set of tries again
                    yield text, len(text), 0
            except PrepareError:
                raise
            except Exception as e:  # the hub's errors come from several libraries: retry_or_raise sorts them
                failures += 1
                where = f"reading {source_file_name(self.files[self.file])} at row {self.row:,}"
                retry_or_raise(e, failures, where)

    def read_file(self):
        """The texts of the current file from the current row on; the position moves past each one
        before it is handed out, and to the next file at the end."""
        import fsspec  # comes with datasets; opens hf:// paths (huggingface_hub's file system) and local ones
        import pyarrow.parquet as pq

        path = self.files[self.file]
        with fsspec.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            if "text" not in parquet.schema_arrow.names:
                raise PrepareError(f"{path!r} has no 'text' column (columns: {', '.join(parquet.schema_arrow.names)})")
            self.starts[self.file] = self.document - self.row
            for row, text in parquet_texts(parquet, self.row):
                self.row, self.document = row + 1, self.document + 1
                yield text
            rows = parquet.metadata.num_rows
        self.file, self.row = self.file + 1, max(0, self.row - rows)  # past the end only from an older manifest

    def position(self, document):
        """(file, row) of a document that has been read: the last file opened that starts at or before it."""
        file = max(i for i, start in self.starts.items() if start <= document)
        return self.files[file], document - self.starts[file]


def parquet_texts(parquet, start_row):
    """(row, text) for the rows of a parquet file from start_row on. The row groups before the one that
    holds start_row are skipped unread; each group is read on its own, so memory stays one group."""
    first = 0  # the current row group's first row
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if first + rows <= start_row:
            first += rows
            continue
        for batch in parquet.iter_batches(batch_size=1024, row_groups=[group], columns=["text"]):
            for text in batch.column(0).to_pylist():
                if first >= start_row:
                    yield first, text or ""
                first += 1


def source_file_name(path):
    """A hub file's path in its dataset (sample/10BT/000_00000.parquet), or a local file's name."""
    if path.startswith("hf://") and "@" in path:  # hf://datasets/NAME@COMMIT/PATH
        return path.split("@", 1)[1].split("/", 1)[1]
    return os.path.basename(path)


def retry_or_raise(error, failures, what):
    """After `failures` failures in a row of `what`: pause and return, with one line saying so, when
    another try may help; else raise the one line that ends the run."""
    name, subset = FINEWEB_EDU
    if not is_transient(error):
        raise PrepareError(f"{what}: {first_line(error)}") from None
    if failures >= DOWNLOAD_RETRIES:
        raise PrepareError(f"downloading {name} ({subset}) failed {failures} times: {first_line(error)}") from None
    print(f"\n{what} failed ({type(error).__name__}: {first_line(error)[:100]}); "
          f"retrying in {RETRY_PAUSE_S:.0f} s (try {failures + 1} of {DOWNLOAD_RETRIES})", file=sys.stderr)
    time.sleep(RETRY_PAUSE_S)


def is_transient(error):
    """Whether trying again may help. The root cause decides (the deepest exception of the chain that
    says anything): a dataset card that cannot be fetched is a "not found" caused by a dropped
    connection, and a "couldn't reach the hub" can be caused by offline mode."""
    verdict = False  # an error nothing recognises is not retried: the run continues from here when run again
    for cause in exception_chain(error):
        kind = error_kind(cause)
        verdict = kind if kind is not None else verdict
    return verdict


def error_kind(error):
    """True: transient (a dropped connection, a timeout, a server error, too many requests); False: no
    retry can fix it (offline mode, not found, no permission, a bad value); None: says nothing."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    status = getattr(getattr(error, "response", None), "status_code", None)  # an HTTP error's (hub, httpx, requests)
    if isinstance(error, OfflineModeIsEnabled):
        return False
    if isinstance(status, int):
        return status == 429 or status >= 500
    if isinstance(error, (FileNotFoundError, PermissionError, ValueError)):  # datasets' not-found, an unknown subset
        return False
    if isinstance(error, OSError):  # connection errors, timeouts, broken reads; requests' errors are OSErrors too
        return True
    if any(c.__name__ == "TransportError" for c in type(error).__mro__):  # httpx's (huggingface_hub's client) errors
        return True
    return None


# -----------------------------------------------------------------------------
# Tokenizing, in worker processes


def tokenize_batch(pieces):
    """The tokens of (text, where it starts in its document) pieces, <|endoftext|> first in a piece that
    begins a document (at 0): one uint16 array, each piece's token count, and where each starts (handed
    back with the tokens, for the writer)."""
    enc = get_tokenizer()
    texts = [text_tokens(enc, text) for text, _ in pieces]
    at = np.array([start for _, start in pieces], dtype=np.int64)
    eot = np.array([EOT], dtype=np.uint32)
    tokens = np.concatenate([part for t, a in zip(texts, at) for part in ((eot, t) if a == 0 else (t,))])
    assert tokens.max() < 2**16, "a token id does not fit in uint16"
    return tokens.astype(np.uint16), np.array([(a == 0) + len(t) for t, a in zip(texts, at)], dtype=np.int64), at


def text_tokens(enc, text):
    """A text's tokens, as uint32: encode_ordinary straight into an array (encode_to_numpy with no special
    tokens allowed). A lone surrogate ("\\ud800", valid JSON and common in scraped text, but no character,
    so no UTF-8 for the tokenizer) becomes U+FFFD, as tiktoken's encode_ordinary does: only a text that
    holds one pays for the fix-up."""
    try:
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # (a pair becomes its character)
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())


def batches_of(pieces, progress):
    """Pieces of documents, as (text, where it starts in its document), in lists of about BATCH_CHARS
    characters; the progress bar counts the bytes read (and those done before: text None)."""
    batch, size = [], 0
    for text, n_bytes, at in pieces:
        progress.update(n_bytes)
        if text is None:
            continue
        batch.append((text, at))
        size += len(text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenized(batches, num_proc):
    """tokenize_batch over `batches`, in order, in num_proc processes with a few batches in flight
    (reading runs ahead of tokenizing by at most that much, so memory stays flat). The platform's
    start method: fork on Linux; spawn on macOS and Windows, where each worker imports this file
    afresh, which is why nothing in it runs at import."""
    if num_proc == 1:
        yield from map(tokenize_batch, batches)
        return
    with multiprocessing.Pool(num_proc, initializer=quiet_worker) as pool:  # leaving it ends the workers
        in_flight = []
        for batch in batches:
            in_flight.append(pool.apply_async(tokenize_batch, (batch,)))
            if len(in_flight) >= 2 * num_proc:
                yield in_flight.pop(0).get()
        for result in in_flight:
            yield result.get()


def quiet_worker():
    """A worker leaves signals to the main process: Ctrl-C (SIGINT to the whole process group) is ignored,
    and SIGTERM, which the main process turns into an interruption (main) and sends its workers when it
    ends the pool, ends a worker at once. Neither prints a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# -----------------------------------------------------------------------------
# Shards and the manifest


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Cuts the token stream into shards and keeps the manifest up to date after each one.

    Positions are counted in the whole corpus's token stream, which arrives in pieces of documents (a
    whole one, or a part of a text file's: read_documents). A shard is written only once the token after
    it has arrived, so the writer knows whether the corpus fills more than one shard (then the first
    shard is validation) or fits in one (then it is split 90/10 at the end). `locate`, when given, turns
    a document's index into the (file, row) where the source holds it (HubStream.position)."""

    def __init__(self, out_dir, manifest, locate=None):
        self.out_dir, self.manifest, self.locate = out_dir, manifest, locate
        self.shard_size = manifest["shard_size"]
        self.buffer = np.empty(self.shard_size, dtype=np.uint16)  # the one shard held in memory (check_memory)
        self.filled = 0
        done = manifest["shards"][-1] if manifest["shards"] else dict(next_document=0, next_offset=0)
        # the stream goes on with document next_document, from its byte next_byte (absent: its start)
        self.resume = done["next_document"], done.get("next_byte", 0)
        self.position = sum(s["tokens"] for s in manifest["shards"])  # next token to place
        self.documents = done["next_document"] + (self.resume[1] > 0)  # documents begun before the next piece
        self.document_start = self.position - done["next_offset"]  # where the last one begun starts
        self.stream_position = self.document_start + done.get("next_byte_offset", 0)  # where the next piece starts

    def resume_point(self):
        """(documents to skip, the byte of the next one to read from)."""
        return self.resume

    def add(self, tokens, lengths, at):
        """Append pieces of documents, each `lengths` tokens, starting at byte `at` of its document (0
        begins one). The first piece may be partly written already, on a resume."""
        starts = self.stream_position + np.cumsum(lengths) - lengths  # stream position where each piece starts
        data = tokens[self.position - self.stream_position:]  # skip what earlier shards hold
        while len(data):
            if self.filled == self.shard_size:  # full, and a token follows: write it
                self.write_shard(self.buffer, "val" if not self.manifest["shards"] else "train",
                                 self.where(self.position, starts, at))
                self.save_manifest()
                self.filled = 0
            take = min(self.shard_size - self.filled, len(data))
            self.buffer[self.filled: self.filled + take] = data[:take]
            self.filled += take
            self.position += take
            data = data[take:]
        begun = np.flatnonzero(at == 0)
        if len(begun):
            self.document_start = int(starts[begun[-1]])
        self.documents += len(begun)
        self.stream_position = int(starts[-1] + lengths[-1])

    def where(self, position, starts, at):
        """Where in the documents a stream position within this batch's pieces is, as a shard entry records
        it: the document, its tokens before the position, and when the piece holding it is not the
        document's first, where that piece starts: its byte and the document's tokens before it."""
        piece = int(np.searchsorted(starts, position, side="right")) - 1  # pieces are never empty
        begun = np.flatnonzero(at[: piece + 1] == 0)  # the documents this batch begins, up to that piece
        document_start = int(starts[begun[-1]]) if len(begun) else self.document_start
        where = dict(next_document=self.documents + len(begun) - 1, next_offset=position - document_start)
        if at[piece]:  # a resumed run reads from there
            where.update(next_byte=int(at[piece]), next_byte_offset=int(starts[piece]) - document_start)
        return where

    def finish(self):
        """Write what is left, and mark the manifest complete: in one manifest update, so a run killed
        between the two shards of a small corpus redoes both."""
        if not self.manifest["shards"]:  # the corpus fits in one shard: its last 10% is validation
            n_val = max(1, int(self.filled * VAL_FRACTION))
            if self.filled - n_val < 2:
                raise PrepareError(f"the corpus has {self.filled} tokens: too few to split into train and val")
            self.write_shard(self.buffer[: self.filled - n_val], "train", self.end())
            self.write_shard(self.buffer[self.filled - n_val: self.filled], "val", self.end())
        elif self.filled:
            self.write_shard(self.buffer[: self.filled], "train", self.end())
        self.manifest["complete"] = True
        self.save_manifest()

    def end(self):
        """Where the end of the stream is, as write_shard records it (all documents whole)."""
        return dict(next_document=self.documents, next_offset=0)

    def write_shard(self, tokens, split, where):
        """Write one shard and add it to the manifest (in memory: save_manifest writes it out), with
        `where` the stream goes on after it (ShardWriter.where, or end)."""
        index = len(self.manifest["shards"])
        file = f"{split}_{index:06d}.npy"
        path = os.path.join(self.out_dir, file)
        write_atomically(path, lambda f: np.save(f, tokens))
        entry = dict(file=file, split=split, tokens=len(tokens), sha256=sha256_of(path), **where)
        if self.locate:
            entry["next_file"], entry["next_row"] = self.locate(where["next_document"])
        self.manifest["shards"].append(entry)
        self.manifest["tokens"] = sum(s["tokens"] for s in self.manifest["shards"])
        self.manifest["documents"] = where["next_document"] + (where["next_offset"] > 0)  # begun in the shards

    def save_manifest(self):
        text = json.dumps(self.manifest, indent=1) + "\n"
        write_atomically(os.path.join(self.out_dir, MANIFEST), lambda f: f.write(text.encode()))


def start_manifest(out_dir, source_name, shard_size, fingerprint=None):
    """The manifest to continue: the one in out_dir (its shards checked, and for a local source its
    fingerprint: source_fingerprint), or a new one."""
    path = os.path.join(out_dir, MANIFEST)
    fresh = dict(tokenizer="gpt2", dtype="uint16", source=source_name, shard_size=shard_size)
    if fingerprint is not None:  # (FineWeb-Edu's files are pinned to a commit instead: source_files)
        fresh["source_fingerprint"] = fingerprint
    fresh.update(shards=[], documents=0, tokens=0, complete=False)
    if not os.path.exists(path):
        if glob.glob(os.path.join(out_dir, "*.npy")):
            raise PrepareError(f"{out_dir!r} holds .npy files but no {MANIFEST}: use an empty or new --out_dir")
        return fresh
    try:
        with open(path) as f:
            manifest = json.load(f)
        mine = {k: manifest[k] for k in ("tokenizer", "source", "shard_size")}
    except (ValueError, KeyError, TypeError):
        raise PrepareError(f"{path!r} is not a manifest written by prepare.py; use another --out_dir") from None
    problem = manifest_problem(manifest)
    if problem:
        raise PrepareError(f"{path!r} is not a manifest as prepare.py writes it: {problem}; use another --out_dir")
    if mine != {k: fresh[k] for k in mine}:
        raise PrepareError(f"{out_dir!r} holds shards of {manifest['source']} (shard size {manifest['shard_size']:,}), "
                           f"not of {source_name} (shard size {shard_size:,}): use another --out_dir")
    change = fingerprint_change(manifest.get("source_fingerprint"), fingerprint, path)
    if change:
        raise PrepareError(f"{source_name} has changed since {out_dir!r} was prepared from it ({change}): delete "
                           f"{out_dir!r} to prepare it again, or choose another --out_dir")
    manifest = {**fresh, **manifest}  # an older prepare.py's manifest has no fingerprint: from now on, this one
    for i, shard in enumerate(manifest["shards"]):  # keep the shards that are intact, redo from the first that is not
        shard_path = os.path.join(out_dir, shard["file"])
        if not os.path.isfile(shard_path) or sha256_of(shard_path) != shard["sha256"]:
            print(f"{shard['file']} is missing or damaged: continuing from it", file=sys.stderr)
            manifest["shards"], manifest["complete"] = manifest["shards"][:i], False
            break
    return manifest


def fingerprint_change(recorded, now, path):
    """What differs between a manifest's fingerprint (at `path`) and the source's now, in a few words (the
    first file that differs), or None: the same, or nothing to compare (an older prepare.py's manifest,
    without one, or FineWeb-Edu)."""
    if recorded is None or now is None or recorded == now:
        return None
    if type(recorded) is not list or not all(is_fingerprint_entry(entry) for entry in recorded):
        raise PrepareError(f"{path!r} is not a manifest as prepare.py writes it: its source_fingerprint is not a "
                           "list of [file, size, mtime_ns]; use another --out_dir")
    before, after = {name: rest for name, *rest in recorded}, {name: rest for name, *rest in now}
    for name in sorted(before.keys() | after.keys()):
        if name not in after:
            return f"{name} removed"
        if name not in before:
            return f"{name} added"
        if before[name] != after[name]:
            return f"{name} has another size or modification time"
    return "its files are in another order"


def is_fingerprint_entry(entry):
    return (type(entry) is list and len(entry) == 3 and isinstance(entry[0], str)
            and all(type(number) is int for number in entry[1:]))


# -----------------------------------------------------------------------------
# Disk space


def needed_bytes(files, manifest):
    """About how many bytes the shards still need, at 2 a token: the source's tokens estimated from its
    files' size (~4 bytes a token; parquet's compression makes that an underestimate, which is the safe
    side), or FineWeb-Edu's ~10B tokens when its files are on the hub."""
    if files is None:
        tokens = FINEWEB_EDU_TOKENS
    else:
        tokens = sum(os.path.getsize(f) for f in files) // TEXT_BYTES_PER_TOKEN
    return 2 * max(0, tokens - sum(s["tokens"] for s in manifest["shards"]))


def check_disk_space(out_dir, needed):
    """Refuse to start when the disk out_dir is on clearly lacks the space the shards need."""
    path = os.path.abspath(out_dir)
    while not os.path.exists(path):  # out_dir is made later: the disk it will be on
        path = os.path.dirname(path)
    _, _, free = shutil.disk_usage(path)
    if free < DISK_SLACK * needed:
        raise PrepareError(f"not enough disk space: {out_dir!r} has {in_units(free)} free and the shards need about "
                           f"{in_units(needed)} (2 bytes a token); free some space or choose another --out_dir")


# -----------------------------------------------------------------------------
# Memory: one shard is held in memory while it fills


def check_memory(shard_size):
    """Refuse a shard that the machine's RAM cannot hold, before anything is written."""
    ram = ram_bytes()
    if ram is not None and 2 * shard_size > ram:
        raise PrepareError(f"--shard_size {shard_size:,} needs {in_units(2 * shard_size, binary=True)} of memory "
                           f"for the shard being filled (2 bytes a token), more than this machine's "
                           f"{in_units(ram, binary=True)}; choose a smaller --shard_size")


# -----------------------------------------------------------------------------
# The whole preparation, and its command line


def prepare(source, out_dir, shard_size=SHARD_SIZE, num_proc=1, show_progress=True):
    """Tokenize `source` into shards in out_dir; returns the manifest. Continues an interrupted run."""
    from tqdm import tqdm

    hub = source == "fineweb-edu"
    files = stand_in_files() if hub else local_files(source)  # None: FineWeb-Edu's files, listed on the hub below
    source_name = f"{FINEWEB_EDU[0]}:{FINEWEB_EDU[1]}" if hub else os.path.abspath(source)
    fingerprint = None if hub else source_fingerprint(source, files)
    manifest = start_manifest(out_dir, source_name, shard_size, fingerprint)
    if manifest["complete"]:
        return manifest
    check_disk_space(out_dir, needed_bytes(files, manifest))  # before anything is written
    check_memory(shard_size)
    if hub and files is None:  # FineWeb-Edu's files come from the hub: it must be there before a folder is made
        check_online()
    os.makedirs(out_dir, exist_ok=True)
    remove_unfinished_writes(out_dir)
    stream = None
    if hub:  # listed once, by the first run: a resumed run reads the same files, at the same commit
        manifest["source_files"] = manifest.get("source_files") or files or hub_files()
        stream = HubStream(manifest["source_files"], manifest["shards"])
    writer = ShardWriter(out_dir, manifest, stream.position if hub else None)
    writer.save_manifest()  # first of all: from now on the folder says whose shards it holds
    skip_documents, byte = writer.resume_point()
    documents = stream.documents() if hub else local_documents(files, skip_documents, byte)
    total_bytes = 4 * FINEWEB_EDU_TOKENS if hub else sum(os.path.getsize(f) for f in files)  # ~4 bytes a token
    done_bytes = 4 * writer.position if hub else 0  # (a resumed local run's documents count what was done)
    desc = f"{'resuming' if manifest['shards'] else 'tokenizing'} {source}"
    with tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, smoothing=0.05, desc=desc,
              disable=not show_progress) as progress, \
            contextlib.closing(tokenized(batches_of(documents, progress), num_proc)) as results:  # (ends the workers)
        for tokens, lengths, at in results:
            writer.add(tokens, lengths, at)
            progress.set_postfix_str(f"{writer.position:,} tokens, {len(manifest['shards'])} shards", refresh=False)
    if writer.position == writer.documents:  # every document was empty: nothing but separators
        raise PrepareError(f"{source!r} holds no text")
    if fingerprint is not None and source_fingerprint(source, files) != fingerprint:  # (not marked complete)
        raise PrepareError(f"{source_name} changed while it was read: the shards in {out_dir!r} may mix both "
                           f"versions; delete {out_dir!r} and run the command again")
    writer.finish()
    return manifest


# what write_atomically leaves of a write a killed run did not finish: a shard's or the manifest's name + ".tmp"
UNFINISHED_WRITE = re.compile(rf"(train|val)_\d{{6,}}\.npy\.tmp|{re.escape(MANIFEST)}\.tmp")


def remove_unfinished_writes(out_dir):
    """Remove the temporary files of writes a killed run left unfinished, and no other file: out_dir may
    hold the user's own (a draft.tmp)."""
    for name in os.listdir(out_dir):
        if UNFINISHED_WRITE.fullmatch(name):
            os.remove(os.path.join(out_dir, name))


def tokenizer_processes(num_proc):
    """--num_proc, but no more than the CPUs this process may run on: tokenizing keeps a CPU busy, so more
    processes only cost memory and start-up (a mistyped 100000 would try to start that many)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if num_proc > cpus:
        print(f"--num_proc {num_proc}: this process may run on {cpus} CPUs, so {cpus} processes tokenize",
              file=sys.stderr)
    return min(num_proc, cpus)


def interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    parser = ArgumentParser(description="Tokenize a corpus into GPT-2 token shards for train_gpt2.py --data_dir.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("source", help="a .txt file, a folder of .txt/.jsonl/.parquet files, or fineweb-edu")
    parser.add_argument("--out_dir", default="", help="where the shards go (empty: data/<source name>)")
    parser.add_argument("--shard_size", type=int, default=SHARD_SIZE, help="tokens per shard")
    parser.add_argument("--num_proc", type=int, default=os.cpu_count(), help="tokenizer processes")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or os.path.join("data", os.path.splitext(os.path.basename(os.path.normpath(args.source)))[0])
    previous = signal.signal(signal.SIGTERM, interrupt)  # as Ctrl-C: the workers ended, the complete shards kept
    try:
        if args.shard_size < 2 or args.num_proc < 1:
            raise PrepareError("--shard_size must be at least 2 and --num_proc at least 1")
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise PrepareError(f"--out_dir {out_dir!r} is a file, not a folder")
        args.num_proc = tokenizer_processes(args.num_proc)
        manifest = prepare(args.source, out_dir, args.shard_size, args.num_proc)
    except DiskFull as e:  # the shards and manifest written so far are intact
        print(f"error: {e}; free some space and run the same command to continue", file=sys.stderr, flush=True)
        return 1
    except (PrepareError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the complete shards are kept; run the same command to continue", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    splits = [s["split"] for s in manifest["shards"]]
    print(f"{out_dir}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens in "
          f"{splits.count('train')} train and {splits.count('val')} val shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
