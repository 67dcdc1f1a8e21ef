"""prepare.py: any corpus to token shards. What the shards hold is checked against an independent
tokenization of the same documents; interruptions at every write against an uninterrupted run."""

import hashlib
import json
import os

import numpy as np
import pytest

import prepare
from conftest import make_documents, run_script
from machinery import get_tokenizer

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


def test_a_corpus_within_one_shard_still_gets_both_splits(tmp_path):
    docs = make_documents(20, seed=2)
    (tmp_path / "small.txt").write_text(docs[0])
    manifest = prepare.prepare(str(tmp_path / "small.txt"), str(tmp_path / "out"), shard_size=10**6,
                               show_progress=False)
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


@pytest.mark.parametrize("kill_at", range(1, 12))
@pytest.mark.parametrize("half_written", [False, True], ids=["before_write", "mid_write"])
def test_killed_then_repeated_gives_the_shards_of_an_uninterrupted_run(tmp_path, reference, monkeypatch,
                                                                       kill_at, half_written):
    """The run dies at the kill_at-th file write (a shard or the manifest), before it or halfway
    through it; the same command then finishes the job, and the folder is byte for byte the
    uninterrupted one's."""
    folder, expected = reference
    write = prepare.write_atomically
    writes = []

    def dying_write(path, writer):
        writes.append(path)
        if len(writes) == kill_at:
            if half_written:
                with open(path + ".tmp", "wb") as f:
                    f.write(b"\x93NUMPY half a file")
            raise KeyboardInterrupt
        write(path, writer)

    out = tmp_path / "run"
    monkeypatch.setattr(prepare, "write_atomically", dying_write)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(str(folder), str(out), shard_size=1000, show_progress=False)
    monkeypatch.setattr(prepare, "write_atomically", write)
    prepare.prepare(str(folder), str(out), shard_size=1000, show_progress=False)
    assert folder_bytes(out) == expected


@pytest.mark.parametrize("kill_at", range(1, 5))
def test_a_small_corpus_killed_at_any_write_finishes_the_same(tmp_path, monkeypatch, kill_at):
    """Within one shard: the manifest, the train shard, the val shard, the final manifest."""
    (tmp_path / "small.txt").write_text(" ".join(make_documents(30, seed=9)))
    prepare.prepare(str(tmp_path / "small.txt"), str(tmp_path / "ref"), shard_size=10**6, show_progress=False)
    write = prepare.write_atomically
    writes = []

    def dying_write(path, writer):
        writes.append(path)
        if len(writes) == kill_at:
            raise KeyboardInterrupt
        write(path, writer)

    monkeypatch.setattr(prepare, "write_atomically", dying_write)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(str(tmp_path / "small.txt"), str(tmp_path / "run"), shard_size=10**6, show_progress=False)
    monkeypatch.setattr(prepare, "write_atomically", write)
    prepare.prepare(str(tmp_path / "small.txt"), str(tmp_path / "run"), shard_size=10**6, show_progress=False)
    assert folder_bytes(tmp_path / "run") == folder_bytes(tmp_path / "ref")


def test_a_repeated_run_continues_after_the_complete_shards(tmp_path, reference, monkeypatch):
    """Shards listed as complete are kept, not recomputed: the repeat tokenizes only the rest."""
    folder, expected = reference
    out = tmp_path / "run"
    write = prepare.write_atomically
    writes = []

    def dying_write(path, writer):
        writes.append(path)
        if len(writes) == 10:  # the first manifest, then 4 shards and theirs: dies writing the 5th shard
            raise KeyboardInterrupt
        write(path, writer)

    monkeypatch.setattr(prepare, "write_atomically", dying_write)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(str(folder), str(out), shard_size=1000, show_progress=False)
    monkeypatch.setattr(prepare, "write_atomically", write)
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
    assert f"{damaged.name} is missing or damaged" in capsys.readouterr().err
    assert folder_bytes(out) == expected


# ----------------------------------------------------------------------------- FineWeb-Edu, faked


class FakeStream:
    """Stands in for datasets' streaming IterableDataset: rows with "text", optionally failing once."""

    def __init__(self, docs, fail_after=None):
        self.docs, self.fail_after, self.start = docs, fail_after, 0

    def skip(self, n):
        skipped = FakeStream(self.docs, self.fail_after)
        skipped.start = n
        return skipped

    def __iter__(self):
        for i in range(self.start, len(self.docs)):
            if self.fail_after is not None and i == self.fail_after:
                raise ConnectionError("connection reset by peer")
            yield {"text": self.docs[i], "id": i}


def fake_hub(monkeypatch, streams):
    """load_dataset returns the next of `streams` on each call, and records its arguments."""
    import datasets

    calls = []

    def load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        stream = streams[min(len(calls), len(streams)) - 1]
        if isinstance(stream, Exception):
            raise stream
        return stream

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(prepare, "RETRY_PAUSE_S", 0.0)
    return calls


def test_fineweb_edu_streams_and_resumes_after_a_dropped_connection(tmp_path, monkeypatch):
    docs = make_documents(120, seed=3)
    calls = fake_hub(monkeypatch, [FakeStream(docs, fail_after=50), FakeStream(docs)])
    manifest = prepare.prepare("fineweb-edu", str(tmp_path / "fw"), shard_size=2000, show_progress=False)
    assert calls[0] == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)  # streamed, not downloaded
    assert len(calls) == 2  # one retry
    _, arrays = read_shards(tmp_path / "fw")
    assert np.array_equal(np.concatenate(arrays), stream_of(docs))  # no document lost or repeated
    assert manifest["source"] == "HuggingFaceFW/fineweb-edu:sample-10BT"


def test_fineweb_edu_download_failure_is_one_line(tmp_path, monkeypatch, capsys):
    fake_hub(monkeypatch, [ConnectionError("Couldn't reach the Hugging Face Hub\nsecond line")])
    with pytest.raises(prepare.PrepareError, match=r"downloading HuggingFaceFW/fineweb-edu \(sample-10BT\) "
                                                   r"failed 5 times: Couldn't reach the Hugging Face Hub$"):
        prepare.prepare("fineweb-edu", str(tmp_path / "fw"), show_progress=False)


def test_fineweb_edu_offline_is_one_line_in_the_default_out_dir(tmp_path):
    """The real datasets library, offline (HF_HUB_OFFLINE): retried (pauses shortened), then one line."""
    import subprocess
    import sys

    from conftest import OFFLINE_ENV, REPO

    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import prepare; prepare.RETRY_PAUSE_S = 0; "
            "sys.exit(prepare.main(['fineweb-edu', '--num_proc', '1']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **OFFLINE_ENV, "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: downloading HuggingFaceFW/fineweb-edu (sample-10BT) failed 5 times"), r.stderr
    assert r.stderr.count("retrying in") == 4
    out = tmp_path / "data" / "fineweb-edu"  # the default out_dir
    assert out.is_dir() and not list(out.glob("*.npy"))


# ----------------------------------------------------------------------------- the command line


def test_cli_prepares_a_text_file_and_says_what_it_wrote(tmp_path):
    (tmp_path / "book.txt").write_text(" ".join(make_documents(30, seed=4)))
    r = run_script("book.txt", "--out_dir", "data/book", "--shard_size", "1000", "--num_proc", "1",
                   cwd=tmp_path, script="prepare.py")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "data" / "book" / "manifest.json").read_text())
    splits = [shard["split"] for shard in manifest["shards"]]
    assert manifest["documents"] == 1  # a text file is one document
    assert r.stdout == (f"data/book: 1 documents, {manifest['tokens']:,} tokens in {splits.count('train')} train "
                        f"and {splits.count('val')} val shards\n")
    assert "tokens" in r.stderr  # the progress bar
    again = run_script("book.txt", "--out_dir", "data/book", "--shard_size", "1000", cwd=tmp_path,
                       script="prepare.py")
    assert again.returncode == 0 and again.stdout == r.stdout  # complete: nothing to do


BAD_SOURCES = [  # (source, setup, what the one line must say)
    ("missing.txt", None, "source 'missing.txt' not found"),
    ("folder", lambda p: (p / "folder").mkdir() or (p / "folder" / "notes.md").write_text("x"),
     "has no .txt, .jsonl or .parquet files"),
    ("empty.txt", lambda p: (p / "empty.txt").write_text(""), "holds no text"),
    ("blank", lambda p: (p / "blank").mkdir() or (p / "blank" / "a.jsonl").write_text('{"text": ""}\n'),
     "holds no text"),
    ("notext", lambda p: (p / "notext").mkdir() or (p / "notext" / "a.jsonl").write_text(
        '{"text": "fine"}\n{"content": "no text field"}\n'), 'a.jsonl:2 has no "text" string field'),
    ("badjson", lambda p: (p / "badjson").mkdir() or (p / "badjson" / "a.jsonl").write_text("{oops\n"),
     "a.jsonl:1 is not JSON"),
    ("latin1.txt", lambda p: (p / "latin1.txt").write_bytes("café".encode("latin-1")), "is not UTF-8"),
    ("badparquet", lambda p: (p / "badparquet").mkdir() or (p / "badparquet" / "a.parquet").write_bytes(b"PAR1junk"),
     "is not a readable parquet file"),
]


@pytest.mark.parametrize("source,setup,message", BAD_SOURCES, ids=[m for _, _, m in BAD_SOURCES])
def test_bad_input_is_one_clear_line(tmp_path, source, setup, message, monkeypatch, capsys):
    """prepare.py's main() as the command runs it (test_cli_prepares... runs the real command)."""
    if setup:
        setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert prepare.main([source, "--out_dir", "out", "--num_proc", "1"]) == 1  # an exception would fail here
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bar, if it started
    assert last.startswith("error:") and message in last, err
    assert not list((tmp_path / "out").glob("*.npy")) if (tmp_path / "out").exists() else True


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
    (tmp_path / "loose").mkdir()
    np.save(tmp_path / "loose" / "mine.npy", np.arange(3))
    assert prepare.main(["a.txt", "--out_dir", "loose"]) == 1
    assert "no manifest.json" in capsys.readouterr().err


def test_importing_prepare_does_nothing_visible():
    import subprocess
    import sys

    from conftest import REPO

    r = subprocess.run([sys.executable, "-c", "import prepare"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""


def test_sigkill_mid_preparation_then_the_same_command_finishes_the_same_shards(tmp_path):
    """A real kill (no chance to clean up), while shards are being written."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    docs = make_documents(3000, seed=8, max_words=400)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs) * 4)
    args = ["docs.jsonl", "--shard_size", "20000", "--num_proc", "1"]
    prepare.prepare(str(tmp_path / "docs.jsonl"), str(tmp_path / "ref"), shard_size=20000, show_progress=False)
    proc = subprocess.Popen([sys.executable, str(REPO / "prepare.py"), *args, "--out_dir", "run"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # until a few shards are listed
        try:
            if len(json.loads((tmp_path / "run" / "manifest.json").read_text())["shards"]) >= 3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert not manifest["complete"]  # it really was cut off
    assert run_script(*args, "--out_dir", "run", cwd=tmp_path, script="prepare.py").returncode == 0
    assert folder_bytes(tmp_path / "run") == folder_bytes(tmp_path / "ref")
