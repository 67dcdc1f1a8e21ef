"""Training on prepared shards: DataLoaderLite(data_dir=...) and train_gpt2.py --data_dir. Batches are
checked against the concatenated token stream sliced by hand; runs against the text-file path's
promises (exact resume, torchrun equals one process)."""

import hashlib
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

import prepare
import machinery.checkpoints
import machinery.console
import machinery.run_log
import machinery.tokens
import train_gpt2
from conftest import REPO, TINY, make_documents, one_process_and_two, run_in_process, run_script, step_losses
from train_gpt2 import DataLoaderLite, main


def write_shards(folder, lengths, splits=None):
    """A data_dir by hand: shard i holds the tokens 1000*i, 1000*i + 1, ... (so every batch shows where
    it came from), with a manifest as prepare.py writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    splits = splits or ["train"] * len(lengths)
    shards = []
    for i, (n, split) in enumerate(zip(lengths, splits)):
        file = f"{split}_{i:06d}.npy"
        np.save(folder / file, (1000 * i + np.arange(n)).astype(np.uint16))
        sha256 = hashlib.sha256((folder / file).read_bytes()).hexdigest()  # (hashed another way than prepare.py's)
        shards.append(dict(file=file, split=split, tokens=n, sha256=sha256, next_document=0, next_offset=0))
    manifest = dict(tokenizer="gpt2", dtype="uint16", source="hand", shard_size=max(lengths), shards=shards,
                    documents=0, tokens=sum(lengths), complete=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def windows_by_hand(shard_tokens, B, T, processes, rank):
    """The x of every batch one epoch serves to `rank`, in order, following the rule in the words of
    the docstring: window p = 0, W, 2W, ... of a shard is used exactly when p + W + 1 <= len(shard)."""
    W = B * T * processes
    out = []
    for tokens in shard_tokens:
        p = 0
        while p + W + 1 <= len(tokens):
            out.append(tokens[p + rank * B * T: p + (rank + 1) * B * T])
            p += W
    return out


@pytest.mark.parametrize("processes", [1, 2])
def test_batches_are_the_token_stream_sliced_by_hand(tmp_path, processes):
    lengths = [101, 60, 7, 250]  # a shard too short for one window (7) is passed over
    data = write_shards(tmp_path / "d", lengths)
    shard_tokens = [1000 * i + np.arange(n) for i, n in enumerate(lengths)]
    B, T = 2, 5
    for rank in range(processes):
        loader = DataLoaderLite(B, T, data_dir=data, split="train", process_rank=rank, num_processes=processes,
                                shuffle=False)
        expected = windows_by_hand(shard_tokens, B, T, processes, rank)
        for _ in range(2):  # two epochs, in manifest order
            for want in expected:
                x, y = loader.next_batch()
                assert torch.equal(x.flatten(), torch.from_numpy(want.astype(np.int64)))
                assert torch.equal(y.flatten(), x.flatten() + 1)  # the next token, within the shard


def test_no_window_is_skipped_at_a_shard_boundary(tmp_path):
    """A shard of exactly k*W + 1 tokens serves all k windows (the classic loader lost the last one)."""
    B, T, processes = 2, 4, 2
    W = B * T * processes
    data = write_shards(tmp_path / "d", [3 * W + 1, 2 * W + 1])
    loaders = [DataLoaderLite(B, T, data_dir=data, split="train", process_rank=r, num_processes=processes,
                              shuffle=False) for r in range(processes)]
    starts = []
    for _ in range(5):
        first = loaders[0].next_batch()[0]
        loaders[1].next_batch()
        starts.append(int(first[0, 0]))
    assert starts == [0, W, 2 * W, 1000, 1000 + W]
    assert int(loaders[0].next_batch()[0][0, 0]) == 0  # then a new epoch


@pytest.mark.parametrize("B, processes", [(2, 1), (2, 2), (4, 1)])
def test_batches_per_pass_counts_the_windows_of_every_shard(tmp_path, B, processes):
    """From the manifest's lengths, as many batches as the loader serves before its first comes again."""
    loader = DataLoaderLite(B, 16, data_dir=str(write_shards(tmp_path / "d", [700, 333, 50, 704])), split="train",
                            shuffle=False, num_processes=processes)
    first, served = loader.next_batch()[0], 1
    while not torch.equal(loader.next_batch()[0], first):
        served += 1
    assert machinery.tokens.batches_per_pass(loader) == served


def test_each_epoch_reads_every_shard_once_in_a_seeded_order(tmp_path):
    n_shards, B, T = 8, 1, 4
    data = write_shards(tmp_path / "d", [B * T + 1] * n_shards)  # one batch per shard

    def orders(seed, epochs=3, shuffle=True):
        loader = DataLoaderLite(B, T, data_dir=data, split="train", seed=seed, shuffle=shuffle)
        return [[int(loader.next_batch()[0][0, 0]) // 1000 for _ in range(n_shards)] for _ in range(epochs)]

    a = orders(seed=1)
    assert all(sorted(epoch) == list(range(n_shards)) for epoch in a)  # every shard once per epoch
    assert len({tuple(epoch) for epoch in a}) == 3  # a new order each epoch
    assert orders(seed=1) == a  # seeded: the same orders again
    assert orders(seed=2) != a
    assert orders(seed=1, shuffle=False) == [list(range(n_shards))] * 3  # --no-shuffle: manifest order


def test_validation_reads_the_val_shards_from_their_start_in_order(tmp_path):
    data = write_shards(tmp_path / "d", [20, 300, 40, 300], ["val", "train", "val", "train"])
    val = DataLoaderLite(2, 4, data_dir=data, split="val", shuffle=True)  # validation never shuffles
    assert [os.path.basename(s) for s in val.shards] == ["val_000000.npy", "val_000002.npy"]
    first = [val.next_batch()[0] for _ in range(5)]
    val.reset()
    assert all(torch.equal(a, val.next_batch()[0]) for a in first)  # the same batches every time
    assert [int(x[0, 0]) for x in first] == [0, 8, 2000, 2008, 2016]  # shard 0's windows, then shard 2's
    many = write_shards(tmp_path / "many", [9, 300] * 4, ["val", "train"] * 4)  # (any order of 2 may be 0, 1)
    val = DataLoaderLite(2, 4, data_dir=many, split="val", shuffle=True)
    assert [int(val.next_batch()[0][0, 0]) for _ in range(4)] == [0, 2000, 4000, 6000]  # a window a shard


def test_loader_state_round_trips_across_shards_and_epochs(tmp_path):
    data = write_shards(tmp_path / "d", [41, 57, 33, 90])
    a = DataLoaderLite(2, 4, data_dir=data, split="train", seed=5)
    for _ in range(30):  # 27 windows per epoch: into the second
        a.next_batch()
    state = a.state_dict()
    assert state["epoch"] == 1
    b = DataLoaderLite(2, 4, data_dir=data, split="train", seed=5)
    b.load_state_dict(state)
    for _ in range(20):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])


def test_the_loader_never_loads_a_whole_shard(tmp_path, monkeypatch):
    """Shards are read a window at a time: np.load only ever reads a header (mmap_mode="r", never the tokens)."""
    data = write_shards(tmp_path / "d", [400, 400])
    modes = []
    load = np.load
    monkeypatch.setattr(train_gpt2.np, "load", lambda *a, **k: modes.append(k.get("mmap_mode")) or load(*a, **k))
    loader = DataLoaderLite(2, 8, data_dir=data, split="train")
    for _ in range(50):
        loader.next_batch()
    assert modes and set(modes) == {"r"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A small corpus prepared with prepare.py: 1 val shard and several train shards of 3000 tokens."""
    tmp = tmp_path_factory.mktemp("prepared")
    (tmp / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(400, seed=7)))
    prepare.prepare(str(tmp / "docs.jsonl"), str(tmp / "data"), shard_size=3000, show_progress=False)
    return tmp / "data"


def test_training_on_shards_prints_the_data_and_learns(tmp_path, prepared):
    r = run_script(*TINY, "--data_dir", prepared, "--input_file", "does-not-matter.txt", "--B", "2", "--T", "32",
                   "--max_steps", "30", "--lr", "3e-3", "--eval_interval", "10", "--num_samples", "1",
                   "--max_new_tokens", "4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((prepared / "manifest.json").read_text())
    n_train = sum(s["split"] == "train" for s in manifest["shards"])
    train_tokens = sum(s["tokens"] for s in manifest["shards"] if s["split"] == "train")
    line = next(l for l in r.stdout.splitlines() if l.startswith("data "))
    assert line.startswith(f"data {prepared} | {n_train} train shards, {train_tokens:,} tokens | 1 val shards")
    assert "shuffle on" in line
    losses = step_losses(r.stdout)
    assert float(losses[29]) < float(losses[0]) - 1.0
    evaluated = [int(l.split()[1]) for l in r.stdout.splitlines() if "| val loss" in l]
    assert evaluated == [0, 10, 20, 30]  # every eval_interval steps from the untrained model, and the last


def test_resume_on_shards_continues_exactly(tmp_path):
    """Stopped at step 7 (after the checkpoint of 5 steps done) and resumed: the same losses as one run,
    across shard boundaries and into a second, reshuffled epoch (4 shards of 2 windows each). The resume
    names neither --data_dir nor the run's --seed: it reads the run's data, not the input.txt beside it, in
    the run's order, not the default seed's."""
    data = write_shards(tmp_path / "d", [600, 700, 700, 700, 700], ["val", "train", "train", "train", "train"])
    args = [*TINY, "--data_dir", str(data), "--B", "4", "--T", "64", "--max_steps", "12", "--lr", "3e-3",
            "--eval_interval", "4", "--eval_iters", "2", "--num_samples", "0", "--checkpoint_interval", "5",
            "--seed", "7"]
    assert main([*args, "--out_dir", str(tmp_path / "ref")]) == 0
    step_line = machinery.console.step_line

    def stop_at_7(record, *a):
        if record["step"] == 7:
            raise KeyboardInterrupt  # killed: the last checkpoint holds 5 steps done
        return step_line(record, *a)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(train_gpt2, "step_line", stop_at_7)
        assert main([*args, "--out_dir", str(tmp_path / "run")]) == 130
    # resumed without --data_dir, where an input.txt lies: the run's data all the same (the checkpoint's)
    (tmp_path / "input.txt").write_text((REPO / "input.txt").read_text()[:20_000])
    with pytest.MonkeyPatch.context() as m:
        m.chdir(tmp_path)
        resumed = [a for a in args if a not in ("--data_dir", str(data), "--seed", "7")]  # (no other value is 7)
        assert main([*resumed, "--out_dir", str(tmp_path / "run"), "--resume"]) == 0

    def log(name):
        records = map(json.loads, (tmp_path / name / "log.jsonl").read_text().splitlines())
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in records]

    assert [step for step, _, _ in log("ref")] == list(range(13))  # steps 0-11, and the final evaluation
    assert log("run") == log("ref")
    state = machinery.checkpoints.load_checkpoint(str(tmp_path / "ref" / "ckpt.pt"))["train_loader"]
    assert state["epoch"] >= 1  # the run did cross into a second epoch


def test_a_resume_reads_in_the_runs_order_unless_told_otherwise(tmp_path, capsys):
    """A --no-shuffle run cut after 3 steps and resumed without the flag reads on in manifest order, as
    the run did (the checkpoint's setting): the same losses as 8 steps in one go. A resume that types
    another --seed for a shuffled run is told so in its note."""
    data = write_shards(tmp_path / "d", [600, 700, 700, 700, 700], ["val", "train", "train", "train", "train"])
    args = [*TINY, "--data_dir", str(data), "--B", "4", "--T", "64", "--lr", "3e-3", "--eval_interval", "100",
            "--eval_iters", "1", "--num_samples", "0"]
    assert main([*args, "--no-shuffle", "--max_steps", "8", "--out_dir", str(tmp_path / "ref")]) == 0
    assert main([*args, "--no-shuffle", "--max_steps", "3", "--out_dir", str(tmp_path / "run")]) == 0
    assert main([*args, "--max_steps", "8", "--out_dir", str(tmp_path / "run"), "--resume"]) == 0

    def losses(name):
        records = map(json.loads, (tmp_path / name / "log.jsonl").read_text().splitlines())
        return [(r["step"], r["loss"]) for r in records if "loss" in r]

    assert losses("run") == losses("ref") and len(losses("ref")) == 8
    assert main([*args, "--max_steps", "3", "--out_dir", str(tmp_path / "shuffled")]) == 0
    capsys.readouterr()
    assert main([*args, "--max_steps", "4", "--seed", "7", "--out_dir", str(tmp_path / "shuffled"), "--resume"]) == 0
    assert "note: resumed with --max_steps 4 (the run's: 3), --seed 7 (the run's: 1337): from step 3 on" in \
        capsys.readouterr().out


def test_eval_only_reads_only_the_validation_shards(tmp_path, capsys):
    """--resume --eval_only with a data_dir of validation shards alone (what one keeps to score
    checkpoints): the run's model evaluated, with the validation loss the run itself logged."""
    args = [*TINY, "--B", "4", "--T", "64", "--eval_iters", "2", "--num_samples", "0",
            "--out_dir", str(tmp_path / "run")]
    data = write_shards(tmp_path / "d", [600, 700, 700], ["val", "train", "train"])
    assert main([*args, "--data_dir", str(data), "--max_steps", "2"]) == 0
    val_only = write_shards(tmp_path / "v", [600], ["val"])  # the same validation tokens (shard 0's)
    capsys.readouterr()
    assert main([*args, "--data_dir", str(val_only), "--resume", "--eval_only"]) == 0
    printed = [l for l in capsys.readouterr().out.splitlines() if "| val loss" in l]
    logged = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert len(printed) == 1 and float(printed[0].split()[-1]) == pytest.approx(logged["val_loss"], abs=1e-4)


def test_torchrun_two_processes_on_shards_equal_one(tmp_path, prepared, items_file):
    """Two CPU processes (TINY says --device cpu, so gloo) give the same losses as one, and the same
    HellaSwag accuracies: 7 items split over 2 ranks (4 and 3), the correct counts summed."""
    common = [*TINY, "--data_dir", prepared, "--T", "16", "--total_batch_size", "64", "--dtype", "float32",
              "--max_steps", "4", "--eval_interval", "2", "--num_samples", "0", "--hellaswag", items_file]
    _, a, b = one_process_and_two(tmp_path, *common)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4]  # 4: the final evaluation
    for r, s in zip(a, b):
        assert ("loss" in r) == ("loss" in s) and ("val_loss" in r) == ("val_loss" in s)
        assert abs(r.get("loss", 0) - s.get("loss", 0)) <= 1e-5
        assert abs(r.get("val_loss", 0) - s.get("val_loss", 0)) <= 1e-5
    hs = [(r["step"], r["hellaswag_acc"], r["hellaswag_acc_norm"]) for r in a if "hellaswag_acc" in r]
    assert [r["step"] for r in a if "hellaswag_acc" in r] == [0, 2, 4]
    assert hs == [(r["step"], r["hellaswag_acc"], r["hellaswag_acc_norm"]) for r in b if "hellaswag_acc" in r]


def test_a_resume_with_another_batch_finds_its_shard_by_name(tmp_path):
    """Shards shorter than one window are passed over, so a resume with a bigger --B (or more processes)
    shuffles a shorter list, in which the same index is another shard: the loader takes the checkpoint's
    shard by its file name. A checkpoint in a shard now too short for a batch passes it over, as the loader
    does: the run goes on at the start of the next shard of the manifest that holds one batch, or, where none
    follows, of the next epoch."""
    restore_data_position = machinery.checkpoints.restore_data_position
    data = write_shards(tmp_path / "d", [700, 700, 50, 700])  # the 50-token shard: one window of B=2, not of B=4
    small, big = (DataLoaderLite(B, 16, data_dir=str(data), split="train", seed=5) for B in (2, 4))
    files = [os.path.basename(small.shards[i]) for i in small.order]
    moved = 0
    for shard, file in enumerate(files):
        if file == "train_000002.npy":  # (read up to token 32 with B=2)
            restore_data_position(big, {"epoch": 0, "shard": shard, "position": 32, "file": file})
            assert (big.epoch, big.file, big.position) == (0, "train_000003.npy", 0)
            continue
        restore_data_position(big, {"epoch": 0, "shard": shard, "position": 64, "file": file})
        assert big.file == file and big.position == 64
        assert big.current[64:65][0] == 1000 * int(file[6:12]) + 64  # (shard i holds 1000*i, 1000*i + 1, ...)
        moved += big.shard != shard
    assert moved  # (seed 5: some shard's index differs between the two lists, so the name is what finds it)
    last_short = write_shards(tmp_path / "e", [700, 700, 50])  # (no shard after the short one: the next epoch)
    small, big = (DataLoaderLite(B, 16, data_dir=str(last_short), split="train", shuffle=False) for B in (2, 4))
    restore_data_position(big, {"epoch": 3, "shard": 2, "position": 0, "file": "train_000002.npy"})
    assert (big.epoch, big.shard, big.position) == (4, 0, 0)
    with pytest.raises(ValueError, match="shard train_000009.npy is not among the train shards of "):
        restore_data_position(big, {"epoch": 0, "shard": 0, "position": 0, "file": "train_000009.npy"})


def test_the_data_line_names_the_shards_too_short_for_a_batch(tmp_path):
    """A shard shorter than one batch serves none (the loader passes it over): the data line counts the shards
    read, and says how many were passed over (the split's tokens are all of them, as the checkpoint keeps), in
    either split (a val shard too short leaves the run without validation)."""
    data = write_shards(tmp_path / "d", [700, 700, 50])  # (50 tokens: no window of B=4, T=16)
    loader = DataLoaderLite(4, 16, data_dir=str(data), split="train")
    cfg = train_gpt2.TrainConfig(data_dir=str(data), B=4, T=16, total_batch_size=64)
    line = machinery.console.describe_data(cfg, loader, None, 1, 1)
    assert line.startswith(f"data {data} | 2 train shards (1 shorter than a batch, passed over), 1,450 tokens | ")
    line = machinery.console.describe_data(replace(cfg, total_batch_size=16),
                                           DataLoaderLite(1, 16, data_dir=str(data), split="train"), None, 1, 1)
    assert line.startswith(f"data {data} | 3 train shards, 1,450 tokens | ")
    data = write_shards(tmp_path / "v", [700, 700, 50], splits=["train", "train", "val"])  # (too short: no validation)
    line = machinery.console.describe_data(replace(cfg, data_dir=str(data)), loader, None, 1, 1)
    assert " | 0 val shards (1 shorter than a batch, passed over), 50 tokens | " in line


def damage(data, how):
    manifest = json.loads((data / "manifest.json").read_text())
    shard = data / manifest["shards"][0 if how == "val ids" else 1]["file"]  # (the val shard, or train's first)
    if how == "missing":
        shard.unlink()
    elif how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "empty":  # a copy cut off before its first byte
        shard.write_bytes(b"")
    elif how == "dtype":
        np.save(shard, np.zeros(manifest["shards"][1]["tokens"], dtype=np.int32))
    elif how == "length":  # a whole .npy file of GPT-2 ids, another length than the manifest lists
        np.save(shard, np.zeros(manifest["shards"][1]["tokens"] - 10, dtype=np.uint16))
    elif how == "no manifest":
        (data / "manifest.json").unlink()
    elif how == "incomplete":
        (data / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    elif how in ("ids", "val ids"):  # a token id past GPT-2's vocabulary (the header and size are right)
        tokens = np.load(shard)
        tokens[5] = 60000
        np.save(shard, tokens)
    elif how == "other ids":  # a flipped bit that leaves a GPT-2 id: only the shard's SHA-256 tells
        tokens = np.load(shard)
        tokens[5] ^= 1
        np.save(shard, tokens)
    elif how == "manifest dtype":  # a manifest edited to say another type than its shards hold
        (data / "manifest.json").write_text(json.dumps({**manifest, "dtype": "float64"}))
    elif how == "tokenizer":  # another tokenizer's ids: the model's rows would mean other tokens
        (data / "manifest.json").write_text(json.dumps({**manifest, "tokenizer": "cl100k_base"}))
    elif how == "npz":  # an archive of the tokens under the shard's name
        np.savez(data / "archive", np.load(shard))
        (data / "archive.npz").replace(shard)
    elif how == "folder":
        shard.unlink()
        shard.mkdir()
    elif how == "manifest folder":  # (made by hand under the manifest's name)
        (data / "manifest.json").unlink()
        (data / "manifest.json").mkdir()
    elif how.startswith("edited"):  # a hand-edited manifest: a shard's tokens as text, its file a number
        field, value = ("tokens", "300") if how == "edited tokens" else ("file", 1)
        manifest["shards"][1][field] = value
        (data / "manifest.json").write_text(json.dumps(manifest))
    return shard


@pytest.mark.parametrize("how,message", [
    ("missing", "listed in the manifest is missing"),
    ("truncated", "is truncated or not a .npy file"),
    ("empty", "is truncated or not a .npy file"),
    ("dtype", "holds int32"),
    ("length", "train_000001.npy' holds uint16 (290,), the manifest says uint16 (300,)"),
    ("no manifest", "has no manifest.json: prepare it with  python prepare.py"),
    ("manifest folder", "has no manifest.json (a folder of that name is there): prepare it with"),
    ("incomplete", "is not fully prepared"),
    ("tokenizer", "holds cl100k_base tokens; train_gpt2.py reads GPT-2's (gpt2)"),
    ("manifest dtype", "manifest says its tokens are 'float64'; prepare.py writes uint16"),
    ("ids", "holds token id 60000, past GPT-2's 50,257 tokens: it is damaged"),
    ("val ids", "holds token id 60000, past GPT-2's 50,257 tokens: it is damaged"),  # (not "no validation")
    ("other ids", "train_000001.npy' is damaged: its SHA-256 is not the one its manifest.json lists"),
    ("npz", "train_000001.npy' is not a .npy file"),
    ("folder", "cannot read shard"),
    ("edited tokens", "is not a manifest as prepare.py writes it: its shard 1's tokens is '300', not a whole number"),
    ("edited file", "is not a manifest as prepare.py writes it: its shard 1's file is 1, not a text"),
])
def test_bad_data_dir_is_one_clear_line(tmp_path, how, message, monkeypatch, capsys):
    data = write_shards(tmp_path / "d", [300, 300, 300], ["val", "train", "train"])
    damage(data, how)
    code, _, err = run_in_process(*TINY, "--data_dir", data, "--B", "2", "--T", "16", "--max_steps", "1",
                                  "--no-shuffle", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert not (tmp_path / "out").exists()


def test_the_picture_marks_gpt2s_val_loss_only_on_fineweb_edu(tmp_path, prepared, text_file, monkeypatch):
    """GPT-2 124M's validation loss on FineWeb-Edu (3.2924, on prepare.py's first val shard) is a line on
    the picture of a run on shards whose manifest says they are FineWeb-Edu sample-10BT in shards of
    prepare.py's default size (a copy of the prepared corpus, its source and shard size edited to what
    prepare.py fineweb-edu records); on other shards (FineWeb-Edu's in shards of another size included:
    another first shard), and on a text file, GPT-2's loss is not known: no line."""
    import shutil

    fineweb = tmp_path / "fineweb-edu"
    shutil.copytree(prepared, fineweb)
    manifest = json.loads((fineweb / "manifest.json").read_text())
    (fineweb / "manifest.json").write_text(json.dumps({**manifest, "source": ":".join(machinery.tokens.FINEWEB_EDU),
                                                       "shard_size": 100_000_000}))
    resized = tmp_path / "fineweb-edu-resized"
    shutil.copytree(prepared, resized)
    (resized / "manifest.json").write_text(json.dumps({**manifest, "source": ":".join(machinery.tokens.FINEWEB_EDU)}))
    assert machinery.tokens.FINEWEB_EDU == ("HuggingFaceFW/fineweb-edu", "sample-10BT")
    plot_log, drawn = machinery.run_log.plot_log, []

    def spy(log_path, png_path, gpt2_val_loss=None):
        drawn.append(gpt2_val_loss)
        return plot_log(log_path, png_path, gpt2_val_loss)

    monkeypatch.setattr(machinery.run_log, "plot_log", spy)
    for name, data, gpt2_val_loss in (("fineweb", ["--data_dir", str(fineweb)], 3.2924),
                                      ("other", ["--data_dir", str(prepared)], None),
                                      ("resized", ["--data_dir", str(resized)], None),
                                      ("text", ["--input_file", str(text_file)], None)):
        drawn.clear()
        assert main([*TINY, *data, "--B", "2", "--T", "16", "--max_steps", "1", "--eval_iters", "1",
                     "--num_samples", "0", "--out_dir", str(tmp_path / name)]) == 0
        assert (tmp_path / name / "progress.png").exists()
        assert drawn == [gpt2_val_loss, gpt2_val_loss], name  # drawn at each evaluation: steps 0 and 1


def test_no_gpt2_mark_on_fineweb_edu_that_fits_in_one_shard(tmp_path):
    """FineWeb-Edu prepared in shards of the default size, but so little of it (a stand-in) that it fits in
    one: prepare.py splits it 90/10, train first, and its val split is not the first shard GPT-2's 3.2924
    was measured on."""
    def with_shards(*splits):
        folder = tmp_path / "-".join(splits)
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps(dict(
            source=":".join(machinery.tokens.FINEWEB_EDU), tokenizer="gpt2", shard_size=100_000_000,
            shards=[dict(split=split, tokens=10) for split in splits])))
        return str(folder)

    assert machinery.run_log.gpt2_val_loss_on(with_shards("val", "train", "train")) == 3.2924
    assert machinery.run_log.gpt2_val_loss_on(with_shards("train", "val")) is None


@pytest.mark.parametrize("change", ["shorter", "cut_short", "deleted", "other_ids"])
def test_a_shard_changed_while_training_runs_is_one_line_naming_it(tmp_path, prepared, change):
    """The manifest and every shard's header are checked when a run begins; a shard changed after that
    (rewritten shorter, cut short, deleted: another prepare.py, a full disk, a cleanup; or one id changed to
    another of GPT-2's, which nothing else would find) is found when the loader opens it, and said naming the
    file: not a reshape's RuntimeError, nor numpy's nameless EOF, nor silently trained on."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    loader = DataLoaderLite(2, 16, split="train", data_dir=str(data), shuffle=False)
    second = data / json.loads((data / "manifest.json").read_text())["shards"][2]["file"]  # (shard 0 is val)
    if change == "shorter":
        np.save(second, np.arange(10, dtype=np.uint16))
    elif change == "cut_short":
        second.write_bytes(second.read_bytes()[:100])
    elif change == "other_ids":
        tokens = np.load(second)
        np.save(second, np.roll(tokens, 1))  # (the same ids, each one place later)
    else:
        second.unlink()
    with pytest.raises(machinery.tokens.DamagedShard, match=f"^shard {str(second)!r} "):
        for _ in range(1000):  # past the first shard's batches, to the second
            loader.next_batch()


@pytest.mark.parametrize("change", ["cut_short", "overwritten"])
def test_a_shard_changed_as_the_loader_reads_it_is_one_line_not_a_crash(tmp_path, prepared, change):
    """The very shard the loader is reading, cut short (a cleanup, another prepare.py) or overwritten in
    place with bytes that are no GPT-2 ids: read through a memory map, the first ended the process with
    SIGBUS ("Bus error", not a word more) and the second with the embedding's IndexError. Read a window
    at a time, each is one line naming the file."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    loader = DataLoaderLite(2, 16, split="train", data_dir=str(data), shuffle=False)
    loader.next_batch()
    shard = data / loader.file
    size = shard.stat().st_size
    if change == "cut_short":
        os.truncate(shard, 200)
    else:
        with open(shard, "r+b") as f:
            f.seek(200)  # (past the .npy header)
            f.write(b"\xff" * (size - 200))  # id 65535
    says = "was cut short while the run read it" if change == "cut_short" else "holds token id 65535, past GPT-2's"
    with pytest.raises(machinery.tokens.DamagedShard, match=f"^shard {str(shard)!r} {says}"):
        for _ in range(1000):
            loader.next_batch()
