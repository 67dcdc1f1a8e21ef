"""
Tokenize a corpus into shards of GPT-2 tokens, for `python train_gpt2.py --data_dir DIR`.

    python prepare.py fineweb-edu                      # HuggingFaceFW/fineweb-edu, sample-10BT -> data/fineweb-edu
    python prepare.py my_texts/ --out_dir data/mine    # every *.txt, *.jsonl, *.parquet in a folder
    python prepare.py book.txt --out_dir data/book --shard_size 1000000

What it writes in out_dir:
- shards: `val_000000.npy`, `train_000001.npy`, ... each a 1-D uint16 array of `--shard_size` tokens
  (the last one the remainder); `np.load(path, mmap_mode="r")` reads one without loading it.
- `manifest.json`: the tokenizer, the source, the shard size, one entry per shard in stream order
  (`file`, `split`, `tokens`, `sha256`, and where the next shard starts in the document stream), and the
  totals `documents` and `tokens`. The shards concatenated in manifest order are the corpus's tokens.

Every document is <|endoftext|> (50256) followed by its tokens, as GPT-2 was trained, and a document
may run across two shards. The first shard is validation when the corpus fills more than one shard;
a smaller corpus is split into train (its first 90%) and val (its last 10%).

Killed at any point, the same command continues: each shard is written under a temporary name and
renamed when complete, the manifest lists only complete shards (checked against their SHA-256 when
the command runs again), and it records where in the document stream the next shard begins.
"""

import argparse
import glob
import hashlib
import json
import multiprocessing
import os
import sys
import time

import numpy as np

from machinery import ArgumentParser, first_line, get_tokenizer

SHARD_SIZE = 100_000_000  # tokens per shard: 200 MB as uint16
FINEWEB_EDU = ("HuggingFaceFW/fineweb-edu", "sample-10BT")  # ~10B GPT-2 tokens in ~9.7M documents
FINEWEB_EDU_TOKENS = 10_000_000_000  # for the progress bar's ETA only
EOT = 50256  # <|endoftext|>: starts every document
VAL_FRACTION = 0.1  # of a corpus that fits in one shard
BATCH_CHARS = 1_000_000  # text handed to a worker at once: big enough to amortise the hand-over
DOWNLOAD_RETRIES, RETRY_PAUSE_S = 5, 10.0  # hub streaming: tries before giving up, pause between them
MANIFEST = "manifest.json"


class PrepareError(Exception):
    """Bad input: reported as one line."""


# -----------------------------------------------------------------------------
# Documents: a stream of texts, from local files or the hub


def local_files(source):
    """The files that make up a local source, in the order their documents are read."""
    if os.path.isfile(source):
        return [source]
    if not os.path.isdir(source):
        raise PrepareError(f"source {source!r} not found (a .txt file, a folder, or fineweb-edu)")
    files = sorted(f for pattern in ("*.txt", "*.jsonl", "*.parquet")
                   for f in glob.glob(os.path.join(source, "**", pattern), recursive=True))
    if not files:
        raise PrepareError(f"folder {source!r} has no .txt, .jsonl or .parquet files")
    return files


def read_documents(path):
    """The documents of one file, as (text, bytes read) pairs."""
    try:
        if path.endswith(".parquet"):
            yield from read_parquet(path)
        elif path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for line_number, line in enumerate(f, 1):
                    if line.strip():
                        yield jsonl_text(line, path, line_number), len(line)
        else:  # a text file is one document
            with open(path, "rb") as f:
                raw = f.read()
            yield raw.decode("utf-8"), len(raw)
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def jsonl_text(line, path, line_number):
    try:
        record = json.loads(line)
    except ValueError as e:
        raise PrepareError(f"{path}:{line_number} is not JSON: {first_line(e)}") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise PrepareError(f"{path}:{line_number} has no \"text\" string field")
    return record["text"]


def read_parquet(path):
    import pyarrow.parquet as pq  # comes with datasets; only parquet sources need it

    try:
        table = pq.ParquetFile(path)
        if "text" not in table.schema_arrow.names:
            raise PrepareError(f"{path!r} has no 'text' column (columns: {', '.join(table.schema_arrow.names)})")
        for batch in table.iter_batches(columns=["text"], batch_size=1024):
            for text in batch.column(0).to_pylist():
                yield text or "", len((text or "").encode("utf-8"))
    except PrepareError:
        raise
    except Exception as e:  # pyarrow's own errors: not a parquet file, truncated, ...
        raise PrepareError(f"{path!r} is not a readable parquet file: {first_line(e)}") from None


def local_documents(files, skip):
    """Every document of `files` after the first `skip`."""
    seen = 0
    for path in files:
        for text, n_bytes in read_documents(path):
            seen += 1
            if seen > skip:
                yield text, n_bytes


def hub_documents(skip):
    """FineWeb-Edu's documents streamed from the hub (nothing cached on disk), after the first `skip`.
    A broken connection is retried from where the stream stopped."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise PrepareError("fineweb-edu needs the datasets library: pip install -r requirements.txt") from None
    name, subset = FINEWEB_EDU
    done, failures = skip, 0
    while True:
        try:
            stream = load_dataset(name, name=subset, split="train", streaming=True)
            for row in stream.skip(done) if done else stream:
                done += 1
                failures = 0
                yield row["text"], len(row["text"])
            return
        except Exception as e:  # the hub's errors come from several libraries: retry any, report the last
            failures += 1
            if failures >= DOWNLOAD_RETRIES:
                raise PrepareError(f"downloading {name} ({subset}) failed {failures} times: {first_line(e)}") from None
            print(f"\ndownload error ({first_line(e)[:100]}); retrying in {RETRY_PAUSE_S:.0f} s", file=sys.stderr)
            time.sleep(RETRY_PAUSE_S)


# -----------------------------------------------------------------------------
# Tokenizing, in worker processes


def tokenize_batch(texts):
    """Each document as <|endoftext|> followed by its tokens: one uint16 array, and each one's length."""
    enc = get_tokenizer()
    # encode_to_numpy with no special tokens allowed is encode_ordinary straight into an array (uint32)
    docs = [enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=()) for text in texts]
    eot = np.array([EOT], dtype=np.uint32)
    tokens = np.concatenate([piece for d in docs for piece in (eot, d)])
    assert tokens.max() < 2**16, "a token id does not fit in uint16"
    return tokens.astype(np.uint16), np.array([1 + len(d) for d in docs], dtype=np.int64)


def batches_of(documents, progress):
    """Documents grouped into lists of about BATCH_CHARS characters."""
    batch, size = [], 0
    for text, n_bytes in documents:
        batch.append(text)
        size += len(text)
        progress.update(n_bytes)
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
    with multiprocessing.Pool(num_proc) as pool:
        in_flight = []
        for batch in batches:
            in_flight.append(pool.apply_async(tokenize_batch, (batch,)))
            if len(in_flight) >= 2 * num_proc:
                yield in_flight.pop(0).get()
        for result in in_flight:
            yield result.get()


# -----------------------------------------------------------------------------
# Shards and the manifest


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(path, write):
    """write(file) to a temporary name, then rename: a reader never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Cuts the token stream into shards and keeps the manifest up to date after each one.

    Positions are counted in the whole corpus's token stream. A shard is written only once the token
    after it has arrived, so the writer knows whether the corpus fills more than one shard (then the
    first shard is validation) or fits in one (then it is split 90/10 at the end)."""

    def __init__(self, out_dir, manifest):
        self.out_dir, self.manifest = out_dir, manifest
        self.shard_size = manifest["shard_size"]
        self.buffer = np.empty(self.shard_size, dtype=np.uint16)  # the one shard held in memory
        self.filled = 0
        done = manifest["shards"][-1] if manifest["shards"] else dict(next_document=0, next_offset=0)
        self.position = sum(s["tokens"] for s in manifest["shards"])  # next token to place
        self.documents = done["next_document"]  # index of the next document the stream delivers
        self.stream_position = self.position - done["next_offset"]  # where that document starts

    def resume_point(self):
        """(documents to skip, tokens of the next document already in shards)."""
        return self.documents, self.position - self.stream_position

    def add(self, tokens, lengths):
        """Append whole documents (the first may be partly written already, on a resume)."""
        ends = self.stream_position + np.cumsum(lengths)  # stream position where each document ends
        data = tokens[self.position - self.stream_position:]  # skip what earlier shards hold
        while len(data):
            if self.filled == self.shard_size:  # full, and a token follows: write it
                self.write_shard(self.buffer, "val" if not self.manifest["shards"] else "train", ends)
                self.save_manifest()
                self.filled = 0
            take = min(self.shard_size - self.filled, len(data))
            self.buffer[self.filled: self.filled + take] = data[:take]
            self.filled += take
            self.position += take
            data = data[take:]
        self.documents += len(lengths)
        self.stream_position = int(ends[-1])

    def finish(self):
        """Write what is left, and mark the manifest complete: in one manifest update, so a run killed
        between the two shards of a small corpus redoes both."""
        if not self.manifest["shards"]:  # the corpus fits in one shard: its last 10% is validation
            n_val = max(1, int(self.filled * VAL_FRACTION))
            if self.filled - n_val < 2:
                raise PrepareError(f"the corpus has {self.filled} tokens: too few to split into train and val")
            self.write_shard(self.buffer[: self.filled - n_val], "train", None)
            self.write_shard(self.buffer[self.filled - n_val: self.filled], "val", None)
        elif self.filled:
            self.write_shard(self.buffer[: self.filled], "train", None)
        self.manifest["complete"] = True
        self.save_manifest()

    def write_shard(self, tokens, split, ends):
        """Write one shard and add it to the manifest (in memory: save_manifest writes it out)."""
        index = len(self.manifest["shards"])
        file = f"{split}_{index:06d}.npy"
        path = os.path.join(self.out_dir, file)
        write_atomically(path, lambda f: np.save(f, tokens))
        end = sum(s["tokens"] for s in self.manifest["shards"]) + len(tokens)  # stream position after it
        if ends is None:  # at the end of the stream
            next_document, next_offset = self.documents, 0
        else:  # the document the cut falls in, and how many of its tokens this shard took
            inside = int(np.searchsorted(ends, end, side="right"))  # this batch's documents done by `end`
            next_document = self.documents + inside
            start = self.stream_position if inside == 0 else int(ends[inside - 1])
            next_offset = end - start
        self.manifest["shards"].append(dict(file=file, split=split, tokens=len(tokens), sha256=sha256_of(path),
                                            next_document=next_document, next_offset=next_offset))
        self.manifest["tokens"] = end
        self.manifest["documents"] = next_document + (next_offset > 0)  # documents begun in the shards

    def save_manifest(self):
        text = json.dumps(self.manifest, indent=1) + "\n"
        write_atomically(os.path.join(self.out_dir, MANIFEST), lambda f: f.write(text.encode()))


def start_manifest(out_dir, source_name, shard_size):
    """The manifest to continue: the one in out_dir (its shards checked), or a new one."""
    path = os.path.join(out_dir, MANIFEST)
    fresh = dict(tokenizer="gpt2", dtype="uint16", source=source_name, shard_size=shard_size,
                 shards=[], documents=0, tokens=0, complete=False)
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
    if mine != {k: fresh[k] for k in mine}:
        raise PrepareError(f"{out_dir!r} holds shards of {manifest['source']} (shard size {manifest['shard_size']:,}), "
                           f"not of {source_name} (shard size {shard_size:,}): use another --out_dir")
    for i, shard in enumerate(manifest["shards"]):  # keep the shards that are intact, redo from the first that is not
        shard_path = os.path.join(out_dir, shard["file"])
        if not os.path.isfile(shard_path) or sha256_of(shard_path) != shard["sha256"]:
            print(f"{shard['file']} is missing or damaged: continuing from it", file=sys.stderr)
            manifest["shards"], manifest["complete"] = manifest["shards"][:i], False
            break
    return manifest


# -----------------------------------------------------------------------------


def prepare(source, out_dir, shard_size=SHARD_SIZE, num_proc=1, show_progress=True):
    """Tokenize `source` into shards in out_dir; returns the manifest. Continues an interrupted run."""
    from tqdm import tqdm

    hub = source == "fineweb-edu"
    files = None if hub else local_files(source)
    source_name = f"{FINEWEB_EDU[0]}:{FINEWEB_EDU[1]}" if hub else os.path.abspath(source)
    os.makedirs(out_dir, exist_ok=True)
    manifest = start_manifest(out_dir, source_name, shard_size)
    if manifest["complete"]:
        return manifest
    for leftover in glob.glob(os.path.join(out_dir, "*.tmp")):  # a write that a killed run left unfinished
        os.remove(leftover)
    writer = ShardWriter(out_dir, manifest)
    writer.save_manifest()  # first of all: from now on the folder says whose shards it holds
    skip_documents, _ = writer.resume_point()
    documents = hub_documents(skip_documents) if hub else local_documents(files, skip_documents)
    total_bytes = 4 * FINEWEB_EDU_TOKENS if hub else sum(os.path.getsize(f) for f in files)  # ~4 bytes a token
    with tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not show_progress, smoothing=0.05,
              desc=f"{'resuming' if manifest['shards'] else 'tokenizing'} {source}") as progress:
        for tokens, lengths in tokenized(batches_of(documents, progress), num_proc):
            writer.add(tokens, lengths)
            progress.set_postfix_str(f"{writer.position:,} tokens, {len(manifest['shards'])} shards", refresh=False)
    if writer.position == writer.documents:  # every document was empty: nothing but separators
        raise PrepareError(f"{source!r} holds no text")
    writer.finish()
    return manifest


def main(argv=None):
    parser = ArgumentParser(description="Tokenize a corpus into GPT-2 token shards for train_gpt2.py --data_dir.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("source", help="a .txt file, a folder of .txt/.jsonl/.parquet files, or fineweb-edu")
    parser.add_argument("--out_dir", default="", help="where the shards go (empty: data/<source name>)")
    parser.add_argument("--shard_size", type=int, default=SHARD_SIZE, help="tokens per shard")
    parser.add_argument("--num_proc", type=int, default=os.cpu_count(), help="tokenizer processes")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or os.path.join("data", os.path.splitext(os.path.basename(os.path.normpath(args.source)))[0])
    try:
        if args.shard_size < 2 or args.num_proc < 1:
            raise PrepareError("--shard_size must be at least 2 and --num_proc at least 1")
        manifest = prepare(args.source, out_dir, args.shard_size, args.num_proc)
    except (PrepareError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: the complete shards are kept; run the same command to continue", file=sys.stderr)
        return 130
    splits = [s["split"] for s in manifest["shards"]]
    print(f"{out_dir}: {manifest['documents']:,} documents, {manifest['tokens']:,} tokens in "
          f"{splits.count('train')} train and {splits.count('val')} val shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
