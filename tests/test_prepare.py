"""prepare.py: any corpus to token shards. What the shards hold is checked against an independent
tokenization of the same documents; interruptions at every write against an uninterrupted run."""

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import signal
import sys
import time

import numpy as np
import pytest

import prepare
from conftest import make_documents, run_script
from machinery import corpus, fineweb, shard_folder
from machinery.files import PrepareError, SettingError
from machinery.tokens import get_tokenizer, read_manifest

EOT = 50256


def stream_of(docs):
    """The corpus's token stream, computed here document by document: <|endoftext|> then its tokens."""
    enc = get_tokenizer()
    return np.array([t for d in docs for t in [EOT, *enc.encode_ordinary(d)]], dtype=np.int64)


def read_shards(out_dir):
    manifest = json.loads((out_dir / "manifest.json").read_text())
    arrays = [np.load(out_dir / s["file"], mmap_mode="r") for s in manifest["shards"]]
    return manifest, arrays


def folder_bytes(out_dir):
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


def kill_when(proc, manifest_path, ready):
    """SIGKILL `proc` as soon as the manifest it writes satisfies ready(manifest) (or it ends, or 120 s
    pass): a real kill at an arbitrary point of the work. Returns the manifest it left."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if ready(json.loads(manifest_path.read_text())):
                break
        except (OSError, ValueError, LookupError):  # not written yet, or no shard listed yet
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return json.loads(manifest_path.read_text())


def test_shards_hold_exactly_the_documents_token_stream(tmp_path, corpus_folder):
    folder, docs = corpus_folder
    manifest = prepare.prepare(str(folder), str(tmp_path / "out"), shard_size=1500, num_proc=1,
                               show_progress=False)
    expected = stream_of(docs)
    _, arrays = read_shards(tmp_path / "out")
    assert all(a.dtype == np.uint16 for a in arrays)
    assert np.array_equal(np.concatenate(arrays).astype(np.int64), expected)  # in manifest (stream) order
    # totals: an independent count, sum over documents of 1 + len(encode_ordinary)
    enc = get_tokenizer()
    assert manifest["tokens"] == sum(1 + len(enc.encode_ordinary(d)) for d in docs) == len(expected)
    assert manifest["documents"] == len(docs) == int((expected == EOT).sum())  # a literal "<|endoftext|>" is text
    assert manifest["complete"] and manifest["tokenizer"] == "gpt2" and manifest["shard_size"] == 1500
    assert manifest["source"] == os.path.abspath(folder)


def test_an_empty_text_file_in_a_folder_is_an_empty_document(tmp_path, corpus_folder):
    """A folder's empty .txt file is a document with no text: its <|endoftext|> is in the stream and it is
    counted, as an empty jsonl text is (a resume's document numbers count it too)."""
    folder, docs = corpus_folder
    (folder / "a0.txt").write_text("")  # read after a.txt, before b.jsonl
    docs = [docs[0], ""] + docs[1:]
    manifest = prepare.prepare(str(folder), str(tmp_path / "out"), shard_size=1500, num_proc=1, show_progress=False)
    _, arrays = read_shards(tmp_path / "out")
    assert np.array_equal(np.concatenate(arrays).astype(np.int64), stream_of(docs))
    assert manifest["documents"] == len(docs)


def test_shard_sizes_splits_and_hashes(tmp_path, corpus_folder):
    folder, docs = corpus_folder
    prepare.prepare(str(folder), str(tmp_path / "out"), shard_size=1500, num_proc=1, show_progress=False)
    manifest, arrays = read_shards(tmp_path / "out")
    shards = manifest["shards"]
    assert len(shards) >= 3
    assert [s["tokens"] for s in shards[:-1]] == [1500] * (len(shards) - 1)  # the last one is the remainder
    assert 0 < shards[-1]["tokens"] <= 1500
    assert [s["split"] for s in shards] == ["val"] + ["train"] * (len(shards) - 1)  # first shard: validation
    assert len({s["file"] for s in shards}) == len(shards)
    for s, a in zip(shards, arrays):
        assert len(a) == s["tokens"]
        assert hashlib.sha256((tmp_path / "out" / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(["manifest.json", *(s["file"] for s in shards)])  # nothing else, no leftovers


@pytest.mark.parametrize("past_the_start", [0, 3])
def test_a_shard_records_the_document_the_next_one_begins_in(tmp_path, past_the_start):
    """A shard's entry names where the stream goes on after it: the document the next shard begins in and
    that document's tokens already written. A shard that ends exactly where a document begins says that
    document and 0 (not the one before and its whole length, which a resume would read again); one that
    ends 3 tokens into it says so. The documents' starts are counted from the stream (an EOT begins each)."""
    docs = [f"document {i}: " + " ".join(["word"] * (30 + 7 * i)) for i in range(6)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    starts = np.flatnonzero(stream_of(docs) == EOT)
    prepare.prepare(tmp_path / "docs.jsonl", tmp_path / "out", shard_size=int(starts[2]) + past_the_start,
                    num_proc=1, show_progress=False)
    first = read_manifest(str(tmp_path / "out"))["shards"][0]
    assert (first["next_document"], first["next_offset"]) == (2, past_the_start)
    assert "next_byte" not in first  # (a document's first piece: a resume reads it from its start)


def test_a_corpus_within_one_shard_still_gets_both_splits(tmp_path):
    docs = make_documents(20, seed=2)
    (tmp_path / "small.txt").write_text(docs[0])
    # (paths as pathlib gives them, as well as strings)
    manifest = prepare.prepare(tmp_path / "small.txt", tmp_path / "out", shard_size=10**6, show_progress=False)
    (train, val) = manifest["shards"]
    assert (train["split"], val["split"]) == ("train", "val")  # in stream order: val is the end
    n = train["tokens"] + val["tokens"]
    assert val["tokens"] == n // 10  # the last 10%
    _, arrays = read_shards(tmp_path / "out")
    assert np.array_equal(np.concatenate(arrays), stream_of(docs[:1]))  # disjoint, and nothing lost


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_same_bytes_with_one_or_two_worker_processes(tmp_path, corpus_folder, monkeypatch, start_method):
    """Two workers write what one process writes, also when they are spawned (the start method of
    macOS and Windows: each worker imports prepare.py afresh)."""
    import multiprocessing

    monkeypatch.setattr(prepare.multiprocessing, "Pool", multiprocessing.get_context(start_method).Pool)
    folder, _ = corpus_folder
    for num_proc in (1, 2):
        prepare.prepare(str(folder), str(tmp_path / f"out{num_proc}"), shard_size=1000, num_proc=num_proc,
                        show_progress=False)
    assert folder_bytes(tmp_path / "out1") == folder_bytes(tmp_path / "out2")


@pytest.fixture
def reference(tmp_path, corpus_folder):
    """An uninterrupted run: the files every interrupted-then-repeated run must end up with."""
    folder, _ = corpus_folder
    prepare.prepare(str(folder), str(tmp_path / "ref"), shard_size=1000, show_progress=False)
    return folder, folder_bytes(tmp_path / "ref")


class DyingWrite:
    """prepare.write_atomically stopped at its kill_at-th call by a KeyboardInterrupt, as Ctrl-C there
    stops it (half_written: after half a temporary file, as a kill in the middle of a write leaves)."""

    def __init__(self, kill_at, half_written=False):
        self.kill_at, self.half_written, self.calls, self.write = kill_at, half_written, 0, prepare.write_atomically

    def __call__(self, path, writer):
        self.calls += 1
        if self.calls == self.kill_at:
            if self.half_written:
                with open(path + ".tmp", "wb") as f:
                    f.write(b"\x93NUMPY half a file")
            raise KeyboardInterrupt
        self.write(path, writer)


def prepare_killed_at_write(monkeypatch, kill_at, source, out, half_written=False, **settings):
    """prepare.prepare(source, out, **settings), stopped at its kill_at-th file write (a shard or the
    manifest); the real write_atomically is back afterwards."""
    with monkeypatch.context() as patched:
        patched.setattr(prepare, "write_atomically", DyingWrite(kill_at, half_written))
        with pytest.raises(KeyboardInterrupt):
            prepare.prepare(str(source), str(out), show_progress=False, **settings)


@pytest.mark.parametrize("kill_at", range(1, 12))
@pytest.mark.parametrize("half_written", [False, True], ids=["before_write", "mid_write"])
def test_killed_then_repeated_gives_the_shards_of_an_uninterrupted_run(tmp_path, reference, monkeypatch,
                                                                       kill_at, half_written):
    """The run dies at the kill_at-th file write (a shard or the manifest), before it or halfway
    through it; the same command then finishes the job, and the folder is byte for byte the
    uninterrupted one's."""
    folder, expected = reference
    out = tmp_path / "run"
    prepare_killed_at_write(monkeypatch, kill_at, folder, out, half_written=half_written, shard_size=1000)
    prepare.prepare(str(folder), str(out), shard_size=1000, show_progress=False)
    assert folder_bytes(out) == expected


def test_only_its_own_unfinished_writes_are_removed_from_out_dir(tmp_path, reference, monkeypatch):
    """A repeat removes the temporary file a killed write left (a shard's name + .tmp), and no other:
    the user's own .tmp files in out_dir are kept."""
    folder, expected = reference
    out = tmp_path / "run"
    out.mkdir()
    mine = {"draft.tmp": b"mine", "notes.npy.tmp": b"mine too", "train_1.npy.tmp": b"and mine"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    # the first manifest, the val shard, the manifest, then half of train_000001.npy
    prepare_killed_at_write(monkeypatch, 4, folder, out, half_written=True, shard_size=1000)
    assert (out / "train_000001.npy.tmp").exists()
    prepare.prepare(str(folder), str(out), shard_size=1000, show_progress=False)
    assert folder_bytes(out) == {**expected, **mine}


def test_a_second_prepare_into_a_folder_another_is_writing_is_refused_untouched(tmp_path, reference, monkeypatch,
                                                                                capsys):
    """Two prepare.py runs into one out_dir would remove each other's unfinished writes and rewrite the
    manifest under each other: while one run holds its out_dir (a lock on the folder, taken here as that
    run takes it, beside its half-written shard) a second is refused in one line and changes nothing.
    Once the first has ended, the same command finishes the shards."""
    from machinery.files import lock_folder

    folder, expected = reference
    out = tmp_path / "run"
    prepare_killed_at_write(monkeypatch, 4, folder, out, half_written=True, shard_size=1000)
    before = folder_bytes(out)
    assert "train_000001.npy.tmp" in before  # the shard the first run is writing
    first = lock_folder(str(out))  # (taken: the killed run let go of its own lock)
    args = [str(folder), "--out_dir", str(out), "--shard_size", "1000", "--num_proc", "1"]
    hashed, sha256_of = [], shard_folder.sha256_of
    monkeypatch.setattr(shard_folder, "sha256_of", lambda path: hashed.append(path) or sha256_of(path))
    assert prepare.main(args) == 1
    assert hashed == []  # refused before it checks the shards (FineWeb-Edu's: minutes of reading)
    assert capsys.readouterr().err == (f"error: another run is writing {str(out)!r} now: wait for it to end, or "
                                       "choose another --out_dir\n")
    assert folder_bytes(out) == before
    os.close(first)
    assert prepare.main(args) == 0
    assert folder_bytes(out) == expected


def test_an_older_manifest_without_a_fingerprint_resumes_and_records_one(tmp_path, reference, monkeypatch):
    """A manifest of a prepare.py from before source_fingerprint resumes as before; the repeat records the
    fingerprint, so its folder is the uninterrupted run's byte for byte."""
    folder, expected = reference
    out = tmp_path / "run"
    prepare_killed_at_write(monkeypatch, 6, folder, out, shard_size=1000)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["source_fingerprint"]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    prepare.prepare(str(folder), str(out), shard_size=1000, show_progress=False)
    assert folder_bytes(out) == expected


@pytest.mark.parametrize("kill_at", range(1, 5))
def test_a_small_corpus_killed_at_any_write_finishes_the_same(tmp_path, monkeypatch, kill_at):
    """Within one shard: the manifest, the train shard, the val shard, the final manifest."""
    (tmp_path / "small.txt").write_text(" ".join(make_documents(30, seed=9)))
    prepare.prepare(str(tmp_path / "small.txt"), str(tmp_path / "ref"), shard_size=10**6, show_progress=False)
    prepare_killed_at_write(monkeypatch, kill_at, tmp_path / "small.txt", tmp_path / "run", shard_size=10**6)
    prepare.prepare(str(tmp_path / "small.txt"), str(tmp_path / "run"), shard_size=10**6, show_progress=False)
    assert folder_bytes(tmp_path / "run") == folder_bytes(tmp_path / "ref")


@pytest.mark.parametrize("kind", ["text file", "folder"])
def test_a_resumed_runs_progress_starts_where_the_killed_one_stopped(tmp_path, big_text, corpus_folder, monkeypatch,
                                                                     kind):
    """The progress bar counts the bytes read, and ends at its total, the source's size (a parquet file's
    rows count their shares of its compressed size: their text would pass it, and the bar lose its ETA).
    A run killed part way, then resumed, counts at once what the killed run did (not read again: a text
    file from the piece it stopped in, a folder's documents skipped), then the rest as it reads it: it
    ends where an uninterrupted run's bar ends. A fresh run's bar waits for the first text (an input refused
    before it has its error line alone); a resumed run's shows at once (they hold text)."""
    import tqdm

    source = big_text[0] if kind == "text file" else corpus_folder[0]
    counted, totals, delays, ends = [], [], [], []

    class Bar(tqdm.tqdm):
        def __init__(self, *args, total=None, delay=0, **kwargs):
            totals.append(total), delays.append(delay)
            super().__init__(*args, total=total, delay=delay, **kwargs)

        def close(self):
            ends.append(getattr(self, "delay", None))  # (a fresh run at its end: 0, shown once text came)
            return super().close()

        def update(self, n=1):
            counted.append(n)
            return super().update(n)

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    tokenized, tokenize_batch = [], prepare.tokenize_batch
    monkeypatch.setattr(prepare, "tokenize_batch", lambda pieces: tokenized.extend(pieces) or tokenize_batch(pieces))
    prepare.prepare(str(source), str(tmp_path / "ref"), shard_size=1000, show_progress=False)
    whole, all_text = sum(counted), sum(len(text) for text, _ in tokenized)
    files = [source] if source.is_file() else [f for f in source.rglob("*") if f.suffix in corpus.SOURCE_TYPES]
    assert totals == [whole] == [sum(f.stat().st_size for f in files)]
    prepare_killed_at_write(monkeypatch, 4, source, tmp_path / "run", shard_size=1000)
    counted.clear(), tokenized.clear()
    prepare.prepare(str(source), str(tmp_path / "run"), shard_size=1000, show_progress=False)
    assert sum(counted) == whole
    assert sum(len(text) for text, _ in tokenized) < all_text  # (what the killed run did: not again)
    assert delays[0] == math.inf and ends[0] == 0 and delays[-1] == 0, (delays, ends)  # (fresh: shown; resumed)


def test_a_resumed_fineweb_edu_run_starts_its_bar_at_what_was_done(tmp_path, stand_in, monkeypatch):
    """FineWeb-Edu's bar counts bytes against an estimate (4 a token): a resumed run starts it at the
    estimate for the tokens its shards already hold."""
    import tqdm

    starts = []

    class Bar(tqdm.tqdm):
        def __init__(self, *args, initial=0, **kwargs):
            starts.append(initial)
            super().__init__(*args, initial=initial, **kwargs)

    prepare_killed_at_write(monkeypatch, 6, "fineweb-edu", tmp_path / "run", shard_size=1000)
    done = sum(shard["tokens"] for shard in json.loads((tmp_path / "run" / "manifest.json").read_text())["shards"])
    monkeypatch.setattr(tqdm, "tqdm", Bar)
    prepare.prepare("fineweb-edu", str(tmp_path / "run"), shard_size=1000, show_progress=False)
    assert done > 0 and starts == [4 * done]


def test_a_repeated_run_continues_after_the_complete_shards(tmp_path, reference, monkeypatch):
    """Shards listed as complete are kept, not recomputed: the repeat tokenizes only the rest."""
    folder, expected = reference
    out = tmp_path / "run"
    # the first manifest, then 4 shards and theirs: dies writing the 5th shard
    prepare_killed_at_write(monkeypatch, 10, folder, out, shard_size=1000)
    write = prepare.write_atomically
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    assert len(kept) == 4
    rewritten = []
    monkeypatch.setattr(prepare, "write_atomically", lambda path, writer: rewritten.append(os.path.basename(path))
                        or write(path, writer))
    prepare.prepare(str(folder), str(out), shard_size=1000, show_progress=False)
    assert not set(kept) & set(rewritten)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy") if p.name in kept} == kept
    assert folder_bytes(out) == expected


def test_a_damaged_shard_is_redone_from_there(tmp_path, reference, capsys):
    folder, expected = reference
    out = tmp_path / "run"
    prepare.prepare(str(folder), str(out), shard_size=1000, show_progress=False)
    damaged = sorted(out.glob("train_*.npy"))[2]
    damaged.write_bytes(damaged.read_bytes()[:-10])
    prepare.prepare(str(folder), str(out), shard_size=1000, show_progress=False)
    assert f"{damaged.name} is missing or damaged: continuing from {damaged.name}" in capsys.readouterr().err
    assert folder_bytes(out) == expected


@pytest.mark.parametrize("damaged", ["train_000000.npy", "val_000001.npy"])
def test_a_damaged_shard_of_a_corpus_within_one_shard_is_redone_with_its_pair(tmp_path, monkeypatch, capsys,
                                                                              damaged):
    """A corpus within one shard is written as a pair, train then val, cut from one buffer at the end: a
    damaged val shard is redone with its train shard (kept alone, its entry ends where the source does,
    and nothing would be left to make the val shard from)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text(" ".join(make_documents(20, seed=5)))
    args = ["a.txt", "--out_dir", "out", "--num_proc", "1"]
    assert prepare.main(args) == 0
    before = folder_bytes(tmp_path / "out")
    assert sorted(before) == ["manifest.json", "train_000000.npy", "val_000001.npy"]
    shard = tmp_path / "out" / damaged
    shard.write_bytes(shard.read_bytes()[:-2] + b"\x00\x01")  # (one token changed)
    capsys.readouterr()
    assert prepare.main(args) == 0
    assert f"{damaged} is missing or damaged: continuing from train_000000.npy" in capsys.readouterr().err
    assert folder_bytes(tmp_path / "out") == before


# ----------------------------------------------------------------------------- a big text file, in pieces

TRICKY = ("It's here.\n's and 'll at a line start\n\n\n'tis\n  indented\n \nspace before newline \n"
          "tab\t\n\tx\r\nwindows\r\n\r\nlines\n\u00a0nbsp\n\u3000ideographic space\n\u2028sep\n"
          "\x85nel\nnaïve café — «quoted» 日本語 🙂\n🙂 emoji line\n1603 numbers\n 42\n"
          "<|endoftext|> literal\n!?...\n\n")


def test_a_text_cut_where_safe_cut_may_cut_has_the_tokens_of_the_whole():
    r"""Every place CUT finds in tricky text (runs of newlines, spaces before them, \r\n, Unicode spaces,
    contractions at a line start) splits it into two texts whose tokens, one after the other, are the
    whole's. Cutting after a run of newlines instead is not exact, which is why the cut is before its
    last character. CUT's right side is every character but whitespace (kana too, so Japanese text has
    places to cut), and holds none the tokenizer counts as whitespace: after "\n\n", each of them leaves
    the two newlines single tokens (198), where whitespace would join them."""
    enc = get_tokenizer()
    data = (TRICKY * 3).encode()
    whole = enc.encode_ordinary(data.decode())
    places = [m.start() for m in corpus.CUT.finditer(data, 1)]
    assert len(places) > 80
    for j in places:
        assert enc.encode_ordinary(data[:j].decode()) + enc.encode_ordinary(data[j:].decode()) == whole, j
    assert enc.encode_ordinary("a\n\n") + enc.encode_ordinary("b") != enc.encode_ordinary("a\n\nb")
    sweep = [c for c in [*range(0x21, 0x7F), *range(0x80, 0x4000), *range(0x4000, 0x10000, 7),
                         *range(0x10000, 0x110000, 997)] if not 0xD800 <= c < 0xE000 and not chr(c).isspace()]
    assert all(corpus.CUT.match(f" {chr(c)}".encode()) for c in sweep)  # the sweep is CUT's right side
    # a character cut short by the end of what was read is no place yet: it may be U+3000 (E3 80 80)
    assert not any(corpus.CUT.match(f" {chr(c)}".encode()[:-1]) for c in (0x3042, 0x1681, 0x2010))
    tokens = enc.encode_ordinary("".join(f"\n\n{chr(c)}" for c in sweep))
    assert tokens.count(198) == 2 * len(sweep)
    spaces = [chr(c) for c in range(0x3100) if chr(c).isspace()]  # Unicode's whitespace is all below U+3100
    assert not any(corpus.CUT.match(f" {s}".encode()) for s in spaces)
    assert all(enc.encode_ordinary(f"\n\n{s}")[0] == 628 for s in "\t\n\x0b\x0c\r ")  # CUT's left side: whitespace


@pytest.fixture
def big_text(tmp_path, monkeypatch):
    """A text file of ~25 pieces: PIECE_BYTES and BATCH_CHARS made small, as 1 MB is to a big file."""
    monkeypatch.setattr(corpus, "PIECE_BYTES", 1500)
    monkeypatch.setattr(prepare, "BATCH_CHARS", 1000)
    lines = make_documents(400, seed=11, max_words=25)
    text = TRICKY + "\n".join(("\n  " if i % 7 == 0 else "") + line for i, line in enumerate(lines))
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8", newline="")
    return path, text


def test_a_text_file_is_read_in_pieces_whose_tokens_are_the_whole_texts(big_text):
    path, text = big_text
    pieces = list(corpus.read_documents(str(path)))
    size = path.stat().st_size
    assert len(pieces) > 10 and all(0 < n <= corpus.PIECE_BYTES for _, n, _ in pieces)
    assert [at for _, _, at in pieces] == list(np.cumsum([0] + [n for _, n, _ in pieces[:-1]]))
    assert sum(n for _, n, _ in pieces) == size and "".join(t for t, _, _ in pieces) == text
    tokens, lengths, at = prepare.tokenize_batch([(t, at) for t, _, at in pieces])
    assert np.array_equal(tokens, stream_of([text])) and lengths.sum() == len(tokens)
    middle = pieces[5][2]  # from where a piece begins, the same pieces follow
    assert list(corpus.read_documents(str(path), middle)) == pieces[5:]


def test_japanese_text_whose_lines_begin_with_kana_is_read_in_pieces_too(tmp_path, monkeypatch):
    """Text without spaces has places to cut only at its line breaks; lines that begin with kana (UTF-8
    E3 ..., the lead byte U+3000, the ideographic space, has too) are such places: the file is read a
    few pieces at a time, not whole, with the whole text's tokens."""
    monkeypatch.setattr(corpus, "PIECE_BYTES", 1500)
    text = "\n".join(f"{'あかさたなはまやらわ'[i % 10]}いうえお、かきくけこ「{i}」。" * 3 for i in range(200))
    path = tmp_path / "ja.txt"
    path.write_text(text, encoding="utf-8")
    pieces = list(corpus.read_documents(str(path)))
    assert len(pieces) > 10 and "".join(t for t, _, _ in pieces) == text
    tokens, _, _ = prepare.tokenize_batch([(t, at) for t, _, at in pieces])
    assert np.array_equal(tokens, stream_of([text]))


def test_a_place_to_cut_at_the_end_of_a_read_is_found_when_the_next_read_comes(tmp_path, monkeypatch):
    """A place to cut needs a look at the bytes after it: one at the last byte of a read (byte 15 of 16) is
    found once the next read is there, not passed over (the piece would grow to the next place, or the end)."""
    monkeypatch.setattr(corpus, "PIECE_BYTES", 16)
    (tmp_path / "t.txt").write_bytes(b"a" * 15 + b" " + b"b" * 40)  # the one place to cut: before the space
    assert [at for _, _, at in corpus.text_pieces(str(tmp_path / "t.txt"))] == [0, 15]


def test_a_long_stretch_with_nowhere_to_cut_is_searched_once(tmp_path, monkeypatch):
    """A stretch of 20 pieces without whitespace is read on until a place to cut: each piece read is
    searched once (so a long stretch costs its length, not its length squared)."""
    monkeypatch.setattr(corpus, "PIECE_BYTES", 1500)
    searched, safe_cut = [], corpus.safe_cut

    def counting(data, since=1):
        searched.append(len(data) - since)
        return safe_cut(data, since)

    monkeypatch.setattr(corpus, "safe_cut", counting)
    text = "x" * 30_000 + " y" + " z" * 100
    (tmp_path / "long.txt").write_text(text)
    pieces = list(corpus.read_documents(str(tmp_path / "long.txt")))
    assert "".join(t for t, _, _ in pieces) == text and pieces[0][1] > 30_000
    assert sum(searched) < 2 * len(text)


def test_a_big_text_file_is_tokenized_and_written_as_it_is_read(tmp_path, big_text, monkeypatch):
    """The progress bar moves piece by piece, and tokens are written before the file is all read:
    memory is a few pieces, not the file."""
    import tqdm

    path, text = big_text
    events = []

    class Bar(tqdm.tqdm):
        def update(self, n=1):
            events.append(("read", n))
            return super().update(n)

    tokenize_batch, write = prepare.tokenize_batch, prepare.write_atomically
    monkeypatch.setattr(tqdm, "tqdm", Bar)
    monkeypatch.setattr(prepare, "tokenize_batch", lambda pieces: events.append(("tokenize", len(pieces)))
                        or tokenize_batch(pieces))
    monkeypatch.setattr(prepare, "write_atomically", lambda path, writer: events.append(("write", path))
                        or write(path, writer))
    prepare.prepare(str(path), str(tmp_path / "out"), shard_size=1000, num_proc=1, show_progress=False)
    reads = [n for kind, n in events if kind == "read"]
    assert len(reads) > 10 and sum(reads) == path.stat().st_size
    last_read = max(i for i, (kind, _) in enumerate(events) if kind == "read")
    assert sum(kind == "tokenize" for kind, _ in events[:last_read]) > 10
    assert any(kind == "write" and str(p).endswith(".npy") for kind, p in events[:last_read])
    assert np.array_equal(np.concatenate(read_shards(tmp_path / "out")[1]), stream_of([text]))


def record_worker(pieces):  # (module-level: a worker finds it by name)
    with open(os.environ["PIECES_LOG"], "a") as f:
        f.write(f"{os.getpid()}\n")
    return TOKENIZE_BATCH(pieces)


TOKENIZE_BATCH = prepare.tokenize_batch


def test_a_text_file_in_pieces_gives_the_same_bytes_with_one_or_two_workers(tmp_path, big_text, monkeypatch):
    """The workers tokenize the one document's pieces, and write what one process writes."""
    path, text = big_text
    monkeypatch.setenv("PIECES_LOG", str(tmp_path / "pids"))
    monkeypatch.setattr(prepare, "tokenize_batch", record_worker)
    for num_proc in (1, 2):
        prepare.prepare(str(path), str(tmp_path / f"out{num_proc}"), shard_size=1000, num_proc=num_proc,
                        show_progress=False)
    assert folder_bytes(tmp_path / "out1") == folder_bytes(tmp_path / "out2")
    in_workers = [pid for pid in (tmp_path / "pids").read_text().split() if pid != str(os.getpid())]
    assert len(in_workers) > 10  # the one document reached the workers in pieces
    assert np.array_equal(np.concatenate(read_shards(tmp_path / "out2")[1]), stream_of([text]))


@pytest.mark.parametrize("kill_at", [4, 9])
@pytest.mark.parametrize("older", [False, True], ids=["manifest", "older_manifest"])
def test_a_text_file_killed_mid_document_resumes_from_the_piece_it_stopped_in(tmp_path, big_text, monkeypatch,
                                                                              kill_at, older):
    """The repeat reads the text from the piece the last shard ends in (next_byte), skips the tokens
    of that piece the shards hold (next_offset - next_byte_offset), and ends with the uninterrupted
    run's folder. A manifest without next_byte (an older prepare.py's) resumes from the document's
    start, and ends with the same shards."""
    path, _ = big_text
    prepare.prepare(str(path), str(tmp_path / "ref"), shard_size=1000, show_progress=False)
    expected = folder_bytes(tmp_path / "ref")
    out = tmp_path / "run"
    prepare_killed_at_write(monkeypatch, kill_at, path, out, shard_size=1000)
    tokenize_batch = prepare.tokenize_batch
    manifest = json.loads((out / "manifest.json").read_text())
    last = manifest["shards"][-1]
    assert last["next_document"] == 0 and last["next_byte"] > 0 and not manifest["complete"]
    if older:
        for shard in manifest["shards"]:
            del shard["next_byte"], shard["next_byte_offset"]
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    tokenized = []
    monkeypatch.setattr(prepare, "tokenize_batch", lambda pieces: tokenized.extend(pieces) or tokenize_batch(pieces))
    prepare.prepare(str(path), str(out), shard_size=1000, show_progress=False)
    assert tokenized[0][1] == (0 if older else last["next_byte"])
    if older:  # the shards are the same; the kept entries stay as the older run wrote them
        expected = {k: v for k, v in expected.items() if k != "manifest.json"}
        assert {k: v for k, v in folder_bytes(out).items() if k != "manifest.json"} == expected
    else:
        assert sum(len(t.encode()) for t, _ in tokenized) == path.stat().st_size - last["next_byte"]
        assert folder_bytes(out) == expected


# ----------------------------------------------------------------------------- FineWeb-Edu, from a stand-in folder

ROWS, ROW_GROUP = 60, 20  # the stand-in's rows per file, and per row group


def write_stand_in(folder, n_files=4, rows=ROWS, max_words=120):
    """FineWeb-Edu offline: parquet files with its columns and small row groups, in a folder that
    fineweb.STAND_IN_ENV names in place of the hub's files. Each text starts with where it is,
    "doc FILE.ROW", so a test can tell which rows were read. Returns the documents in stream order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    words = make_documents(n_files * rows, seed=7, max_words=max_words)
    docs = []
    for f in range(n_files):
        texts = [f"doc {f}.{r} {words[f * rows + r]}" for r in range(rows)]
        table = pa.table({"text": texts, "id": [f"<urn:{f}:{r}>" for r in range(rows)], "score": [3.0] * rows})
        pq.write_table(table, folder / f"{f:03d}_00000.parquet", row_group_size=ROW_GROUP)
        docs += texts
    return docs


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """A stand-in of 4 files of 60 rows (~24k tokens), and an uninterrupted run's folder from it."""
    folder = tmp_path / "hub[1]"  # (a folder name is not a pattern: its files are found)
    docs = write_stand_in(folder)
    monkeypatch.setenv(fineweb.STAND_IN_ENV, str(folder))
    monkeypatch.setattr(fineweb, "RETRY_PAUSE_S", 0.0)
    prepare.prepare("fineweb-edu", str(tmp_path / "ref"), shard_size=1000, show_progress=False)
    return docs, sorted(str(p) for p in folder.glob("*.parquet")), folder_bytes(tmp_path / "ref")


def label(text):
    """(file, row) of a stand-in document."""
    f, r = text.split(" ", 2)[1].split(".")
    return int(f), int(r)


def record_reads(monkeypatch, fail_at=(), error=ConnectionError("connection reset by peer")):
    """Every (file, row) that parquet hands out from here on, in order (a list that grows as the run
    reads). Reading a row in `fail_at` raises `error` instead, once for each."""
    import pyarrow.parquet as pq

    reads, pending = [], set(fail_at)
    iter_batches = pq.ParquetFile.iter_batches

    def recording(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            rows = [label(t) for t in batch.column("text").to_pylist()]
            failing = [i for i, row in enumerate(rows) if row in pending]
            if failing:  # the rows before it arrive, then the connection drops
                pending.discard(rows[failing[0]])
                reads.extend(rows[: failing[0]])
                yield batch.slice(0, failing[0])
                raise error
            reads.extend(rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recording)
    return reads


def test_fineweb_edu_streams_its_files_and_records_where_each_shard_ends(tmp_path, stand_in):
    docs, files, _ = stand_in
    manifest = prepare.prepare("fineweb-edu", str(tmp_path / "fw"), shard_size=1000, show_progress=False)
    _, arrays = read_shards(tmp_path / "fw")
    assert np.array_equal(np.concatenate(arrays), stream_of(docs))  # every row of every file, in order
    assert manifest["source"] == "HuggingFaceFW/fineweb-edu:sample-10BT" and manifest["source_files"] == files
    for shard in manifest["shards"][:-1]:  # the next shard starts in the document at next_file, next_row
        assert label(docs[shard["next_document"]]) == (files.index(shard["next_file"]), shard["next_row"])
    assert len({s["next_file"] for s in manifest["shards"]}) == len(files)  # shards end in every file


def test_fineweb_edu_resumes_in_the_file_it_stopped_in(tmp_path, stand_in, monkeypatch):
    """Killed at a shard of the third file (a KeyboardInterrupt at the write: the SIGKILL test below
    does it for real), the repeat reads nothing before that file, and from it no more than one row group."""
    docs, files, expected = stand_in
    write = prepare.write_atomically
    out = tmp_path / "run"

    def dying_write(path, writer):
        shards = json.loads((out / "manifest.json").read_text())["shards"] if (out / "manifest.json").exists() else []
        if shards and shards[-1]["next_file"] == files[2]:
            raise KeyboardInterrupt
        write(path, writer)

    monkeypatch.setattr(prepare, "write_atomically", dying_write)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare("fineweb-edu", str(out), shard_size=1000, show_progress=False)
    monkeypatch.setattr(prepare, "write_atomically", write)
    stop = json.loads((out / "manifest.json").read_text())["shards"][-1]
    reads = record_reads(monkeypatch)
    prepare.prepare("fineweb-edu", str(out), shard_size=1000, show_progress=False)
    assert folder_bytes(out) == expected
    assert reads[0] == (2, stop["next_row"] // ROW_GROUP * ROW_GROUP)  # the row group it stopped in
    assert sorted(reads) == reads and len(set(reads)) == len(reads)  # no row twice


def test_fineweb_edu_sigkilled_then_repeated_gives_the_same_shards_reading_only_from_where_it_stopped(
        tmp_path, monkeypatch):
    """A real kill (no chance to clean up) while the stream is past its first file; the same command
    then reads no row of the files before the one it stopped in, and ends with the uninterrupted run's files."""
    import subprocess
    import sys

    from conftest import OFFLINE_ENV, REPO

    write_stand_in(tmp_path / "hub", n_files=4, rows=250, max_words=200)
    files = sorted(str(p) for p in (tmp_path / "hub").glob("*.parquet"))
    env = {**os.environ, **OFFLINE_ENV, fineweb.STAND_IN_ENV: str(tmp_path / "hub")}
    args = ["fineweb-edu", "--shard_size", "2000", "--num_proc", "1"]
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import prepare; "
            "prepare.BATCH_CHARS = 5000; "  # small batches: reading and writing interleave, as on FineWeb-Edu
            f"sys.exit(prepare.main({[*args, '--out_dir', 'run']!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # killed once the shards end in the second file
    manifest = kill_when(proc, tmp_path / "run" / "manifest.json", lambda m: m["shards"][-1]["next_file"] != files[0])
    assert not manifest["complete"]  # it really was cut off
    stopped_in = files.index(manifest["shards"][-1]["next_file"])
    assert stopped_in >= 1

    monkeypatch.setenv(fineweb.STAND_IN_ENV, str(tmp_path / "hub"))
    prepare.prepare("fineweb-edu", str(tmp_path / "ref"), shard_size=2000, show_progress=False)
    reads = record_reads(monkeypatch)  # the repeat, in this process, to count the rows it reads
    prepare.prepare("fineweb-edu", str(tmp_path / "run"), shard_size=2000, show_progress=False)
    assert folder_bytes(tmp_path / "run") == folder_bytes(tmp_path / "ref")
    assert reads and min(reads)[0] == stopped_in  # no row of the files before
    assert min(reads)[1] > manifest["shards"][-1]["next_row"] - ROW_GROUP  # nor more than a row group of its own


def test_fineweb_edu_retries_a_dropped_connection_within_the_file(tmp_path, stand_in, monkeypatch, capsys):
    """The connection drops in the middle of the third file: one line says so, the retry reads again
    from the row group it was in, not from the first file, and no document is lost or repeated."""
    docs, files, expected = stand_in
    reads = record_reads(monkeypatch, fail_at=[(2, 45)])
    prepare.prepare("fineweb-edu", str(tmp_path / "fw"), shard_size=1000, show_progress=False)
    assert folder_bytes(tmp_path / "fw") == expected
    err = capsys.readouterr().err
    assert err.count("retrying in") == 1 and "reading 002_00000.parquet at row 45 failed" in err, err
    again = reads.index((2, 40), reads.index((2, 40)) + 1)  # the retry's first row: the start of its row group
    assert reads[:again] + reads[again + 5:] == [label(d) for d in docs]  # rows 40..44 read twice, nothing else


def test_fineweb_edu_gives_up_only_after_failures_in_a_row(tmp_path, stand_in, monkeypatch, capsys):
    """A long download meets dropped connections now and then: six, each followed by documents read, are more
    than DOWNLOAD_RETRIES (5) in all but never in a row, and the run ends with every document, each once."""
    docs, files, expected = stand_in
    record_reads(monkeypatch, fail_at=[(0, 10), (0, 30), (1, 5), (1, 45), (2, 20), (3, 15)])
    prepare.prepare("fineweb-edu", str(tmp_path / "fw"), shard_size=1000, show_progress=False)
    assert folder_bytes(tmp_path / "fw") == expected
    assert capsys.readouterr().err.count("(try 2 of 5)") == 6  # each the first retry of its own failure


def test_fineweb_edu_gives_up_after_failing_retries_in_a_row(tmp_path, stand_in, monkeypatch, capsys):
    import pyarrow.parquet as pq

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", failing_iter_batches)
    with pytest.raises(PrepareError, match=r"^downloading HuggingFaceFW/fineweb-edu \(sample-10BT\) "
                                                   r"failed 5 times: Connection reset by peer$"):
        prepare.prepare("fineweb-edu", str(tmp_path / "fw"), shard_size=1000, show_progress=False)
    assert capsys.readouterr().err.count("retrying in") == 4  # one line each


def failing_iter_batches(self, *args, **kwargs):
    raise ConnectionError("Connection reset by peer\nsecond line")


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), "403"], ids=["permission", "http_403"])
def test_a_file_that_cannot_be_read_ends_the_run_at_once(tmp_path, stand_in, monkeypatch, capsys, error):
    """Refused in the middle of the second file: the first failure ends the run, in one line."""
    error = http_error(403) if error == "403" else error
    reads = record_reads(monkeypatch, fail_at=[(1, 30)], error=error)
    with pytest.raises(PrepareError, match=r"^reading 001_00000.parquet at row 30: "):
        prepare.prepare("fineweb-edu", str(tmp_path / "fw"), shard_size=1000, show_progress=False)
    assert "retrying" not in capsys.readouterr().err and reads[-1] == (1, 29)


def test_a_hub_file_whose_text_is_not_strings_is_one_line(tmp_path, monkeypatch):
    """FineWeb-Edu's files are read as the local parquet files are checked: a `text` column of bytes (or
    numbers) is one line naming the file, not a TypeError from the tokenizer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "hub").mkdir()
    pq.write_table(pa.table({"text": [b"bin a", b"bin b"]}), tmp_path / "hub" / "000_00000.parquet")
    monkeypatch.setenv(fineweb.STAND_IN_ENV, str(tmp_path / "hub"))
    with pytest.raises(PrepareError, match=r"^'000_00000.parquet' has a 'text' column of binary, not of "
                                                   r"strings$"):
        prepare.prepare("fineweb-edu", str(tmp_path / "fw"), shard_size=1000, show_progress=False)


def http_error(status):
    """What huggingface_hub raises for an HTTP status."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import hf_raise_for_status

    httpx = http_client()
    response = httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/datasets/x"))
    try:
        hf_raise_for_status(response)
    except HfHubHTTPError as e:
        return e


def chained(outer, inner):
    """`outer` raised while handling `inner` (raise outer from inner)."""
    outer.__cause__ = inner
    return outer


def http_client():
    """huggingface_hub's HTTP library: httpx2 in this environment, httpx in others."""
    try:
        import httpx2
        return httpx2
    except ImportError:
        import httpx
        return httpx


def transient_errors():
    import requests
    from huggingface_hub.errors import LocalEntryNotFoundError

    httpx = http_client()
    request = httpx.Request("GET", "https://huggingface.co")
    return [ConnectionResetError(104, "Connection reset by peer"), TimeoutError("timed out"),
            httpx.ConnectError("[Errno -3] Temporary failure in name resolution", request=request),
            httpx.ReadTimeout("The read operation timed out", request=request),
            httpx.RemoteProtocolError("peer closed connection without sending complete message body", request=request),
            requests.ConnectionError("Connection aborted"), http_error(500), http_error(503), http_error(429),
            # datasets: the dataset card could not be fetched, because the connection failed
            chained(ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub (LocalEntryNotFoundError)"),
                    chained(LocalEntryNotFoundError("cannot find the requested files in the local cache"),
                            httpx.ConnectError("Connection refused", request=request)))]


def permanent_errors():
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import OfflineModeIsEnabled

    return [chained(ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub (OfflineModeIsEnabled)"),
                    OfflineModeIsEnabled("offline mode is enabled")),
            chained(DatasetNotFoundError("Dataset 'HuggingFaceFW/fineweb-edu' doesn't exist on the Hub or cannot be "
                                         "accessed."), http_error(404)),  # RepositoryNotFoundError
            chained(DatasetNotFoundError("Dataset 'HuggingFaceFW/fineweb-edu' is a gated dataset on the Hub."),
                    http_error(401)),
            http_error(403), http_error(404),
            ValueError("BuilderConfig 'sample-10BT' not found. Available: ['default']"),
            PermissionError(13, "Permission denied")]


@pytest.mark.parametrize("transient", [True, False])
def test_which_errors_are_retried(transient):
    for error in transient_errors() if transient else permanent_errors():
        assert fineweb.is_transient(error) is transient, repr(error)


def test_errors_no_retry_can_fix_end_at_once_in_one_line(tmp_path, monkeypatch, capsys, no_network):
    """Listing the hub's files (the first thing that needs the network) fails: a dataset the hub does
    not know ends the run at the first failure; a server error is retried, and the run goes on."""
    import datasets

    write_stand_in(tmp_path / "hub")
    files = sorted(str(p) for p in (tmp_path / "hub").glob("*.parquet"))
    monkeypatch.delenv(fineweb.STAND_IN_ENV, raising=False)  # the hub's files, listed by (a fake) datasets
    for switch in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # (the hub's switch, and datasets' own)
        monkeypatch.setattr(datasets.config, switch, False, raising=False)
    monkeypatch.setattr(fineweb, "hub_reachable", lambda: True)  # (the hub's name resolves: the requests fail)
    monkeypatch.setattr(fineweb, "RETRY_PAUSE_S", 0.0)
    monkeypatch.setattr(prepare, "FINEWEB_EDU_TOKENS", 10**6)  # for the disk-space estimate
    for error, calls, message in ((permanent_errors()[1], 1, "doesn't exist on the Hub or cannot be accessed"),
                                  (http_error(503), 2, None)):
        builder = FakeBuilder([error], files)
        monkeypatch.setattr(datasets, "load_dataset_builder", builder)
        out = tmp_path / f"out{calls}"
        if message:
            assert prepare.main(["fineweb-edu", "--out_dir", str(out), "--num_proc", "1"]) == 1
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith("error: listing the files of HuggingFaceFW/fineweb-edu "
                                                           "(sample-10BT): ") and message in err, err
            assert not list(out.glob("*"))
        else:
            prepare.prepare("fineweb-edu", str(out), shard_size=1000, show_progress=False)
            assert capsys.readouterr().err.count("retrying in") == 1
            assert json.loads((out / "manifest.json").read_text())["source_files"] == files
        assert builder.calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT")] * calls


class FakeBuilder:
    """Stands in for datasets.load_dataset_builder: raises `errors` in turn, then lists `files`."""

    def __init__(self, errors, files):
        self.errors, self.files, self.calls = list(errors), files, []

    def __call__(self, path, name=None):
        from types import SimpleNamespace

        self.calls.append((path, name))
        if self.errors:
            raise self.errors.pop(0)
        return SimpleNamespace(config=SimpleNamespace(data_files={"train": self.files}))


def test_fineweb_edu_offline_is_one_line_at_once(tmp_path):
    """The real datasets library, offline (HF_HUB_OFFLINE), with the real pause between retries: no
    retry, one line, nothing written."""
    import subprocess
    import sys

    from conftest import OFFLINE_ENV, REPO

    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import prepare; "
            "prepare.FINEWEB_EDU_TOKENS = 10**6; "  # the disk-space check passes on a small disk too
            "sys.exit(prepare.main(['fineweb-edu', '--num_proc', '1']))")
    env = {k: v for k, v in os.environ.items() if k != fineweb.STAND_IN_ENV}
    start = time.time()
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**env, **OFFLINE_ENV})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: fineweb-edu streams HuggingFaceFW/fineweb-edu from the Hugging Face Hub, "
                               "but offline mode is on (HF_HUB_OFFLINE)") and r.stderr.count("\n") == 1, r.stderr
    assert time.time() - start < fineweb.RETRY_PAUSE_S  # not a single pause
    assert not (tmp_path / "data").exists()  # (the default out_dir is data/fineweb-edu): no folder made


def test_fineweb_edu_with_no_network_is_one_line_at_once(tmp_path, monkeypatch, capsys, no_network):
    """Offline mode is off, but the hub's name does not resolve (no network, no DNS): one line naming
    that, before the dataset's files are asked for (datasets would retry each request for minutes) and
    before a folder is made."""
    import datasets

    monkeypatch.delenv(fineweb.STAND_IN_ENV, raising=False)
    for switch in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setattr(datasets.config, switch, False, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(prepare, "FINEWEB_EDU_TOKENS", 10**6)  # the disk-space check passes on a small disk too
    builder = FakeBuilder([], [])
    monkeypatch.setattr(datasets, "load_dataset_builder", builder)
    out = tmp_path / "fw"
    assert prepare.main(["fineweb-edu", "--out_dir", str(out), "--num_proc", "1"]) == 1
    err = capsys.readouterr().err
    assert err == ("error: fineweb-edu streams HuggingFaceFW/fineweb-edu from the Hugging Face Hub, but its host "
                   "name does not resolve (no network?): connect, or prepare a local copy with python prepare.py "
                   "FOLDER\n")
    assert builder.calls == [] and not out.exists()


def test_an_older_manifest_without_positions_resumes_by_the_files_footers(tmp_path, stand_in, monkeypatch):
    """A manifest written before shards recorded their file and row (only next_document): the repeat
    skips whole files and row groups by what their footers say, and reads no row before its document."""
    docs, files, expected = stand_in
    out = tmp_path / "run"
    prepare.prepare("fineweb-edu", str(out), shard_size=1000, show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["source_files"]
    manifest["shards"], manifest["complete"] = manifest["shards"][:15], False
    for shard in manifest["shards"]:
        del shard["next_file"], shard["next_row"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    reads = record_reads(monkeypatch)
    prepare.prepare("fineweb-edu", str(out), shard_size=1000, show_progress=False)
    shards = {name: data for name, data in folder_bytes(out).items() if name.endswith(".npy")}
    assert shards == {name: data for name, data in expected.items() if name.endswith(".npy")}
    next_document = manifest["shards"][-1]["next_document"]
    assert reads[0] == (next_document // ROWS, next_document % ROWS // ROW_GROUP * ROW_GROUP)


# ----------------------------------------------------------------------------- disk space


@pytest.mark.parametrize("source", ["book.txt", "fineweb-edu"])
def test_too_little_disk_space_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys, no_network,
                                                                     source):
    """A text of ~70 kB needs ~35 kB of shards, FineWeb-Edu ~20 GB; the disk has 10 kB, or 10 GB, free."""
    import shutil

    import datasets

    (tmp_path / "book.txt").write_text(" ".join(make_documents(200, seed=4)))
    free = 10_000 if source == "book.txt" else 10 * 10**9
    usage = type(shutil.disk_usage(tmp_path))(10**12, 10**12 - free, free)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    monkeypatch.delenv(fineweb.STAND_IN_ENV, raising=False)  # FineWeb-Edu on the hub, refused before it is reached
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)  # (and if it were not: offline, at once)
    monkeypatch.chdir(tmp_path)
    assert prepare.main([source, "--out_dir", "data/out", "--num_proc", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: not enough disk space: 'data/out' has ") and err.count("\n") == 1, err
    assert ("20.0 GB" in err) == (source == "fineweb-edu")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("free,starts", [(95, True), (85, False)])
def test_the_disk_estimate_has_a_margin(monkeypatch, free, starts):
    """The shards' size is an estimate: 95% of it free starts (a full disk later is one line, and the same
    command continues), under 90% is refused before anything is written."""
    monkeypatch.setattr(shard_folder, "free_bytes", lambda folder: free)
    if starts:
        shard_folder.check_disk_space("out", 100)
    else:
        with pytest.raises(PrepareError, match="not enough disk space: 'out' has 85 B free"):
            shard_folder.check_disk_space("out", 100)


@pytest.mark.parametrize("fail_at,code", [(1, errno.ENOSPC), (2, errno.ENOSPC), (5, errno.ENOSPC), (8, errno.EFBIG)],
                         ids=["first_manifest", "first_shard", "manifest", "shard_too_big"])
def test_a_disk_that_fills_up_ends_the_run_in_one_line_and_the_same_command_continues(
        tmp_path, reference, monkeypatch, capsys, fail_at, code):
    """The fail_at-th file write (a shard or the manifest) finds the disk full halfway through: one line
    naming the file, no temporary file left, what was written before intact; after space is freed the
    same command finishes with the uninterrupted run's files."""
    folder, expected = reference
    write = prepare.write_atomically
    writes = []

    def filling_write(path, writer):
        writes.append(path)
        return write(path, half_then_full if len(writes) == fail_at else writer)

    def half_then_full(f):
        f.write(b"\x93NUMPY half")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(prepare, "write_atomically", filling_write)
    args = [str(folder), "--out_dir", str(tmp_path / "run"), "--shard_size", "1000", "--num_proc", "1"]
    assert prepare.main(args) == 1
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert last == f"error: disk full: writing {writes[-1]} failed ({os.strerror(code)}); free some space and run " \
                   "the same command to continue"
    written = folder_bytes(tmp_path / "run")
    manifest = json.loads(written.get("manifest.json", '{"shards": []}'))
    assert not [name for name in written if name.endswith(".tmp")]
    assert all(written[s["file"]] == expected[s["file"]] for s in manifest["shards"])  # the uninterrupted run's
    monkeypatch.setattr(prepare, "write_atomically", write)
    assert prepare.main(args) == 0
    assert folder_bytes(tmp_path / "run") == expected


def limit_file_size():
    """In the child, before it runs: files of at most 3,000 bytes, as a full disk would leave them (writes
    past that fail with EFBIG, and the signal the kernel sends with it is ignored)."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))


@pytest.mark.skipif(sys.platform == "win32", reason="a file size limit (RLIMIT_FSIZE) is POSIX's")
@pytest.mark.parametrize("shard_size", [2000, 20000], ids=["small_shard", "big_shard"])
def test_a_shard_the_disk_takes_only_part_of_is_said_as_a_full_disk(tmp_path, reference, shard_size):
    """A real short write, from the kernel (files of at most 3,000 bytes, as a full disk leaves them): a
    shard that does not fit is the one full-disk line, never a short shard listed as whole (np.save's own
    writes could miss it, or say only "N requested and M written"); once there is room, the same command
    finishes with the uninterrupted run's files."""
    import subprocess

    from conftest import REPO

    folder, _ = reference
    args = [sys.executable, str(REPO / "prepare.py"), str(folder), "--out_dir", "run", "--shard_size", str(shard_size),
            "--num_proc", "1"]
    r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    assert r.returncode == 1
    assert re.fullmatch(r"error: disk full: writing run/(val_000000|train_000000)\.npy failed \(File too large\); "
                        r"free some space and run the same command to continue", r.stderr.splitlines()[-1]), r.stderr
    assert not list((tmp_path / "run").glob("*.tmp"))
    assert subprocess.run(args, cwd=tmp_path, capture_output=True, timeout=300).returncode == 0
    prepare.prepare(str(folder), str(tmp_path / "uninterrupted"), shard_size=shard_size, show_progress=False)
    assert folder_bytes(tmp_path / "run") == folder_bytes(tmp_path / "uninterrupted")


# ----------------------------------------------------------------------------- the command line


def test_cli_prepares_a_text_file_and_says_what_it_wrote(tmp_path):
    (tmp_path / "book.txt").write_text(" ".join(make_documents(30, seed=4)))
    r = run_script("book.txt", "--shard_size", "1000", "--num_proc", "1",  # (--out_dir's default: data/book)
                   cwd=tmp_path, script="prepare.py")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "data" / "book" / "manifest.json").read_text())
    splits = [shard["split"] for shard in manifest["shards"]]
    assert manifest["documents"] == 1  # a text file is one document
    assert r.stdout == (f"data/book: 1 documents, {manifest['tokens']:,} tokens in {splits.count('train')} train "
                        f"and {splits.count('val')} val shards\n")
    assert "tokenizing book.txt: 100%" in r.stderr and "tokens" in r.stderr  # the progress bar, at its end
    again = run_script("book.txt", "--out_dir", "data/book", "--shard_size", "1000", cwd=tmp_path,
                       script="prepare.py")
    assert again.returncode == 0 and again.stdout == r.stdout  # complete: nothing to do


def test_the_default_out_dir_is_named_for_the_folder_a_dot_names(tmp_path, monkeypatch, capsys):
    """`python prepare.py .` in a folder of texts writes data/<that folder's name>, not data/. (the shards
    straight into data/), and `..` not data/.. (beside data/, in the folder it runs in)."""
    corpus = tmp_path / "poems"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text(" ".join(make_documents(20, seed=6)))
    for source, cwd in ((".", corpus), ("..", corpus / "sub")):
        monkeypatch.chdir(cwd)
        assert prepare.main([source, "--shard_size", "500", "--num_proc", "1"]) == 0
        assert capsys.readouterr().out.startswith(os.path.join("data", "poems") + ": 1 documents")
        assert (cwd / "data" / "poems" / "manifest.json").is_file()
        assert not (cwd / "data" / "manifest.json").exists() and not (cwd / "manifest.json").exists()


BAD_SOURCES = [  # (source, setup, what the one line must say)
    ("missing.txt", None, "source 'missing.txt' not found"),
    ("pipe", lambda p: os.mkfifo(p / "pipe"), "source 'pipe' is not a regular file (a pipe or a device?)"),
    ("folder", lambda p: (p / "folder").mkdir() or (p / "folder" / "notes.md").write_text("x"),
     "has no .txt, .jsonl or .parquet files"),
    ("empty.txt", lambda p: (p / "empty.txt").write_text(""), "holds no text"),
    ("spaces.txt", lambda p: (p / "spaces.txt").write_text("   \n\n \t \n" * 50), "'spaces.txt' holds only whitespace"),
    ("blanks", lambda p: (p / "blanks").mkdir() or (p / "blanks" / "a.jsonl").write_text('{"text": " \\n "}\n' * 9),
     "'blanks' holds only whitespace"),
    ("blank", lambda p: (p / "blank").mkdir() or (p / "blank" / "a.jsonl").write_text('{"text": ""}\n'),
     "holds no text"),
    ("notext", lambda p: (p / "notext").mkdir() or (p / "notext" / "a.jsonl").write_text(
        '{"text": "fine"}\n{"content": "no text field"}\n'), 'a.jsonl:2 has no "text" string field'),
    ("numbertext", lambda p: (p / "numbertext").mkdir() or (p / "numbertext" / "a.jsonl").write_text(
        '{"text": 5}\n'), 'a.jsonl:1 has no "text" string field'),
    ("badjson", lambda p: (p / "badjson").mkdir() or (p / "badjson" / "a.jsonl").write_text("{oops\n"),
     "a.jsonl:1 is not JSON"),
    ("latin1.txt", lambda p: (p / "latin1.txt").write_bytes("café".encode("latin-1")), "is not UTF-8"),
    ("badparquet", lambda p: (p / "badparquet").mkdir() or (p / "badparquet" / "a.parquet").write_bytes(b"PAR1junk"),
     "is not a readable parquet file"),
    ("nocolumn", lambda p: parquet_of(p / "nocolumn", content=["a b"]), "has no 'text' column (columns: content)"),
    ("numbers", lambda p: parquet_of(p / "numbers", text=[1, 2]), "has a 'text' column of int64, not of strings"),
    ("broken", lambda p: (p / "broken").mkdir() or (p / "broken" / "gone.txt").symlink_to("nowhere.txt") or
     (p / "broken" / "a.txt").write_text("fine"), "'broken/gone.txt' is a link to 'nowhere.txt', which "
     "does not exist: remove the link or restore its file"),
    ("pipe", lambda p: (p / "pipe").mkdir() or os.mkfifo(p / "pipe" / "a.txt"), "'pipe/a.txt' is not a regular file"),
]


def parquet_of(folder, **columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    pq.write_table(pa.table(columns), folder / "a.parquet")


@pytest.mark.parametrize("source,setup,message", BAD_SOURCES, ids=[m for _, _, m in BAD_SOURCES])
def test_bad_input_is_one_clear_line(tmp_path, source, setup, message, monkeypatch, capsys):
    """prepare.py's main() as the command runs it (test_cli_prepares... runs the real command)."""
    if setup:
        setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert prepare.main([source, "--out_dir", "out", "--num_proc", "1"]) == 1  # an exception would fail here
    err = capsys.readouterr().err
    # the line alone, not after a progress bar (which shows from the first text on; one that started is cleared)
    assert err.startswith("error:") and message in err and err.count("\n") == 1 and "\r" not in err, err
    # nothing written is kept, not even the manifest: mended, the source is prepared by the same command
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_tokenizer_cache_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    """A TIKTOKEN_CACHE_DIR that cannot be written (here a file) stops the tokenizer in its worker: one line
    naming it, as train_gpt2.py says it, not the worker's traceback."""
    from machinery.tokens import get_tokenizer

    (tmp_path / "book.txt").write_text("To be, or not to be, that is the question. " * 300)
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "a_file"))
    monkeypatch.chdir(tmp_path)
    get_tokenizer.cache_clear()  # (made afresh, in this process and in the workers it starts)
    try:
        assert prepare.main(["book.txt", "--out_dir", "out", "--num_proc", "1"]) == 1
    finally:
        get_tokenizer.cache_clear()  # (made again, for later tests, without the setting)
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: tiktoken's cache folder") and "Traceback" not in err


@pytest.mark.parametrize("first", ["", "Hi"], ids=["empty", "too short to split"])
def test_a_source_mended_after_its_error_is_prepared_by_the_same_command(tmp_path, monkeypatch, capsys, first):
    """An empty file (or one too short for a train and a val split), then the same file with text: the
    second run prepares it (the first left no manifest that would call the mended file a changed source)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text(first)
    assert prepare.main(["notes.txt", "--out_dir", "out", "--num_proc", "1"]) == 1
    assert not (tmp_path / "out" / "manifest.json").exists()
    (tmp_path / "notes.txt").write_text(" ".join(make_documents(20, seed=3)))
    assert prepare.main(["notes.txt", "--out_dir", "out", "--num_proc", "1", "--shard_size", "500"]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"]


@pytest.mark.parametrize("out", ["out", "out[1]"])  # (a folder's name is not a pattern: no shard is overlooked)
def test_a_source_that_fails_after_a_shard_keeps_its_manifest(tmp_path, monkeypatch, capsys, out):
    """A bad line read after the first shards are written: the manifest stays, to say whose they are (a
    folder of shards without one is refused by the next run as another program's)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepare, "BATCH_CHARS", 1000)  # (tokenized and written a few documents at a time)
    (tmp_path / "c").mkdir()
    good = "".join(json.dumps({"text": doc}) + "\n" for doc in make_documents(40, seed=4))
    (tmp_path / "c" / "a.jsonl").write_text(good + "{oops\n")
    assert prepare.main(["c", "--out_dir", out, "--num_proc", "1", "--shard_size", "200"]) == 1
    assert "a.jsonl:41 is not JSON" in capsys.readouterr().err
    assert list((tmp_path / out).glob("*.npy")) and (tmp_path / out / "manifest.json").exists()


def test_jsonl_is_read_as_bytes_its_bad_utf8_named_where_it_is_and_a_byte_order_mark_skipped(tmp_path):
    """Invalid UTF-8 far into a .jsonl file is said with its line and its byte in the file (a reader that
    decodes ahead in blocks would name a byte of its block); a byte-order mark, which some editors put
    first, is not part of the first record: the file's shards are those of the same file without it."""
    docs = make_documents(300, seed=4)
    body = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    for i, bom in enumerate((b"", b"\xef\xbb\xbf")):  # (the mark's bytes count: the byte is the file's)
        (tmp_path / f"bad{i}").mkdir()
        (tmp_path / f"bad{i}" / "a.jsonl").write_bytes(bom + body + b'{"text": "caf\xff"}\n')
        with pytest.raises(PrepareError, match=rf"not UTF-8 text \(line 301, byte {len(bom + body) + 13}: "):
            prepare.prepare(str(tmp_path / f"bad{i}"), str(tmp_path / f"out_bad{i}"), shard_size=10**6,
                            show_progress=False)
    for name, data in (("plain", body), ("bom", b"\xef\xbb\xbf" + body), ("crlf", body.replace(b"\n", b"\r\n"))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.jsonl").write_bytes(data)
        prepare.prepare(str(tmp_path / name), str(tmp_path / f"out_{name}"), shard_size=10**6, show_progress=False)
        _, arrays = read_shards(tmp_path / f"out_{name}")
        assert np.array_equal(np.concatenate(arrays), stream_of(docs)), name


def test_a_file_of_the_source_removed_before_it_is_read_is_one_line(tmp_path, corpus_folder, monkeypatch):
    """A folder's file deleted while the run reads the ones before it: one line naming it (the shards so
    far cannot be finished as the source was), not the OS's "No such file or directory"."""
    folder, _ = corpus_folder
    tokenize_batch = prepare.tokenize_batch
    monkeypatch.setattr(prepare, "BATCH_CHARS", 1000)  # (tokenizing begins long before sub/d.txt, the last, is read)
    monkeypatch.setattr(prepare, "tokenize_batch",
                        lambda pieces: (folder / "sub" / "d.txt").unlink(missing_ok=True) or tokenize_batch(pieces))
    with pytest.raises(PrepareError, match=r"^'.*sub/d.txt' was removed while the source was read: its "
                                                   r"shards cannot be finished; prepare the source again into a new "
                                                   r"--out_dir$"):
        prepare.prepare(str(folder), str(tmp_path / "out"), shard_size=1000, show_progress=False)


def test_a_null_text_is_an_empty_document_in_jsonl_and_parquet_alike(tmp_path):
    """A record whose text is null (JSON's null, a parquet null) has no text: an empty document, its
    <|endoftext|> alone, in either format, as if its text were "" (the shards against stream_of)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_documents(2, seed=3)
    texts = [docs[0], None, docs[1], None]
    (tmp_path / "jsonl").mkdir()
    (tmp_path / "jsonl" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "parquet").mkdir()
    pq.write_table(pa.table({"text": texts}), tmp_path / "parquet" / "a.parquet")
    for kind in ("jsonl", "parquet"):
        prepare.prepare(str(tmp_path / kind), str(tmp_path / f"out_{kind}"), shard_size=10**6, show_progress=False)
        manifest, arrays = read_shards(tmp_path / f"out_{kind}")
        assert np.array_equal(np.concatenate(arrays), stream_of([t or "" for t in texts])), kind
        assert manifest["documents"] == 4


def test_an_out_dir_of_another_source_or_shard_size_is_refused_untouched(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text(" ".join(make_documents(20, seed=5)))
    (tmp_path / "b.txt").write_text(" ".join(make_documents(20, seed=6)))
    assert prepare.main(["a.txt", "--out_dir", "out", "--shard_size", "500"]) == 0
    before = folder_bytes(tmp_path / "out")
    capsys.readouterr()
    for args, message in ((["b.txt", "--shard_size", "500"], "holds shards of"),
                          (["a.txt", "--shard_size", "600"], "(shard size 500)")):
        assert prepare.main([*args, "--out_dir", "out"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1
        assert folder_bytes(tmp_path / "out") == before  # nothing already written is damaged
    for loose in ("loose", "loose[1]", "loose*?"):  # (a folder's name is not a pattern: its files are seen)
        (tmp_path / loose).mkdir()
        np.save(tmp_path / loose / "val_000000.npy", np.arange(3))  # (named as a shard: not overwritten)
        assert prepare.main(["a.txt", "--out_dir", loose]) == 1
        assert "no manifest.json" in capsys.readouterr().err
        assert np.array_equal(np.load(tmp_path / loose / "val_000000.npy"), np.arange(3))


@pytest.mark.parametrize("state", ["finished", "interrupted"])
@pytest.mark.parametrize("source,edit,change", [
    ("corpus/a.txt", "edit a.txt", "a.txt has another size or modification time"),
    ("corpus", "add 0.txt", "0.txt added"),
    ("corpus", "remove a.txt", "a.txt removed")])
def test_a_source_changed_since_its_shards_were_made_is_refused_untouched(tmp_path, monkeypatch, capsys, state,
                                                                          source, edit, change):
    """The manifest records each source file's size and modification time: a repeat after the source
    changed (on a finished out_dir it would report the old shards, on an interrupted one mix both
    versions) is one line naming the source, the out_dir and what to do, and the folder is as it was.
    (Each change here is at or before the file the killed run stopped in, a.txt: 0.txt is read first.)"""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(" ".join(make_documents(40, seed=5)))
    (tmp_path / "corpus" / "c.txt").write_text("another document")
    args = [source, "--out_dir", "out", "--shard_size", "500", "--num_proc", "1"]
    if state == "finished":
        assert prepare.main(args) == 0
    else:  # the first manifest, a shard, the manifest listing it, then killed at the next shard
        prepare_killed_at_write(monkeypatch, 4, source, "out", shard_size=500)
    if edit == "edit a.txt":
        (tmp_path / "corpus" / "a.txt").write_text(" ".join(make_documents(40, seed=6)))
    elif edit == "add 0.txt":
        (tmp_path / "corpus" / "0.txt").write_text("new")
    else:
        (tmp_path / "corpus" / "a.txt").unlink()
    before = folder_bytes(tmp_path / "out")
    capsys.readouterr()
    assert prepare.main(args) == 1
    assert capsys.readouterr().err == (f"error: {os.path.abspath(source)} has changed since 'out' was prepared "
                                       f"from it ({change}): delete 'out' to prepare it again, or choose another "
                                       "--out_dir\n")
    assert folder_bytes(tmp_path / "out") == before


LATER_CHANGES = {  # besides the bad line mended, files changed after the failed run's shards end (in a.jsonl)
    "bad line mended": lambda c: None,
    "a file added": lambda c: (c / "b2.txt").write_text("a new document"),
    "a file removed": lambda c: (c / "c.txt").unlink(),
}


@pytest.mark.parametrize("change", LATER_CHANGES)
def test_a_source_changed_only_after_its_shards_documents_is_continued(tmp_path, monkeypatch, capsys, change):
    """A run stopped by a bad line (or killed), its source then changed only in files its shards hold nothing
    of: they are the shards a fresh run over the source as it is now makes, so the same command continues (a
    line says so) and ends with the folder a fresh run makes, byte for byte: a bad line fixed costs no shard."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepare, "BATCH_CHARS", 1000)  # (tokenized and written a few documents at a time)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(40, seed=5)))
    (tmp_path / "c" / "b.jsonl").write_text('{"text": broken\n{"text": "fine"}\n')
    (tmp_path / "c" / "c.txt").write_text("the last document")
    args = ["c", "--out_dir", "out", "--shard_size", "300", "--num_proc", "1"]
    assert prepare.main(args) == 1 and "b.jsonl:1 is not JSON" in capsys.readouterr().err  # (shards of a.jsonl kept)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["shards"]
    (tmp_path / "c" / "b.jsonl").write_text('{"text": "mended"}\n{"text": "fine"}\n')
    LATER_CHANGES[change](tmp_path / "c")
    assert prepare.main(args) == 0
    assert (f"{tmp_path / 'c'}: b.jsonl has another size or modification time, after the documents of the shards "
            "so far: continuing\n") in capsys.readouterr().err  # (the first change, as the refusals name it)
    assert prepare.main(["c", "--out_dir", "fresh", "--shard_size", "300", "--num_proc", "1"]) == 0
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "fresh")


def test_a_finished_folder_whose_source_gained_a_last_file_is_refused(tmp_path, monkeypatch, capsys):
    """A file added after every document a finished folder's shards hold is still a change: the folder is not
    the source's as it is now (and is not reported prepared); it is refused as any other change."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text(" ".join(make_documents(40, seed=5)))
    assert prepare.main(["c", "--out_dir", "out", "--shard_size", "500", "--num_proc", "1"]) == 0
    (tmp_path / "c" / "z.txt").write_text("one more document")
    before = folder_bytes(tmp_path / "out")
    capsys.readouterr()
    assert prepare.main(["c", "--out_dir", "out", "--shard_size", "500", "--num_proc", "1"]) == 1
    assert "(z.txt added): delete 'out' to prepare it again" in capsys.readouterr().err
    assert folder_bytes(tmp_path / "out") == before


CHANGES = {  # a change to a file already read, made while the run goes on; what the repeat says of it
    "touched": (lambda path: os.utime(path, ns=(1, 1)), "a.txt has another size or modification time"),
    "removed": (lambda path: path.unlink(missing_ok=True), "a.txt removed"),
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_source_changed_while_it_is_read_is_not_marked_complete(tmp_path, corpus_folder, monkeypatch, change):
    """A file of the source touched or removed during the run: the shards may mix two versions, so the
    manifest is not marked complete (training refuses it) and the repeat refuses to continue."""
    folder, _ = corpus_folder
    make_change, said = CHANGES[change]
    tokenize_batch = prepare.tokenize_batch
    monkeypatch.setattr(prepare, "tokenize_batch",
                        lambda pieces: make_change(folder / "a.txt") or tokenize_batch(pieces))
    with pytest.raises(PrepareError, match=r"corpus changed while it was read: the shards in '.*out' may"):
        prepare.prepare(str(folder), str(tmp_path / "out"), shard_size=1000, show_progress=False)
    assert not json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"]
    with pytest.raises(PrepareError, match=said):
        prepare.prepare(str(folder), str(tmp_path / "out"), shard_size=1000, show_progress=False)


def test_a_hand_edited_manifest_is_one_line_naming_the_field_and_nothing_is_touched(tmp_path, monkeypatch, capsys):
    """A manifest whose shard entry or totals are not what prepare.py writes (a number as text, a file
    name as a number, a list where an object goes): the repeat says which field, and leaves the folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text(" ".join(make_documents(20, seed=5)))
    assert prepare.main(["a.txt", "--out_dir", "out", "--shard_size", "500"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    capsys.readouterr()
    for field, value, says in (("file", 7, "its shard 0's file is 7, not a text"),
                               ("next_document", "3", "its shard 0's next_document is '3', not a whole number"),
                               ("sha256", None, "its shard 0's sha256 is None, not a text"),
                               ("documents", -1, "its documents is -1, not a whole number >= 0"),
                               ("source_fingerprint", [["a.txt", "12", 3]],
                                "its source_fingerprint is not a list of [file, size, mtime_ns]"),
                               ("shards", {}, "it holds no list of shards")):
        edited = json.loads(json.dumps(manifest))
        (edited["shards"][0] if field in edited["shards"][0] else edited)[field] = value
        (tmp_path / "out" / "manifest.json").write_text(json.dumps({**edited, "complete": False}))
        before = folder_bytes(tmp_path / "out")
        assert prepare.main(["a.txt", "--out_dir", "out", "--shard_size", "500"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: 'out/manifest.json' is not a manifest as prepare.py writes it: ") and \
            says in err and err.endswith("; use another --out_dir\n"), err
        assert folder_bytes(tmp_path / "out") == before


def prepared_small_text(tmp_path, monkeypatch):
    """a.txt (one document, about 5 shards of 500 tokens) prepared into out/ by the command; its arguments."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text(" ".join(make_documents(20, seed=5)))
    args = ["a.txt", "--out_dir", "out", "--shard_size", "500", "--num_proc", "1"]
    assert prepare.main(args) == 0
    return args


def edit_manifest(out_dir, edit):
    """manifest.json in out_dir with edit(manifest) applied, as a hand in an editor would."""
    manifest = json.loads((out_dir / "manifest.json").read_text())
    edit(manifest)
    (out_dir / "manifest.json").write_text(json.dumps(manifest))


MENDED_EDITS = {  # a shard's entry edited: the shard is re-made from there (the same bytes), and its entry
    "a shard's tokens": lambda m: m["shards"][1].update(tokens=300),
    "a shard's tokens 0": lambda m: m["shards"][2].update(tokens=0),
}
REFUSED_EDITS = {  # the folder's own fields edited: one line naming what is wrong
    "dtype": (lambda m: m.update(dtype="uint32"), "holds shards whose dtype is 'uint32', not 'uint16'"),
    "tokenizer": (lambda m: m.update(tokenizer="llama"), "holds shards whose tokenizer is 'llama', not 'gpt2'"),
    "no shards": (lambda m: m.update(shards=[]), "says its shards are complete, but it lists no train shard"),
    "every split val": (lambda m: [s.update(split="val") for s in m["shards"]], "it lists no train shard"),
    "tokens": (lambda m: m.update(tokens=3000), "but its tokens is 3,000, where its shards hold "),
    "documents": (lambda m: m.update(documents=2), "but its documents is 2, where its shards hold 1"),
    "last shard ends mid-document": (lambda m: m["shards"][-1].update(next_offset=5),  # (one document, not whole)
                                     "but its documents is 1, where its shards hold 2"),
}


@pytest.mark.parametrize("edit", MENDED_EDITS)
def test_a_finished_folder_whose_shard_entry_was_edited_is_mended(tmp_path, monkeypatch, capsys, edit):
    """Run again on a finished out_dir, prepare.py checks each shard's file against its entry (its SHA-256
    and its token count, which training goes by) and re-makes the shards from the first that differs:
    the folder ends as the first run left it, and train_gpt2.py accepts it."""
    args = prepared_small_text(tmp_path, monkeypatch)
    before = folder_bytes(tmp_path / "out")
    edit_manifest(tmp_path / "out", MENDED_EDITS[edit])
    capsys.readouterr()
    assert prepare.main(args) == 0
    assert re.fullmatch(r"(train_00000\d\.npy) holds 500 tokens, not the \d+ manifest.json lists: continuing from \1",
                        capsys.readouterr().err.splitlines()[0])
    assert folder_bytes(tmp_path / "out") == before
    read_manifest(str(tmp_path / "out"))


@pytest.mark.parametrize("edit", REFUSED_EDITS)
def test_a_finished_folder_that_training_would_refuse_is_one_line_never_success(tmp_path, monkeypatch, capsys, edit):
    """A manifest marked complete whose own fields were edited (what it says its tokens are, or its splits
    and totals against its shards): the repeat says in one line what, and changes nothing; it never
    reports as prepared a folder that train_gpt2.py refuses or misreports."""
    args = prepared_small_text(tmp_path, monkeypatch)
    make_edit, says = REFUSED_EDITS[edit]
    edit_manifest(tmp_path / "out", make_edit)
    before = folder_bytes(tmp_path / "out")
    capsys.readouterr()
    assert prepare.main(args) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and says in err and err.count("\n") == 1, err
    assert folder_bytes(tmp_path / "out") == before


def refused_by_training(data_dir):  # (module-level: no closure)
    raise SettingError(f"{data_dir!r} fails a check train_gpt2.py makes")


def test_a_finished_folder_is_checked_by_train_gpt2s_own_check(tmp_path, monkeypatch, capsys):
    """The check of a finished folder is the training script's own, tokens.read_manifest, called rather than
    copied: whatever it refuses (a check added there later too), the repeat refuses in one line."""
    args = prepared_small_text(tmp_path, monkeypatch)
    monkeypatch.setattr(shard_folder, "read_manifest", refused_by_training)
    capsys.readouterr()
    assert prepare.main(args) == 1
    assert capsys.readouterr().err == ("error: 'out/manifest.json' says its shards are complete, but 'out' fails a "
                                       "check train_gpt2.py makes: undo the edit, or delete 'out' to prepare it "
                                       "again\n")


RESUME_EDITS = {  # the last shard of a killed run made to say the source goes on past its end; what is said
    "next_offset": (lambda s: s.update(next_offset=10**6), "next_offset or next_byte is past the end of the source"),
    "next_document": (lambda s: s.update(next_document=50), "goes on at next_document 50, a place the source does "),
    "next_byte": (lambda s: s.update(next_byte=10**6, next_byte_offset=0), "next_document 0, next_byte 1,000,000, "
                  "a place the source does not have"),
    "next_byte in a json line": (lambda s: s.update(next_document=1, next_byte=5, next_byte_offset=0),
                                 "next_document 1, next_byte 5, a place the source does not have"),
    "next_byte past the last document": (lambda s: s.update(next_document=6, next_byte=5, next_byte_offset=0),
                                         "next_document 6, next_byte 5, a place the source does not have"),
}


@pytest.mark.parametrize("edit", RESUME_EDITS)
def test_an_unfinished_folder_that_says_it_goes_on_past_the_source_is_never_marked_complete(tmp_path, monkeypatch,
                                                                                           capsys, edit):
    """A killed run's manifest, its last shard's place in the source (a.txt, then b.jsonl's documents)
    pushed past the source's end, or to a byte inside a document that is not a text file's: the repeat
    would read nothing more, or the wrong text, and mark the folder complete. One line instead, and the
    manifest stays incomplete (train_gpt2.py refuses it, and says to run prepare.py)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text(" ".join(make_documents(20, seed=5)))
    (tmp_path / "c" / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(5)))
    prepare_killed_at_write(monkeypatch, 4, "c", "out", shard_size=500)  # after one shard, inside a.txt
    make_edit, says = RESUME_EDITS[edit]
    edit_manifest(tmp_path / "out", lambda m: make_edit(m["shards"][-1]))
    capsys.readouterr()
    assert prepare.main(["c", "--out_dir", "out", "--shard_size", "500", "--num_proc", "1"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (after the progress bar)
    assert last.startswith("error: ") and says in last, last
    assert not json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"]


def test_totals_that_disagree_with_the_shards_are_not_marked_complete(tmp_path, monkeypatch, capsys):
    """A finished manifest made unfinished, its totals edited: the repeat has nothing left to read, and checks
    the totals as it finishes (they are the shards' only when it writes one): one line, not complete."""
    args = prepared_small_text(tmp_path, monkeypatch)
    edit_manifest(tmp_path / "out", lambda m: m.update(complete=False, tokens=3000))
    capsys.readouterr()
    assert prepare.main(args) == 1
    assert "disagrees with its source: its tokens is 3,000, where its shards hold " in capsys.readouterr().err
    assert not json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"]


def test_a_folder_under_a_shards_name_is_one_line_before_anything_is_rewritten(tmp_path, monkeypatch, capsys):
    """A shard replaced by a folder (or one under the name of a shard still to come): one line naming it
    before the manifest is rewritten, not an IsADirectoryError when the shard is written."""
    args = prepared_small_text(tmp_path, monkeypatch)
    (tmp_path / "out" / "train_000002.npy").unlink()
    (tmp_path / "out" / "train_000002.npy").mkdir()
    manifest = (tmp_path / "out" / "manifest.json").read_bytes()
    capsys.readouterr()
    assert prepare.main(args) == 1
    assert capsys.readouterr().err == ("error: 'out/train_000002.npy' is a folder, where prepare.py writes a file of "
                                       "that name: move it out of 'out' and run the command again\n")
    assert (tmp_path / "out" / "manifest.json").read_bytes() == manifest


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_lone_surrogate_in_json_text_is_tokenized_as_a_replacement_character(tmp_path, num_proc):
    """A lone surrogate, "\\ud800", is valid JSON but no character (it has no UTF-8): as tiktoken's
    encode_ordinary does, each becomes U+FFFD, and an escaped pair is its character; in a worker too."""
    (tmp_path / "s.jsonl").write_text('{"text": "\\ud800 bad surrogate"}\n'
                                      '{"text": "a pair \\ud83d\\ude00, one \\udfff"}\n')
    prepare.prepare(str(tmp_path / "s.jsonl"), str(tmp_path / "out"), shard_size=10**6, num_proc=num_proc,
                    show_progress=False)
    _, arrays = read_shards(tmp_path / "out")
    expected = stream_of(["\ufffd bad surrogate", "a pair \U0001f600, one \ufffd"])
    assert np.array_equal(np.concatenate(arrays), expected)


def test_a_folder_with_link_loops_and_a_folder_named_like_a_file_reads_each_file_once(tmp_path):
    """A link to a folder above (a loop), a second link to a file, and a folder named sub.txt: each real
    file is read once, under the name that sorts first, and sub.txt is walked as a folder. Hidden files
    (.draft.txt, macOS's ._c.txt) are not the corpus: passed over."""
    folder = tmp_path / "corpus"
    (folder / "d" / "sub.txt").mkdir(parents=True)
    docs = ["the c file", "the a file", "the b file"]
    (folder / "c.txt").write_text(docs[0])
    (folder / "d" / "a.txt").write_text(docs[1])
    (folder / "d" / "sub.txt" / "b.txt").write_text(docs[2])
    (folder / "d" / "up").symlink_to("..")
    (folder / "copy.txt").symlink_to("c.txt")
    (folder / ".draft.txt").write_text("an editor's hidden file")  # (and macOS's ._c.txt beside a copied c.txt)
    (folder / "._c.txt").write_bytes(b"\x00\x05\x16\x07 not UTF-8")
    files = corpus.local_files(str(folder))
    assert files == [str(folder / name) for name in ("c.txt", "d/a.txt", "d/sub.txt/b.txt")]
    prepare.prepare(str(folder), str(tmp_path / "out"), shard_size=10**6, show_progress=False)
    _, arrays = read_shards(tmp_path / "out")
    assert np.array_equal(np.concatenate(arrays), stream_of(docs))


def test_more_processes_than_cpus_are_not_started_and_a_file_as_out_dir_is_one_line(tmp_path, monkeypatch, capsys):
    """Tokenizing is all CPU: a --num_proc above the CPUs this process may use is lowered to them (said
    once), not a pool of that many processes. An --out_dir that is a file, or a link to nothing: one line,
    the file as it was."""
    import multiprocessing

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text(" ".join(make_documents(20, seed=5)))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    pools = []
    pool = multiprocessing.Pool
    monkeypatch.setattr(prepare.multiprocessing, "Pool", lambda n, **kwargs: pools.append(n) or pool(n, **kwargs))
    assert prepare.main(["a.txt", "--out_dir", "out", "--shard_size", "500", "--num_proc", "100000"]) == 0
    assert pools == ([cpus] if cpus > 1 else [])  # (one CPU: tokenized in this process)
    assert capsys.readouterr().err.startswith(f"--num_proc 100000: this process may run on {cpus} CPUs, so {cpus} "
                                              "processes tokenize\n")
    (tmp_path / "file").write_text("mine")
    assert prepare.main(["a.txt", "--out_dir", "file"]) == 1
    assert capsys.readouterr().err == "error: --out_dir 'file' is a file, not a folder\n"
    assert (tmp_path / "file").read_text() == "mine"
    (tmp_path / "link").symlink_to("nowhere")
    assert prepare.main(["a.txt", "--out_dir", "link"]) == 1
    assert capsys.readouterr().err == "error: --out_dir 'link' is a link to 'nowhere', which does not exist\n"
    assert prepare.main(["a.txt", "--out_dir", "link/shards"]) == 1  # (on the way: a raw OSError before)
    assert capsys.readouterr().err == (f"error: --out_dir 'link/shards' cannot be made: {str(tmp_path / 'link')!r} "
                                       "is a link to 'nowhere', which does not exist\n")


@pytest.mark.parametrize("flags,message", [(["--shard_size", "1"], "--shard_size must be at least 2, got 1"),
                                           (["--num_proc", "0"], "--num_proc must be at least 1, got 0")])
def test_a_bad_number_is_one_line_naming_its_flag(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    assert prepare.main(["input.txt", *flags]) == 1
    assert capsys.readouterr().err == f"error: {message}\n" and not (tmp_path / "data").exists()


def test_importing_prepare_does_nothing_visible_and_needs_no_torch():
    """Nothing printed; and torch is not imported (seconds and 180 MB in every worker process, which
    re-import the script where processes are spawned: macOS, Windows)."""
    import subprocess
    import sys

    from conftest import REPO

    r = subprocess.run([sys.executable, "-c", "import sys, prepare; print('torch' in sys.modules)"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "False\n" and r.stderr == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full, a file every write to fails")
@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_stderr_that_takes_no_writes_costs_the_progress_bar_not_the_shards(tmp_path, num_proc):
    """The bar writes to stderr: where that fails (the reader of its pipe gone, a full disk under `2> log`;
    /dev/full here) the bar goes quiet and the shards are all written (it ended in exit 1, silently, with
    only a manifest)."""
    import subprocess

    from conftest import REPO

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(200, seed=3)))
    prepare.prepare(str(tmp_path / "docs.jsonl"), str(tmp_path / "ref"), shard_size=2000, show_progress=False)
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, str(REPO / "prepare.py"), "docs.jsonl", "--out_dir", "run", "--shard_size",
                            "2000", "--num_proc", str(num_proc)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=full,
                           text=True, timeout=300)
    assert r.returncode == 0 and "shards" in r.stdout, r.stdout
    assert folder_bytes(tmp_path / "run") == folder_bytes(tmp_path / "ref")


def test_sigkill_mid_preparation_then_the_same_command_finishes_the_same_shards(tmp_path):
    """A real kill (no chance to clean up), while shards are being written."""
    import subprocess
    import sys

    from conftest import REPO

    docs = make_documents(3000, seed=8, max_words=400)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs) * 4)
    args = ["docs.jsonl", "--shard_size", "20000", "--num_proc", "1"]
    prepare.prepare(str(tmp_path / "docs.jsonl"), str(tmp_path / "ref"), shard_size=20000, show_progress=False)
    proc = subprocess.Popen([sys.executable, str(REPO / "prepare.py"), *args, "--out_dir", "run"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = kill_when(proc, tmp_path / "run" / "manifest.json", lambda m: len(m["shards"]) >= 3)
    assert not manifest["complete"]  # it really was cut off
    assert run_script(*args, "--out_dir", "run", cwd=tmp_path, script="prepare.py").returncode == 0
    assert folder_bytes(tmp_path / "run") == folder_bytes(tmp_path / "ref")


SLOW_PREPARE = """import os, sys, time
sys.path.insert(0, {repo!r})
import prepare

tokenize_batch, batches_of = prepare.tokenize_batch, prepare.batches_of


def slow_tokenize_batch(texts):  # (a module-level function: the workers find it, forked or spawned)
    time.sleep(0.1)
    return tokenize_batch(texts)


def slow_batches_of(pieces, progress):  # reading slowed: the workers wait for their next batch
    for batch in batches_of(pieces, progress):
        time.sleep(0.05)
        yield batch


def stuck_tokenize_batch(texts):  # a batch that takes a minute, begun: the file busy.PID says so
    open(f"busy.{{os.getpid()}}", "w").close()
    time.sleep(60)
    return tokenize_batch(texts)


if __name__ == "__main__":
    prepare.BATCH_CHARS = 1000
    slowed = sys.argv.pop(1)
    if slowed == "stuck":  # as on macOS too: no prctl, the workers' own threads watch for the main process's end
        prepare.tokenize_batch = stuck_tokenize_batch
        prepare.kernel_ends_with_parent = lambda: False  # (forked workers inherit both)
    elif slowed == "tokenizing":
        prepare.tokenize_batch = slow_tokenize_batch
    else:
        prepare.batches_of = slow_batches_of
    sys.exit(prepare.main(sys.argv[1:]))
"""


def slowed_prepare(tmp_path, slowed):
    """The command that runs prepare.py, its reading or tokenizing slowed (SLOW_PREPARE), on 400 documents
    in tmp_path, into tmp_path/run, with two workers."""
    from conftest import REPO

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(400, seed=8)))
    (tmp_path / "slow_prepare.py").write_text(SLOW_PREPARE.format(repo=str(REPO)))
    return [sys.executable, "slow_prepare.py", slowed, "docs.jsonl", "--out_dir", "run", "--shard_size", "2000",
            "--num_proc", "2"]


def wait_for_a_shard(run, out_dir):
    """Until the launched prepare.py's workers have tokenized a shard into out_dir (or it ended; a minute at most)."""
    deadline = time.time() + 60
    while time.time() < deadline and run.proc.poll() is None and not list(out_dir.glob("*.npy")):
        time.sleep(0.005)


@pytest.mark.parametrize("signum,to_group,slowed", [(signal.SIGINT, True, "tokenizing"),
                                                    (signal.SIGTERM, False, "tokenizing"),
                                                    (signal.SIGTERM, True, "reading")],
                         ids=["ctrl_c_to_the_group", "sigterm_to_the_main_process", "sigterm_to_the_group"])
def test_a_signal_mid_preparation_with_workers_is_one_line_and_the_same_command_continues(tmp_path, signum,
                                                                                          to_group, slowed):
    """Ctrl-C in a terminal signals every process of the group; SIGTERM reaches the main process only
    (kill PID) or the whole group (a scheduler, kill -- -PGID: the workers are in groups of their own, so
    none is killed while it holds the lock on the pool's queue, waiting for its next batch, which would
    leave the main process waiting forever). Either way: the one line, no worker's traceback, and the
    repeat finishes with the uninterrupted run's shards. Tokenizing or reading is slowed so the signal
    comes mid-run."""
    from conftest import Launched

    with Launched(slowed_prepare(tmp_path, slowed), tmp_path) as run:
        wait_for_a_shard(run, tmp_path / "run")
        os.killpg(run.proc.pid, signum) if to_group else run.send_signal(signum)
        code, _, err = run.finish(60)
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip() and not l.startswith("tokenizing")]  # no bar
    assert code == 130 and lines == ["interrupted: the complete shards are kept; run the same command to continue"], err
    assert not json.loads((tmp_path / "run" / "manifest.json").read_text())["complete"]  # it really was cut off
    for out in ("run", "ref"):
        prepare.prepare(str(tmp_path / "docs.jsonl"), str(tmp_path / out), shard_size=2000, show_progress=False)
    assert folder_bytes(tmp_path / "run") == folder_bytes(tmp_path / "ref")


def has_ended(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"  # (a zombie has ended)
    except OSError:
        return True


def which_workers_end_with_it(run, workers):
    """SIGKILL to the launched prepare.py alone; then, for each of its workers, whether it has ended within
    30 s (any left are killed, and the run's stderr, which they held too, read to its end)."""
    run.send_signal(signal.SIGKILL)
    run.proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and not all(has_ended(pid) for pid in workers):
        time.sleep(0.05)
    ended = [has_ended(pid) for pid in workers]
    for pid in workers:  # (no longer the launched process's: Launched would not find them)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for reader in run.readers:
        reader.join(30)
    return ended


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in Linux's /proc")
@pytest.mark.parametrize("slowed", ["reading", "tokenizing"], ids=["waiting_workers", "busy_workers"])
def test_the_workers_end_with_a_killed_main_process_quietly_and_leave_out_dir_free(tmp_path, slowed):
    """SIGKILL to prepare.py alone (kill -9 PID, the OOM killer): its workers, in process groups of their
    own, end too, rather than wait for work forever holding the lock on out_dir they inherit (every
    repeat would be refused), and without a word: a busy one is not left to find the pool's pipe closed
    and print a BrokenPipeError traceback. The same command continues to the uninterrupted run's shards."""
    from conftest import Launched, descendants

    with Launched(slowed_prepare(tmp_path, slowed), tmp_path) as run:
        wait_for_a_shard(run, tmp_path / "run")
        ended = which_workers_end_with_it(run, descendants(run.proc.pid))
    assert ended == [True, True]
    assert "Traceback" not in run.stderr(), run.stderr()
    for out in ("run", "ref"):
        prepare.prepare(str(tmp_path / "docs.jsonl"), str(tmp_path / out), shard_size=2000, show_progress=False)
    assert folder_bytes(tmp_path / "run") == folder_bytes(tmp_path / "ref")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in Linux's /proc")
def test_without_the_kernels_help_a_busy_worker_ends_with_a_killed_main_process_quietly(tmp_path):
    """Where the kernel cannot be asked to end the workers with the main process (macOS), each worker's
    own thread sees that it was handed to another parent and ends it: one stuck in a minute-long batch
    ends in well under that minute, and without the BrokenPipeError traceback it would print when it
    finished the batch and found the pool's pipe closed."""
    from conftest import Launched, descendants

    with Launched(slowed_prepare(tmp_path, "stuck"), tmp_path) as run:
        deadline = time.time() + 60
        while time.time() < deadline and run.proc.poll() is None and not list(tmp_path.glob("busy.*")):
            time.sleep(0.005)
        workers = descendants(run.proc.pid)
        assert len(workers) == 2 and list(tmp_path.glob("busy.*")), run.stderr()
        ended = which_workers_end_with_it(run, workers)  # (within 30 s: half the batch's minute)
    assert ended == [True, True]
    assert "Traceback" not in run.stderr(), run.stderr()


def test_a_shard_bigger_than_the_memory_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """--shard_size 10**15 would be a 2 PB array: refused in one line, before any allocation or file."""
    (tmp_path / "book.txt").write_text(" ".join(make_documents(30, seed=4)))
    monkeypatch.chdir(tmp_path)
    assert prepare.main(["book.txt", "--out_dir", "out", "--shard_size", str(10**15), "--num_proc", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --shard_size 1,000,000,000,000,000 needs 1,819.0 TiB of memory for the shard "
                          "being filled (2 bytes a token), more than this machine's ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
