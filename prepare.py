"""
Tokenize a corpus into shards of GPT-2 tokens, for `python train_gpt2.py --data_dir DIR`. A sibling of
train_gpt2.py (the story) that needs only the package machinery/: the documents come from
machinery/corpus.py (local files) or machinery/fineweb.py (the hub), and this file tokenizes them in
worker processes and cuts the tokens into shards, in that order. machinery/shard_folder.py checks the
folder they go to (a killed run's manifest and shards, a finished one, the lock on it, the disk space and
memory the shards need).

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
may run across two shards. A text file is one document, read and tokenized in pieces of about 1 MiB,
cut where the pieces' tokens are exactly the whole text's (corpus.safe_cut): a big one shows its
progress and is held in memory a few pieces at a time. The first shard is validation when the corpus
fills more than one shard; a smaller corpus is split into train (its first 90%) and val (its last 10%).

Killed at any point, the same command continues: each shard is written under a temporary name and
renamed when complete, the manifest lists only complete shards (checked against their SHA-256 and token
counts when the command runs again: a shard that differs is made again), and it records where in the
document stream the next shard begins. Inside a text file that is also a byte, where a piece begins:
a resumed run reads the file from there. For FineWeb-Edu that is also a source file and row, and a
resumed run, or a retry after a network error, starts there: it reads again at most the row group it
stopped in (at worst its one ~2 GB file), never the files before it. A dropped connection, a timeout or
a server error is retried (one line each, a few tries in a row); offline mode, a hub whose name does
not resolve, a dataset or subset the hub does not know, or a refused permission end the run at once,
in one line. A local source whose files changed since the shards were begun (its fingerprint), or
while it was read, is refused in one line: the shards would be of the old version, or mix both (an
unfinished folder whose source changed only in files its shards hold nothing of, say a bad line that
stopped the run fixed, goes on: its shards are the changed source's too). A
finished out_dir is checked again as train_gpt2.py checks it, and its totals and splits against its
shards; a manifest that says otherwise (edited by hand), or a place to resume from that the source
does not have, is one line, never a success.

Before writing, the free space in out_dir is checked against an estimate of what the shards need
(2 bytes a token: about 20 GB for fineweb-edu, half the size of a local source); a disk that fills up
during the run ends it in one line, and the same command continues once space is freed.
"""

import argparse
import contextlib
import glob
import json
import math
import multiprocessing
import os
import signal
import sys
import threading
import time

import numpy as np

from machinery.command_line import ArgumentParser
from machinery.corpus import local_documents, local_files, source_fingerprint
from machinery.files import (BarStream, DiskFull, PrepareError, SettingError, folder_problem, print_line, sha256_of,
                             write_atomically)
from machinery.fineweb import HubStream, check_online, hub_files, stand_in_files
from machinery.shard_folder import (check_disk_space, check_finished, check_memory, finished_problem, lock_out_dir,
                                    refuse_folders_under_its_names, remove_unfinished_writes, start_manifest)
from machinery.tokens import FINEWEB_EDU, MANIFEST, SHARD_SIZE, blank_ids, get_tokenizer

FINEWEB_EDU_TOKENS = 10_000_000_000  # for the progress bar's ETA and the disk-space estimate only
EOT = 50256  # <|endoftext|>: starts every document
VAL_FRACTION = 0.1  # of a corpus that fits in one shard
BATCH_CHARS = 1_000_000  # text handed to a worker at once: big enough to amortise the hand-over
TEXT_BYTES_PER_TOKEN = 4  # GPT-2 on English: ~4 bytes of UTF-8 a token; for the estimates of disk space and ETA


# -----------------------------------------------------------------------------
# Tokenizing, in worker processes


def tokenize_batch(pieces):
    """The tokens of (text, at) pieces, `at` the byte where the piece starts in its document (0: it begins
    one; a big .txt document comes in several pieces), <|endoftext|> first in a piece that begins a
    document. Returns (tokens: one uint16 array, lengths: each piece's token count, at: each `at`, handed
    back with the tokens for the writer)."""
    enc = get_tokenizer()
    texts = [text_tokens(enc, text) for text, _ in pieces]
    at = np.array([start for _, start in pieces], dtype=np.int64)
    eot = np.array([EOT], dtype=np.uint32)  # (the dtype of encode_to_numpy's arrays)
    tokens = np.concatenate([part for t, a in zip(texts, at) for part in ((eot, t) if a == 0 else (t,))])
    assert tokens.max() < 2**16, "a token id does not fit in uint16"
    lengths = np.array([(a == 0) + len(t) for t, a in zip(texts, at)], dtype=np.int64)  # (+1: the <|endoftext|>)
    return tokens.astype(np.uint16), lengths, at


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
    characters; the progress bar counts the bytes read, and those an earlier run did, which the source
    hands over as pieces with text None (corpus.local_documents)."""
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
    start method: fork or forkserver on Linux, spawn on macOS and Windows; the last two start each
    worker by importing this file afresh, which is why nothing in it runs at import."""
    if num_proc == 1:
        yield from map(tokenize_batch, batches)
        return
    with multiprocessing.Pool(num_proc, initializer=quiet_worker) as pool:  # leaving it ends the workers
        in_flight = []
        for batch in batches:
            in_flight.append(pool.apply_async(tokenize_batch, (batch,)))
            if len(in_flight) >= 2 * num_proc:  # (two a worker: each has its next batch waiting)
                yield in_flight.pop(0).get()
        for result in in_flight:
            yield result.get()


def quiet_worker():
    """A worker leaves signals to the main process, which ends the pool when it is interrupted (a SIGTERM
    to each worker, which ends it at once). A worker ignores Ctrl-C, and it leaves the process group
    (where the OS has them), so that a SIGTERM sent to the whole group (by a scheduler, or kill --
    -PGID) reaches only the main process: a worker killed while it holds the lock on the pool's task
    queue, as it does while it waits for its next batch, would leave the main process waiting for that
    lock forever as it ends the pool. A main process killed outright ends its workers too (die_with_parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (not main's handler, which forked workers inherit)
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    die_with_parent()


PR_SET_PDEATHSIG = 1  # Linux's prctl option: the signal a process gets when the one that started it ends
ORPHAN_POLL_SECONDS = 0.05  # elsewhere: how often a worker looks for its main process


def die_with_parent():
    """The worker ends the moment the main process ends, killed outright (kill -9, the OOM killer) included:
    a worker left busy with a batch would go on with it, then find the pool's pipe closed as it hands back
    its tokens and print a BrokenPipeError traceback as it ends (an idle one ends as its queue closes). On
    Linux the kernel kills it; elsewhere (macOS) a thread ends it once it is handed to another parent,
    within ORPHAN_POLL_SECONDS (a batch may end first, and print that traceback)."""
    if not kernel_ends_with_parent():
        threading.Thread(target=end_when_orphaned, args=(os.getppid(),), daemon=True).start()


def kernel_ends_with_parent():
    """Whether the kernel will SIGKILL this process when its parent ends: asked of Linux's prctl."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        return ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0
    except (OSError, AttributeError):  # (a libc without prctl: as elsewhere)
        return False


def end_when_orphaned(parent):
    """Poll the parent's pid: the main process's until it ends, then the one the OS hands orphans to."""
    while os.getppid() == parent:
        time.sleep(ORPHAN_POLL_SECONDS)
    os._exit(1)  # (at once: no clean-up of a pool whose main process is gone)


# -----------------------------------------------------------------------------
# Shards and the manifest, written (a folder of them checked: machinery/shard_folder.py)


def save_npy(f, tokens):
    """np.save(f, tokens), byte for byte, through the file's own writes: np.save hands a real file's
    array to a C stdio stream, and a full disk found when that stream is flushed can go unnoticed,
    leaving a short shard that the manifest would list (with its SHA-256) as whole."""
    np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(tokens))
    f.write(memoryview(np.ascontiguousarray(tokens)))


class ShardWriter:
    """Cuts the token stream into shards and keeps the manifest up to date after each one.

    Positions are counted in the whole corpus's token stream, which arrives in pieces of documents (a whole
    one, or a part of a text file's: corpus.local_documents or fineweb.HubStream). A shard is written only
    once the token after it has arrived, so the writer knows whether the corpus fills more than one shard
    (then the first shard is validation) or fits in one (then it is split 90/10 at the end). `locate`, when
    given, turns a document's index into the (file, row) where the source holds it (HubStream.position)."""

    def __init__(self, out_dir, manifest, locate=None):
        self.out_dir, self.manifest, self.locate = out_dir, manifest, locate
        self.shard_size = manifest["shard_size"]
        self.buffer = np.empty(self.shard_size, dtype=np.uint16)  # the one shard in memory (shard_folder.check_memory)
        self.filled = 0
        done = manifest["shards"][-1] if manifest["shards"] else dict(next_document=0, next_offset=0)
        # the stream goes on with document next_document, from its byte next_byte (absent: its start)
        self.resume = done["next_document"], done.get("next_byte", 0)
        # (position and stream_position differ only on a resume: its first piece is partly in shards already)
        self.position = sum(s["tokens"] for s in manifest["shards"])  # next token to place
        self.documents = done["next_document"] + (self.resume[1] > 0)  # documents begun before the next piece
        self.document_start = self.position - done["next_offset"]  # where the last one begun starts
        self.stream_position = self.document_start + done.get("next_byte_offset", 0)  # where the next piece starts
        self.text_seen = bool(manifest["shards"])  # a token that is not whitespace (a resume: in its shards)

    def resume_point(self):
        """(documents to skip, the byte of the next one to read from)."""
        return self.resume

    def add(self, tokens, lengths, at):
        """Append pieces of documents, each `lengths` tokens, starting at byte `at` of its document (0
        begins one). The first piece may be partly written already, on a resume."""
        starts = self.stream_position + np.cumsum(lengths) - lengths  # stream position where each piece starts
        data = tokens[self.position - self.stream_position:]  # skip what earlier shards hold (a resume's first)
        self.text_seen = self.text_seen or not blank_ids()[data].all()  # (a corpus's first batch, in practice)
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
        between the two shards of a small corpus redoes both. Not if the manifest disagrees with the source
        or its shards (edited by hand: the place a resumed run went on from was past the source's end)."""
        if self.position != self.stream_position:  # (the tokens placed, and where the source's ended)
            self.refuse("its last shard's next_document, next_offset or next_byte is past the end of the source")
        if not self.manifest["shards"]:  # the corpus fits in one shard: its last 10% is validation
            n_val = max(1, int(self.filled * VAL_FRACTION))
            if self.filled - n_val < 2:
                raise PrepareError(f"the corpus has {self.filled} tokens: too few to split into train and val")
            self.write_shard(self.buffer[: self.filled - n_val], "train", self.end())
            self.write_shard(self.buffer[self.filled - n_val: self.filled], "val", self.end())
        elif self.filled:
            self.write_shard(self.buffer[: self.filled], "train", self.end())
        problem = finished_problem(self.manifest)
        if problem:
            self.refuse(problem)
        self.manifest["complete"] = True
        self.save_manifest()

    def refuse(self, problem):
        raise PrepareError(f"{os.path.join(self.out_dir, MANIFEST)!r} disagrees with its source: {problem}; delete "
                           f"{self.out_dir!r} to prepare it again, or choose another --out_dir")

    def end(self):
        """Where the end of the stream is, as write_shard records it (all documents whole)."""
        return dict(next_document=self.documents, next_offset=0)

    def write_shard(self, tokens, split, where):
        """Write one shard and add it to the manifest (in memory: save_manifest writes it out), with
        `where` the stream goes on after it (ShardWriter.where, or end)."""
        index = len(self.manifest["shards"])
        file = f"{split}_{index:06d}.npy"
        path = os.path.join(self.out_dir, file)
        write_atomically(path, lambda f: save_npy(f, tokens))
        entry = dict(file=file, split=split, tokens=len(tokens), sha256=sha256_of(path), **where)
        if self.locate:
            entry["next_file"], entry["next_row"] = self.locate(where["next_document"])
        self.manifest["shards"].append(entry)
        self.manifest["tokens"] = sum(s["tokens"] for s in self.manifest["shards"])
        self.manifest["documents"] = where["next_document"] + (where["next_offset"] > 0)  # begun in the shards

    def save_manifest(self):
        text = json.dumps(self.manifest, indent=1) + "\n"
        write_atomically(os.path.join(self.out_dir, MANIFEST), lambda f: f.write(text.encode()))


# -----------------------------------------------------------------------------
# Disk space: the estimate (the check: shard_folder.check_disk_space)


def needed_bytes(files, manifest):
    """About how many bytes the shards still need, at 2 a token: the source's tokens estimated from its
    files' size (~4 bytes a token; parquet's compression makes that an underestimate: the check never
    refuses wrongly, and a disk that fills anyway ends the run in one line, to continue once space is freed),
    or FineWeb-Edu's ~10B tokens when its files are on the hub."""
    if files is None:
        tokens = FINEWEB_EDU_TOKENS
    else:
        tokens = sum(os.path.getsize(f) for f in files) // TEXT_BYTES_PER_TOKEN
    return 2 * max(0, tokens - sum(s["tokens"] for s in manifest["shards"]))


# -----------------------------------------------------------------------------
# The whole preparation, and its command line


def prepare(source, out_dir, shard_size=SHARD_SIZE, num_proc=1, show_progress=True):
    """Tokenize `source` into shards in out_dir; returns the manifest. Continues an interrupted run."""
    source, out_dir = os.fspath(source), os.fspath(out_dir)  # (a str or a pathlib.Path)
    hub = source == "fineweb-edu"
    files = stand_in_files() if hub else local_files(source)  # None: FineWeb-Edu's files, listed on the hub below
    source_name = f"{FINEWEB_EDU[0]}:{FINEWEB_EDU[1]}" if hub else os.path.abspath(source)
    fingerprint = None if hub else source_fingerprint(source, files)
    # held to the end: a second prepare.py into this folder is refused before it reads (or rewrites) anything
    lock = lock_out_dir(out_dir) if os.path.isdir(out_dir) else None
    try:
        if os.path.isdir(out_dir):
            refuse_folders_under_its_names(out_dir)
        manifest = start_manifest(out_dir, source_name, shard_size, fingerprint, files)
        if manifest["complete"]:  # (start_manifest checked its shards): checked again, nothing rewritten
            check_finished(out_dir, manifest)
            return manifest
        check_disk_space(out_dir, needed_bytes(files, manifest))  # before anything is written
        check_memory(shard_size)
        if hub and files is None:  # FineWeb-Edu's files come from the hub: it must be there before a folder is made
            check_online()
        os.makedirs(out_dir, exist_ok=True)
        lock = lock if lock is not None else lock_out_dir(out_dir)  # (a folder made just now: locked once it is there)
        remove_unfinished_writes(out_dir)
        if hub:  # listed once, by the first run: a resumed run reads the same files, at the same commit
            manifest["source_files"] = manifest.get("source_files") or files or hub_files()
        try:  # (a source that cannot be used: a bad line, no text, too little, a download that keeps failing)
            writer = write_shards(source, hub, out_dir, manifest, files, num_proc, show_progress)
            if fingerprint is not None and fingerprint_now(source, files) != fingerprint:  # before it is complete
                raise PrepareError(f"{source_name} changed while it was read: the shards in {out_dir!r} may mix "
                                   f"both versions; delete {out_dir!r} and run the command again")
            writer.finish()  # the last shards, and the manifest marked complete
        except PrepareError:
            forget_if_no_shards(out_dir)
            raise
    finally:
        if lock is not None:
            os.close(lock)
    return manifest


def forget_if_no_shards(out_dir):
    """After a source that could not be used, the manifest of a folder without a shard file goes too: the
    folder holds nothing worth keeping, and the same command, once the source is mended, starts afresh. Where
    shard files are (even ones the manifest no longer lists), it stays, to say whose they are."""
    if not glob.glob(os.path.join(glob.escape(out_dir), "*.npy")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, MANIFEST))


def fingerprint_now(source, files):
    """source_fingerprint taken again, or None when a file has gone (a change too)."""
    try:
        return source_fingerprint(source, files)
    except OSError:
        return None


def write_shards(source, hub, out_dir, manifest, files, num_proc, show_progress):
    """Read the documents from where the manifest stops, tokenize them in num_proc processes and cut the
    tokens into shards (ShardWriter), with a progress bar. Returns the writer, still holding the last
    shard's tokens: its finish() writes them and marks the manifest complete, once prepare has checked
    that the source did not change while it was read."""
    from tqdm import tqdm

    stream = HubStream(manifest["source_files"], manifest["shards"]) if hub else None
    writer = ShardWriter(out_dir, manifest, stream.position if hub else None)
    writer.save_manifest()  # first of all: from now on the folder says whose shards it holds
    skip_documents, byte = writer.resume_point()
    documents = stream.documents() if hub else local_documents(files, skip_documents, byte)
    # the bar counts the bytes of the source read (FineWeb-Edu's: characters, its size estimated from the tokens)
    total_bytes = TEXT_BYTES_PER_TOKEN * FINEWEB_EDU_TOKENS if hub else sum(os.path.getsize(f) for f in files)
    done_bytes = TEXT_BYTES_PER_TOKEN * writer.position if hub else 0  # (a resumed local run's documents count it)
    desc, shown = f"{'resuming' if manifest['shards'] else 'tokenizing'} {source}", writer.text_seen
    # the bar is shown from the first text on (a resume's: at once): a source refused before it has its line alone
    with tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, smoothing=0.05, desc=desc,
              disable=not show_progress, file=BarStream(), delay=0 if shown else math.inf) as progress, \
            contextlib.closing(tokenized(batches_of(documents, progress), num_proc)) as results:  # (ends the workers)
        try:
            for tokens, lengths, at in results:
                writer.add(tokens, lengths, at)
                progress.set_postfix_str(f"{writer.position:,} tokens, {len(manifest['shards'])} shards", refresh=False)
                if not shown and writer.text_seen:  # the first text: the bar shows, and from now on moves
                    shown, progress.delay = True, 0
                    progress.refresh()
            if writer.position == writer.documents:  # every document was empty: nothing but separators
                raise PrepareError(f"{source!r} holds no text")
            if not writer.text_seen:  # (as train_gpt2.py refuses an --input_file of whitespace)
                raise PrepareError(f"{source!r} holds only whitespace")
        except Exception:  # an error's one line stands alone: the bar is cleared (a stop leaves it: how far it got)
            progress.leave = False
            raise
    return writer


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


def default_out_dir(source):
    """data/<the source's name>: data/book for book.txt, data/corpus for corpus/, and for `.` inside it (the
    name of the folder it names, not "." or "..": data/.. would put the shards beside data/)."""
    return os.path.join("data", os.path.splitext(os.path.basename(os.path.abspath(source)))[0])


def main(argv=None):
    parser = ArgumentParser(description="Tokenize a corpus into GPT-2 token shards for train_gpt2.py --data_dir.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("source", help="a .txt file, a folder of .txt/.jsonl/.parquet files, or fineweb-edu")
    parser.add_argument("--out_dir", default="", help="where the shards go (empty: data/<source name>)")
    parser.add_argument("--shard_size", type=int, default=SHARD_SIZE, help="tokens per shard")
    parser.add_argument("--num_proc", type=int, default=os.cpu_count(), help="tokenizer processes")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or default_out_dir(args.source)
    previous = signal.signal(signal.SIGTERM, interrupt)  # as Ctrl-C: the workers ended, the complete shards kept
    try:
        for name, least in (("shard_size", 2), ("num_proc", 1)):
            if getattr(args, name) < least:
                raise PrepareError(f"--{name} must be at least {least}, got {getattr(args, name)}")
        problem = folder_problem(out_dir)  # (a file, a link to nowhere, a folder that cannot be made or written)
        if problem:
            raise PrepareError(f"--out_dir {out_dir!r} {problem}")
        args.num_proc = tokenizer_processes(args.num_proc)
        manifest = prepare(args.source, out_dir, args.shard_size, args.num_proc)
    except DiskFull as e:  # the shards and manifest written so far are intact
        print_line(f"error: {e}; free some space and run the same command to continue", sys.stderr)
        return 1
    except (PrepareError, SettingError, OSError) as e:  # (SettingError: the tokenizer's files or its cache)
        print_line(f"error: {e}", sys.stderr)
        return 1
    except KeyboardInterrupt:
        print_line("\ninterrupted: the complete shards are kept; run the same command to continue", sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    splits = [s["split"] for s in manifest["shards"]]
    print_line(f"{out_dir}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens in "  # (stdout gone:
               f"{splits.count('train')} train and {splits.count('val')} val shards", sys.stdout)  # said on stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
