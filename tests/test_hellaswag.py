"""hellaswag.py and --hellaswag: scores checked against an independent computation with transformers'
GPT2LMHeadModel, one ending at a time; the picture of a run (plot_log). Under torchrun, HellaSwag is
checked with the shards in test_shards.py (one pair of runs checks both)."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import hellaswag
import machinery.checkpoints
import machinery.run_log
import machinery.tokens
import train_gpt2
from conftest import CONTEXTS, CPU_ALLOCATOR_FAILED, TINY, official, run_script
from machinery import hellaswag_eval
from machinery.run_log import plot_log
from train_gpt2 import GPT, GPTConfig, main


@pytest.fixture
def random_gpt2(hf_gpt2_dir):
    """Our model and transformers' with the same random weights (through save_pretrained)."""
    path, hf_model = hf_gpt2_dir(n_layer=2, n_head=2, n_embd=32, n_positions=128, seed=3)
    ours = GPT.from_pretrained(str(path)).eval()
    return path, ours, hf_model.float()


def reference_losses(hf_model, item):
    """transformers' GPT-2, one ending at a time, no padding: (sum, mean) of the ending's token losses."""
    enc = machinery.tokens.get_tokenizer()
    ctx = enc.encode_ordinary(item["ctx"])
    totals, means = [], []
    for ending in item["endings"]:
        end = enc.encode_ordinary(" " + ending)
        ids = torch.tensor([ctx + end])
        with torch.no_grad():
            logits = hf_model(ids).logits[0].double()  # (L, V)
        logprobs = torch.log_softmax(logits, dim=-1)
        losses = [-logprobs[len(ctx) + j - 1, t].item() for j, t in enumerate(end)]
        totals.append(sum(losses))
        means.append(sum(losses) / len(losses))
    return totals, means


def test_scores_and_accuracies_match_transformers_ending_by_ending(items_file, random_gpt2):
    _, ours, hf_model = random_gpt2
    items = hellaswag_eval.read_items(str(items_file))
    total, mean = hellaswag_eval.ending_losses(ours, items, "cpu", torch.autocast("cpu", enabled=False))
    ref = [reference_losses(hf_model, item) for item in items]
    # float32 batched against float64 one by one: losses of ~10.8 nats agree to 1e-4 relative
    torch.testing.assert_close(total, torch.tensor([r[0] for r in ref], dtype=torch.float32), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean, torch.tensor([r[1] for r in ref], dtype=torch.float32), rtol=1e-4, atol=1e-4)
    by_total, by_mean = hellaswag_eval.predict(ours, items, "cpu", torch.autocast("cpu", enabled=False))
    assert by_total == [min(range(4), key=r[0].__getitem__) for r in ref]
    assert by_mean == [min(range(4), key=r[1].__getitem__) for r in ref]
    labels = [item["label"] for item in items]
    correct, correct_norm, n = hellaswag_eval.count_correct(ours, items, "cpu", torch.autocast("cpu", enabled=False))
    assert n == len(CONTEXTS)
    assert correct == sum(p == y for p, y in zip(by_total, labels))
    assert correct_norm == sum(p == y for p, y in zip(by_mean, labels))
    # These items tell the two criteria apart, so the checks above would see them swapped: at random
    # weights every token costs about ln(50257) nats, so the lowest total loss is the shortest ending
    # in tokens, while the mean loss per token picks other endings.
    enc = machinery.tokens.get_tokenizer()
    shortest = [min(range(4), key=lambda j: len(enc.encode_ordinary(" " + item["endings"][j]))) for item in items]
    assert by_total == shortest and by_mean != by_total and correct != correct_norm


class LogitsOnly(torch.nn.Module):
    """transformers' GPT-2 as the scorer asks of a model: (B, T) tokens to (B, T, V) logits, alone (not GPT's
    (logits, loss)), and config.block_size."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf_model = hf_model
        self.config = GPTConfig(block_size=hf_model.config.n_positions)

    def forward(self, tokens):
        return self.hf_model(tokens).logits


def test_any_model_that_gives_logits_is_scored(items_file, random_gpt2):
    """The scorer needs no more of a model than its logits and its block size: transformers' GPT-2 behind a
    forward that returns logits alone scores each ending as ours (the same weights) does."""
    _, ours, hf_model = random_gpt2
    items = hellaswag_eval.read_items(str(items_file))
    fp32 = torch.autocast("cpu", enabled=False)
    theirs = LogitsOnly(hf_model)
    for a, b in zip(hellaswag_eval.ending_losses(theirs, items, "cpu", fp32),
                    hellaswag_eval.ending_losses(ours, items, "cpu", fp32)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # (float32, two implementations)
    assert hellaswag_eval.count_correct(theirs, items, "cpu", fp32) == hellaswag_eval.count_correct(ours, items, "cpu",
                                                                                                     fp32)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7])
def test_batched_scoring_equals_unbatched(items_file, random_gpt2, batch_size):
    _, ours, _ = random_gpt2
    items = hellaswag_eval.read_items(str(items_file))
    fp32 = torch.autocast("cpu", enabled=False)
    one = [hellaswag_eval.ending_losses(ours, [item], "cpu", fp32) for item in items]
    batched = [hellaswag_eval.ending_losses(ours, items[i: i + batch_size], "cpu", fp32)
               for i in range(0, len(items), batch_size)]
    for k in (0, 1):  # padding the shorter rows changes nothing but rounding
        torch.testing.assert_close(torch.cat([b[k] for b in batched]), torch.cat([o[k] for o in one]),
                                   rtol=1e-5, atol=1e-5)


def test_cli_prints_both_accuracies_with_counts_and_honours_limit(tmp_path, items_file, random_gpt2, capsys):
    path, ours, _ = random_gpt2
    r = run_script("--init_from", path, "--data", items_file, "--dtype", "float32", cwd=tmp_path, script="hellaswag.py")
    assert r.returncode == 0, r.stderr
    items = hellaswag_eval.read_items(str(items_file))
    correct, correct_norm, n = hellaswag_eval.count_correct(ours, items, "cpu", torch.autocast("cpu", enabled=False))
    assert f"hellaswag acc {correct / n:.4f} acc_norm {correct_norm / n:.4f} ({n} items)" in r.stdout
    assert hellaswag.main(["--init_from", str(path), "--data", str(items_file), "--limit", "3", "--device", "cpu"]) == 0
    assert "(3 items)" in capsys.readouterr().out


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full, a file every write to fails")
def test_a_stderr_that_takes_no_writes_costs_the_progress_bar_not_the_score(tmp_path, items_file, random_gpt2):
    """The bar writes to stderr: where that fails (the reader of its pipe gone, a full disk under `2> log`;
    /dev/full here) the bar goes quiet and the scoring goes on to its line on stdout (it ended in exit 1,
    silently, the score lost)."""
    from conftest import REPO

    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, str(REPO / "hellaswag.py"), "--init_from", str(random_gpt2[0]), "--data",
                            str(items_file), "--device", "cpu"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=full,
                           text=True, timeout=300)
    assert r.returncode == 0 and f"({len(CONTEXTS)} items)" in r.stdout, r.stdout


@pytest.mark.parametrize("rank, local_rank, fetches", [(0, 0, True), (1, 1, False), (8, 0, True), (9, 1, False)])
def test_the_first_process_of_each_machine_fetches_the_split(tmp_path, monkeypatch, rank, local_rank, fetches):
    """--hellaswag auto under torchrun over two machines of 8 GPUs (ranks 8-15 on the second, LOCAL_RANK 0-7
    there): the first process of each machine fetches the split into its own cache, the others wait for it."""
    fetched = []
    monkeypatch.setattr(hellaswag_eval, "cache_path", lambda: str(tmp_path / "not-yet-cached.jsonl"))
    monkeypatch.setattr(hellaswag_eval, "load_items", lambda source, flag: fetched.append(source) or [])
    monkeypatch.setattr(hellaswag_eval.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(hellaswag_eval.dist, "get_rank", lambda: rank)
    monkeypatch.setattr(hellaswag_eval.dist, "barrier", lambda: fetched.append("barrier"))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert hellaswag_eval.load_items_across_ranks("auto", 1024) == []
    assert fetched == (["auto", "barrier", "auto"] if fetches else ["barrier", "auto"])  # (then read from the cache)


def test_machines_sharing_the_cache_folder_each_write_a_temporary_file_of_their_own(tmp_path, monkeypatch):
    """Two machines fetching the split into one cache on a shared filesystem at once: each writes a
    temporary file of its own and renames it, so the cache is one whole download and neither fails. Here
    machine b's whole write happens while machine a is half way through its own."""
    import machinery.files

    path = str(tmp_path / "hellaswag_val.jsonl")
    monkeypatch.setattr(machinery.files.socket, "gethostname", lambda: "machine-a")

    def a_writes(f):
        f.write(b"a, first half; ")
        monkeypatch.setattr(machinery.files.socket, "gethostname", lambda: "machine-b")
        machinery.files.write_atomically(path, lambda g: g.write(b"b, all of it\n"), shared=True)
        f.write(b"a, second half\n")

    machinery.files.write_atomically(path, a_writes, shared=True)
    assert open(path).read() == "a, first half; a, second half\n" and os.listdir(tmp_path) == ["hellaswag_val.jsonl"]


def test_cli_evaluates_the_checkpoint_a_run_wrote(tmp_path, items_file, text_file, capfd):
    assert main([*TINY, "--input_file", str(text_file), "--B", "2", "--T", "16", "--max_steps", "2",
                 "--num_samples", "0", "--out_dir", str(tmp_path / "run")]) == 0
    r = run_script("--out_dir", tmp_path / "run", "--data", items_file, cwd=tmp_path, script="hellaswag.py")
    assert r.returncode == 0, r.stderr
    assert f"({len(CONTEXTS)} items) | {tmp_path / 'run'}" in r.stdout
    # the checkpoint named as train_gpt2.py's --init_from takes it: the same model, the same accuracies
    capfd.readouterr()  # (what the run printed)
    assert hellaswag.main(["--init_from", str(tmp_path / "run" / "ckpt.pt"), "--data", str(items_file),
                           "--device", "cpu"]) == 0
    out, _ = capfd.readouterr()
    assert out.split(" | ")[0] == r.stdout.split(" | ")[0] and out.endswith(f"| {tmp_path / 'run' / 'ckpt.pt'}\n")
    shutil.copy(tmp_path / "run" / "ckpt.pt", tmp_path / "model.ckpt")  # (a checkpoint by any other name)
    assert hellaswag.main(["--init_from", str(tmp_path / "model.ckpt"), "--data", str(items_file),
                           "--device", "cpu"]) == 0
    assert capfd.readouterr().out.split(" | ")[0] == r.stdout.split(" | ")[0]
    # the run's folder named where a save_pretrained one goes: one line naming the checkpoint to pass,
    # from either script
    hint = (f"error: {str(tmp_path / 'run')!r} is a training run's folder, not a save_pretrained one: pass its "
            f"checkpoint, {tmp_path / 'run' / 'ckpt.pt'}\n")
    assert hellaswag.main(["--init_from", str(tmp_path / "run"), "--data", str(items_file)]) == 1
    assert capfd.readouterr().err == hint
    assert main([*TINY, "--input_file", str(text_file), "--init_from", str(tmp_path / "run"), "--max_steps", "0",
                 "--out_dir", str(tmp_path / "other")]) == 1
    assert capfd.readouterr().err == hint


BAD = [  # (file content, None for a missing file or a folder for one, what the one line says)
    (None, "not found"),
    ("folder", "is a folder"),
    ("pipe", "is not a regular file"),
    ("", "is empty"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": 0}\n', ":1 is not a HellaSwag item"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 7}\n', ":1 is not a HellaSwag item"),
    # (a blank ctx: one-token endings would all tie, and the tie go to label 0, scored correct)
    ('{"ctx": " ", "endings": ["", "", "", ""], "label": 0}\n', ":1 is not a HellaSwag item (a ctx that is not blank"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 1}\nnot json\n', ":2 is not JSON"),
    (b'{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 1}\n{"ctx": "\x80"}\n', "items.jsonl:2 is not UTF-8"),
]


def test_a_file_an_editor_saved_with_a_byte_order_mark_reads_as_without(tmp_path, items_file):
    """Some editors begin a UTF-8 file with a byte-order mark; it is no part of the first item's JSON."""
    marked = tmp_path / "marked.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + items_file.read_bytes())
    assert hellaswag_eval.read_items(str(marked)) == hellaswag_eval.read_items(str(items_file))


@pytest.mark.parametrize("flags,message", [(["--limit", "-1"], "--limit must be at least 0, got -1"),
                                           (["--batch_size", "0"], "--batch_size must be at least 1, got 0")])
def test_a_bad_number_is_one_line_naming_its_flag(capsys, flags, message):
    assert hellaswag.main([*flags, "--device", "cpu"]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("content,message", BAD, ids=[m for _, m in BAD])
def test_bad_data_is_one_clear_line(tmp_path, random_gpt2, content, message, capsys):
    """hellaswag.py's main(), as the command runs it (the tests above run the real command)."""
    path, _, _ = random_gpt2
    data = tmp_path / "items.jsonl"
    if content == "folder":
        data.mkdir()
    elif content == "pipe":  # (as /dev/null or a FIFO would be)
        os.mkfifo(data)
    elif content is not None:
        data.write_bytes(content) if isinstance(content, bytes) else data.write_text(content)
    assert hellaswag.main(["--init_from", str(path), "--data", str(data), "--device", "cpu"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines


def test_an_item_longer_than_the_models_context_is_said_before_scoring(tmp_path, items_file, random_gpt2, capsys):
    """An item whose context and ending pass the model's block_size (128 here) is one line naming it and its
    length, before any item is scored (it was found partway, by the batch that held it, its counts left
    saved for a resume that could only fail again)."""
    from machinery.tokens import get_tokenizer

    path, _, _ = random_gpt2
    long = official("The " + "very " * 150 + "long story goes on. It", ["ends.", "stops.", "halts.", "is over."], 0, 9)
    lines = items_file.read_text().splitlines()
    data = tmp_path / "items.jsonl"
    data.write_text("\n".join(lines[:2] + [json.dumps(long)] + lines[2:]) + "\n")
    enc = get_tokenizer()
    length = max(len(enc.encode_ordinary(long["ctx"])) + len(enc.encode_ordinary(" " + e)) for e in long["endings"])
    assert length > 128
    scored = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hellaswag_eval, "count_correct", lambda *args: scored.append(args) or (0, 0, 0))
        assert hellaswag.main(["--init_from", str(path), "--data", str(data), "--device", "cpu"]) == 1
    assert capsys.readouterr().err == (f"error: HellaSwag item 3 has {length} tokens (context and ending), more than "
                                       "the model's block_size of 128\n")
    assert scored == []


def test_a_resumed_run_finds_an_item_longer_than_its_model_before_it_trains(tmp_path, text_file, items_file, capsys):
    """A resumed run evaluates next at its next eval_interval, not at once: an item its model's context
    (block_size 64 here) cannot hold is said before the first step, not after eval_interval steps of training
    that the error would then lose."""
    from machinery.tokens import get_tokenizer

    assert main([*RUN, "--input_file", str(text_file), "--max_steps", "2", "--out_dir", str(tmp_path / "run")]) == 0
    long = official("The " + "very " * 60 + "long story goes on. It", ["ends.", "stops.", "halts.", "is over."], 0, 9)
    data = tmp_path / "items.jsonl"
    data.write_text(items_file.read_text() + json.dumps(long) + "\n")
    enc = get_tokenizer()
    length = max(len(enc.encode_ordinary(long["ctx"])) + len(enc.encode_ordinary(" " + e)) for e in long["endings"])
    before = (tmp_path / "run" / "ckpt.pt").read_bytes(), (tmp_path / "run" / "log.jsonl").read_text()
    capsys.readouterr()
    assert main([*RUN, "--input_file", str(text_file), "--max_steps", "6", "--eval_interval", "5", "--resume",
                 "--hellaswag", str(data), "--out_dir", str(tmp_path / "run")]) == 1
    out, err = capsys.readouterr()
    assert err == (f"error: HellaSwag item {len(CONTEXTS) + 1} has {length} tokens (context and ending), more than "
                   "the model's block_size of 64\n")
    assert "step    2" not in out  # (no step trained)
    assert ((tmp_path / "run" / "ckpt.pt").read_bytes(), (tmp_path / "run" / "log.jsonl").read_text()) == before


@pytest.mark.parametrize("eval_only", [False, True], ids=["training", "eval_only"])
def test_an_item_longer_than_a_save_pretrained_models_context_is_said_before_its_model_is_built(
        tmp_path, text_file, items_file, hf_gpt2_dir, eval_only, capsys):
    """--init_from a save_pretrained folder decides the model's shape as a checkpoint does: its block_size
    (32 here, not the flag's default of 1024) is what the items must fit, said before the model is made (it
    was found at the first evaluation, after the setup; with --eval_only, with the progress bar drawn)."""
    from machinery.tokens import get_tokenizer

    path, _ = hf_gpt2_dir(n_positions=32)
    long = official("The " + "very " * 40 + "long story goes on. It", ["ends.", "stops.", "halts.", "is over."], 0, 9)
    data = tmp_path / "items.jsonl"
    data.write_text(items_file.read_text() + json.dumps(long) + "\n")
    enc = get_tokenizer()
    length = max(len(enc.encode_ordinary(long["ctx"])) + len(enc.encode_ordinary(" " + e)) for e in long["endings"])
    assert 32 < length <= 1024
    capsys.readouterr()  # (transformers' save_pretrained draws a bar)
    mode = ["--eval_only"] if eval_only else ["--max_steps", "2"]
    assert main(["--init_from", str(path), "--input_file", str(text_file), "--B", "2", "--T", "16", *mode,
                 "--device", "cpu", "--hellaswag", str(data), "--out_dir", str(tmp_path / "run")]) == 1
    out, err = capsys.readouterr()
    assert err == (f"error: HellaSwag item {len(CONTEXTS) + 1} has {length} tokens (context and ending), more than "
                   "the model's block_size of 32\n")
    assert "parameters" not in out  # (no model described: none was built)


def test_a_model_with_fewer_rows_than_gpt2s_tokens_is_refused_in_one_line(tmp_path, items_file, hf_gpt2_dir, capfd):
    """HellaSwag's items are GPT-2 tokens (ids up to 50256): a 100-token table cannot look them up, in a
    save_pretrained directory or in a run's checkpoint (a model fine-tuned from such a directory; refused
    as every train_gpt2 checkpoint with such a table is)."""
    from dataclasses import asdict

    path, _ = hf_gpt2_dir(vocab_size=100)
    model = GPT(GPTConfig(block_size=32, vocab_size=100, n_layer=1, n_head=2, n_embd=16))
    state = {"model": model.state_dict(), "optimizer": {}, "steps_done": 0, "model_config": asdict(model.config),
             "train_config": {}, "train_loader": {}, "rng": {}}
    (tmp_path / "run").mkdir()
    machinery.checkpoints.save_checkpoint(state, str(tmp_path / "run" / "ckpt.pt"))
    capfd.readouterr()  # (what making them printed)
    checkpoint = str(tmp_path / "run" / "ckpt.pt")
    for flags, says in ((["--init_from", str(path)], f"{str(path)!r} has a vocabulary of 100 tokens, fewer than "
                         "GPT-2's 50,257: it cannot score HellaSwag's GPT-2 tokens"),
                        (["--out_dir", str(tmp_path / "run")], f"{checkpoint!r} is not a usable train_gpt2 checkpoint: "
                         "model_config vocab_size is 100, below the tokenizer's 50257 ids")):
        assert hellaswag.main([*flags, "--data", str(items_file), "--device", "cpu"]) == 1
        out, err = capfd.readouterr()
        assert err == f"error: {says}\n" and out == ""


def test_a_model_that_is_not_gpt2_is_refused_in_one_line(tmp_path, items_file, capfd):
    """A BERT saved with save_pretrained: one line, not HellaSwag scored with random GPT-2 weights."""
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=50257, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(tmp_path / "bert")
    capfd.readouterr()  # (what making it printed)
    assert hellaswag.main(["--init_from", str(tmp_path / "bert"), "--data", str(items_file), "--device", "cpu"]) == 1
    out, err = capfd.readouterr()
    assert err == f"error: {str(tmp_path / 'bert')!r} is a bert model, not GPT-2\n" and out == ""


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs (not even an except clause for KeyboardInterrupt)."""


def scored_uninterrupted(tmp_path, items_file, random_gpt2, monkeypatch, capsys):
    """hellaswag.py's arguments for a random GPT-2 on 7 items in batches of 2 (its cache, where counts in
    progress are kept, in tmp_path), and what a run that is not interrupted prints."""
    path, _, _ = random_gpt2
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = ["--init_from", str(path), "--data", str(items_file), "--device", "cpu", "--dtype", "float32",
            "--batch_size", "2"]
    assert hellaswag.main(args) == 0
    return args, capsys.readouterr().out


# what stops scoring in its third batch: Ctrl-C, a SIGKILL, and memory running out (a GPU's, or RAM)
STOPS = {"ctrl_c": KeyboardInterrupt, "killed": Killed,
         "out_of_gpu_memory": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
         "out_of_ram": RuntimeError(CPU_ALLOCATOR_FAILED)}


@pytest.mark.parametrize("how", STOPS)
def test_interrupted_scoring_says_how_far_it_got_and_the_same_command_continues(tmp_path, items_file, random_gpt2,
                                                                                monkeypatch, capsys, how):
    """Ctrl-C during the third batch: one line and 130, the counts of the first two saved; killed there
    instead, the counts saved last (here after every batch) are kept; memory running out there (a GPU's, or
    RAM as torch's CPU allocator says it): one line and 1, not a traceback, the counts kept. The same command
    then scores only the items after them, prints what an uninterrupted run prints, and removes what it kept."""
    args, expected = scored_uninterrupted(tmp_path, items_file, random_gpt2, monkeypatch, capsys)
    count_correct, scored = hellaswag_eval.count_correct, []

    def recording(model, items, *args):
        scored.extend(items)
        return count_correct(model, items, *args)

    def stopped_at_the_third_batch(model, items, *args):
        if len(scored) == 4:
            raise STOPS[how]
        return recording(model, items, *args)

    monkeypatch.setattr(hellaswag_eval, "count_correct", stopped_at_the_third_batch)
    if how == "killed":
        monkeypatch.setattr(hellaswag_eval, "SAVE_EVERY_S", 0.0)
        with pytest.raises(Killed):
            hellaswag.main(args)
    else:
        assert hellaswag.main(args) == (130 if how == "ctrl_c" else 1)
        err = capsys.readouterr().err
        assert err.endswith("\ninterrupted: scored 4 of 7 items; run the same command to continue\n" if how == "ctrl_c"
                            else "\nerror: out of memory on cpu scoring 2 items a batch: a smaller --batch_size needs "
                            "less (and scores from the first item: the counts kept are for this one)\n"), err
    monkeypatch.setattr(hellaswag_eval, "count_correct", recording)
    scored.clear()
    if how == "out_of_ram":  # as the line says: a smaller --batch_size scores from the first item (its own counts)
        assert hellaswag.main([*args[:-1], "1"]) == 0
        assert scored == hellaswag_eval.read_items(str(items_file)) and capsys.readouterr().out == expected
        scored.clear()
    assert hellaswag.main(args) == 0
    assert capsys.readouterr().out == expected
    assert scored == hellaswag_eval.read_items(str(items_file))[4:]
    assert not list((tmp_path / "cache").rglob("*.json"))


def test_openais_reference_is_printed_only_beside_a_score_of_the_whole_set(tmp_path, items_file, random_gpt2,
                                                                          monkeypatch, capsys):
    """For OpenAI's GPT-2 the published scores of all 10,042 items are printed under the score, to compare;
    under the score of a part (--limit) they are not comparable: not printed. (The random model stands in for
    "gpt2", and the 7 items for the whole set.)"""
    load_model = hellaswag.load_model
    monkeypatch.setattr(hellaswag, "load_model", lambda args: (load_model(args)[0], "gpt2"))
    monkeypatch.setattr(hellaswag, "N_VALIDATION", 7)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = ["--init_from", str(random_gpt2[0]), "--data", str(items_file), "--device", "cpu", "--dtype", "float32"]
    assert hellaswag.main(args) == 0
    acc, acc_norm = hellaswag_eval.REFERENCE["gpt2"]
    assert capsys.readouterr().out.splitlines()[-1] == f"reference for gpt2: acc {acc:.4f} acc_norm {acc_norm:.4f}"
    assert hellaswag.main([*args, "--limit", "2"]) == 0
    assert "reference" not in capsys.readouterr().out


def a_bug(*args):
    raise RuntimeError("a bug")


def ram_runs_out(*args):
    raise RuntimeError(CPU_ALLOCATOR_FAILED)


def test_out_of_memory_before_scoring_is_one_line_that_does_not_blame_the_batch(tmp_path, items_file, random_gpt2,
                                                                               monkeypatch, capsys):
    """Memory running out while the model is read (a checkpoint bigger than RAM) is one line too, which says so
    rather than blame --batch_size, which scoring has not used yet."""
    path, _, _ = random_gpt2
    monkeypatch.setattr(hellaswag, "load_model", ram_runs_out)
    assert hellaswag.main(["--init_from", str(path), "--data", str(items_file), "--device", "cpu"]) == 1
    assert capsys.readouterr().err == "error: out of memory before scoring: the model does not fit (--device cpu)\n"


def test_an_error_that_is_not_out_of_memory_keeps_its_traceback(tmp_path, items_file, random_gpt2, monkeypatch):
    """Only memory running out is an expected fault: any other RuntimeError is a bug, raised with its traceback."""
    path, _, _ = random_gpt2
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(hellaswag_eval, "count_correct", a_bug)
    with pytest.raises(RuntimeError, match="a bug"):
        hellaswag.main(["--init_from", str(path), "--data", str(items_file), "--device", "cpu"])


class NotAnswered(Exception):
    """Raised by this test's own SIGTERM handler, which stands for the OS's (the end of the process)."""


def sigterm_not_answered(signum, frame):
    raise NotAnswered("SIGTERM reached the handler hellaswag.py should have replaced while scoring")


def test_a_sigterm_while_scoring_is_a_ctrl_c_the_counts_saved(tmp_path, items_file, random_gpt2, monkeypatch, capsys):
    """A scheduler's SIGTERM during the third batch: the line a Ctrl-C gives and 130, the counts of the first
    two batches saved, and the handler it found put back; the same command then finishes the job. (Without
    hellaswag.py's handler, the OS would end the process without a word and the last counts saved.)"""
    args, expected = scored_uninterrupted(tmp_path, items_file, random_gpt2, monkeypatch, capsys)
    count_correct, batches = hellaswag_eval.count_correct, []

    def terminated_in_the_third_batch(model, items, *args):
        batches.append(items)
        if len(batches) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # (the handler runs as this call returns)
        return count_correct(model, items, *args)

    monkeypatch.setattr(hellaswag_eval, "count_correct", terminated_in_the_third_batch)
    previous = signal.signal(signal.SIGTERM, sigterm_not_answered)
    try:
        assert hellaswag.main(args) == 130
        assert signal.getsignal(signal.SIGTERM) is sigterm_not_answered
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert err.endswith("\ninterrupted: scored 4 of 7 items; run the same command to continue\n"), err
    batches.clear()
    monkeypatch.setattr(hellaswag_eval, "count_correct",
                        lambda model, items, *args: batches.append(items) or count_correct(model, items, *args))
    assert hellaswag.main(args) == 0
    assert capsys.readouterr().out == expected
    assert sum(batches, []) == hellaswag_eval.read_items(str(items_file))[4:]  # only what was not scored
    assert not list((tmp_path / "cache").rglob("*.json"))


def test_a_sigterm_before_scoring_is_one_line(tmp_path, items_file, random_gpt2, monkeypatch, capsys):
    """While the model loads (here: as the items are read) a SIGTERM says so in one line, as Ctrl-C does."""
    path, _, _ = random_gpt2
    read_items = hellaswag_eval.read_items
    monkeypatch.setattr(hellaswag, "load_items",
                        lambda *args: os.kill(os.getpid(), signal.SIGTERM) or read_items(*args))
    previous = signal.signal(signal.SIGTERM, sigterm_not_answered)
    try:
        assert hellaswag.main(["--init_from", str(path), "--data", str(items_file), "--device", "cpu"]) == 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err == "interrupted: before scoring began\n"


def test_counts_that_cannot_be_saved_only_cost_the_resume(tmp_path, items_file, random_gpt2, monkeypatch, capsys):
    """Where the cache cannot be written (a read-only home, a full disk), scoring goes on to the same
    result, saying once that an interrupted run would start again; Ctrl-C then says the counts are lost."""
    args, expected = scored_uninterrupted(tmp_path, items_file, random_gpt2, monkeypatch, capsys)

    def disk_full(path, write):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(hellaswag_eval, "write_atomically", disk_full)
    monkeypatch.setattr(hellaswag_eval, "SAVE_EVERY_S", 0.0)  # (a save tried after every batch)
    assert hellaswag.main(args) == 0
    out, err = capsys.readouterr()
    assert out == expected and err.count("cannot save the counts so far ([Errno 28] No space left on device") == 1
    count_correct = hellaswag_eval.count_correct

    def stopped_at_the_second_batch(model, items, *args):
        stopped_at_the_second_batch.calls += 1
        if stopped_at_the_second_batch.calls == 2:
            raise KeyboardInterrupt
        return count_correct(model, items, *args)

    stopped_at_the_second_batch.calls = 0
    monkeypatch.setattr(hellaswag_eval, "count_correct", stopped_at_the_second_batch)
    assert hellaswag.main(args) == 130
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("interrupted: scored 2 of 7 items; the counts could not be saved ([Errno 28] No space")


def test_a_cache_that_is_not_a_folder_only_costs_the_resume(tmp_path, items_file, random_gpt2, monkeypatch, capsys):
    """$XDG_CACHE_HOME a file: the counts can be neither saved nor removed at the end; the accuracy is
    still printed, once said that an interrupted run would start again."""
    args, expected = scored_uninterrupted(tmp_path, items_file, random_gpt2, monkeypatch, capsys)
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a_file"))
    monkeypatch.setattr(hellaswag_eval, "SAVE_EVERY_S", 0.0)  # (a save tried after every batch)
    assert hellaswag.main(args) == 0
    out, err = capsys.readouterr()
    assert out == expected and err.count("cannot save the counts so far ([Errno 20] Not a directory") == 1, err


DAMAGED = [{"scored": 100, "correct": 50, "correct_norm": 50},  # more than the 7 items: another accuracy
           {"scored": "4", "correct": 1, "correct_norm": 1},  # not a number: scoring could not go on
           {"scored": 4, "correct": 5, "correct_norm": 0}]  # more correct than scored


@pytest.mark.parametrize("saved", DAMAGED, ids=["too_many", "a_string", "more_correct"])
def test_saved_counts_damaged_since_start_the_scoring_over(tmp_path, items_file, random_gpt2, monkeypatch, capsys,
                                                            saved):
    args, expected = scored_uninterrupted(tmp_path, items_file, random_gpt2, monkeypatch, capsys)
    progress = tmp_path / "progress.json"
    progress.write_text(json.dumps(saved))
    monkeypatch.setattr(hellaswag, "progress_path", lambda *args: str(progress))
    assert hellaswag.main(args) == 0
    assert capsys.readouterr().out == expected and not progress.exists()


def test_two_models_named_at_once_is_one_line(tmp_path, items_file, capsys):
    with pytest.raises(SystemExit) as stopped:
        hellaswag.main(["--init_from", "gpt2-medium", "--out_dir", str(tmp_path), "--data", str(items_file)])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "error: argument --out_dir: not allowed with argument --init_from (see --help)\n"


def test_missing_checkpoint_is_one_clear_line(tmp_path, items_file):
    r = run_script("--out_dir", tmp_path / "nothing", "--data", items_file, cwd=tmp_path, script="hellaswag.py")
    assert r.returncode == 1 and r.stderr.startswith("error: no checkpoint in") and len(r.stderr.splitlines()) == 1


def test_auto_download_failure_is_one_line_and_leaves_no_cache(tmp_path, random_gpt2):
    path, _, _ = random_gpt2
    r = run_script("--init_from", path, cwd=tmp_path, script="hellaswag.py",
                   env_extra={"XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: downloading HellaSwag (Rowan/hellaswag) failed"), r.stderr
    assert not (tmp_path / "cache" / "train_gpt2" / "hellaswag_val.jsonl").exists()


def test_without_a_network_the_command_says_so_in_one_line_at_once(tmp_path, monkeypatch, capfd, no_network,
                                                                    random_gpt2):
    """`python hellaswag.py` on a machine whose network is off: the hub's name does not resolve, so its
    libraries are told at once that they are offline (instead of retrying each request for half a
    minute and printing every retry), the one line says why, and the offline switch is set back after.
    The model is loaded first (GPT-2's weights, from the hub by default: that is the line), then the items.
    A training run's --hellaswag auto says the same, naming its own flag."""
    import os

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    capfd.readouterr()  # (what making the local model printed)
    assert hellaswag.main([]) == 1
    assert capfd.readouterr().err == ("error: could not load GPT-2 weights from 'gpt2': not in the hub's cache, and "
                                      "the Hugging Face hub cannot be reached (offline? load from a save_pretrained "
                                      "directory instead)\n")
    assert hellaswag.main(["--init_from", str(random_gpt2[0])]) == 1  # a local model: the items' download fails
    out, err = capfd.readouterr()
    assert err == ("error: downloading HellaSwag (Rowan/hellaswag) failed: the Hugging Face hub cannot be reached "
                   "(no network?); pass a local file with --data\n") and out == ""
    assert "HF_HUB_OFFLINE" not in os.environ
    from conftest import REPO

    code = main([*TINY, "--input_file", str(REPO / "input.txt"), "--hellaswag", "auto", "--max_steps", "1",
                            "--out_dir", str(tmp_path / "run")])  # in training, the flag is --hellaswag
    assert code == 1 and capfd.readouterr().err.endswith("(no network?); pass a local file with --hellaswag\n")


def test_auto_download_converts_string_labels_and_caches(tmp_path, monkeypatch):
    import datasets

    rows = [{**official(c, e, l, i), "label": str(l)} for i, (c, e, l) in enumerate(CONTEXTS)]
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or rows)
    monkeypatch.setattr(hellaswag_eval, "N_VALIDATION", len(rows))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    items = hellaswag_eval.load_items("auto")
    assert calls == [(("Rowan/hellaswag",), {"split": "validation"})]
    assert [item["label"] for item in items] == [l for _, _, l in CONTEXTS]
    assert hellaswag_eval.load_items("auto") == items and len(calls) == 1  # cached: fetched once
    cache = tmp_path / "train_gpt2" / "hellaswag_val.jsonl"
    cache.write_bytes(cache.read_bytes()[:-50])  # damaged since (written whole): says to delete it
    with pytest.raises(ValueError, match=r"hellaswag_val.jsonl:7 is not JSON.*; it is the cached download: delete "
                                         r"it, and the next run fetches it again$"):
        hellaswag_eval.load_items("auto")
    monkeypatch.setattr(hellaswag_eval, "N_VALIDATION", 10_042)
    (tmp_path / "train_gpt2" / "hellaswag_val.jsonl").unlink()
    with pytest.raises(ValueError, match="downloaded 7 HellaSwag items, expected 10042"):
        hellaswag_eval.load_items("auto")  # an incomplete download is refused and never cached
    assert not (tmp_path / "train_gpt2" / "hellaswag_val.jsonl").exists()


# ----------------------------------------------------------------------------- in training

RUN = [*TINY, "--B", "2", "--T", "16", "--max_steps", "4", "--eval_interval", "2", "--eval_iters", "2",
       "--num_samples", "0", "--dtype", "float32"]


LONG_ENDINGS = [
    "walks slowly along the river bank under a grey sky, thinking about what the king said to the queen last night",
    "and then, with great care and a steady hand, writes a long letter to an old friend who lives far away",
    "opens the heavy wooden door of the castle and looks out across the fields toward the dark forest beyond",
]


@pytest.fixture
def lopsided_items_file(tmp_path):
    """8 HellaSwag items whose right ending is one word (one token) and whose three wrong endings are
    20-odd tokens each. At near-random weights every token costs about ln(50257) = 10.8 nats, so the
    lowest total loss (acc) always picks the one-word ending: acc is 1. The lowest mean loss (acc_norm)
    does not favour short endings and picks it only sometimes: the two accuracies differ."""
    items = []
    for i, word in enumerate(["sleeps", "smiles", "waits", "laughs", "sings", "leaves", "stops", "falls"]):
        label = i % 4
        endings = LONG_ENDINGS[:label] + [word] + LONG_ENDINGS[label:]
        items.append(official(f"Scene {i}: a man stands by the window. He", endings, label, i))
    path = tmp_path / "lopsided.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def test_training_logs_hellaswag_at_every_evaluation(tmp_path, text_file, lopsided_items_file, capsys):
    """--hellaswag scores the items at every evaluation and logs hellaswag_acc (lowest total loss) and
    hellaswag_acc_norm (lowest mean loss): the accuracies count_correct gives for the model of that
    step. The lopsided items tell the two apart (acc is 1 there, acc_norm is not), so a swap shows."""
    assert main([*RUN, "--input_file", str(text_file), "--hellaswag", str(lopsided_items_file),
                 "--out_dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    evaluated = [r for r in log if "hellaswag_acc_norm" in r]
    # every eval_interval from the untrained model at step 0, and the trained model after the last step
    assert [r["step"] for r in evaluated] == [0, 2, 4]
    for r in evaluated:
        assert f"step {r['step']:5d} | hellaswag acc_norm {r['hellaswag_acc_norm']:.4f}" in out
        assert r["hellaswag_acc"] == 1.0 and r["hellaswag_acc_norm"] < 1.0  # total loss picks the one word
    # the last evaluation scored the model the run saved: count_correct on it gives the same counts
    ckpt = machinery.checkpoints.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    assert ckpt["steps_done"] == evaluated[-1]["step"] == 4
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    items = hellaswag_eval.read_items(str(lopsided_items_file))
    correct, correct_norm, n = hellaswag_eval.count_correct(model, items, "cpu", torch.autocast("cpu", enabled=False))
    assert (evaluated[-1]["hellaswag_acc"], evaluated[-1]["hellaswag_acc_norm"]) == (correct / n, correct_norm / n)
    assert panels(tmp_path / "run" / "progress.png") == 2  # drawn by the run: losses, and HellaSwag beside them
    plot_log(str(tmp_path / "run" / "log.jsonl"), str(tmp_path / "again.png"))  # and redrawn from its log
    assert panels(tmp_path / "again.png") == 2


def test_without_validation_data_the_picture_is_drawn_at_each_hellaswag_evaluation(tmp_path, lopsided_items_file,
                                                                                  monkeypatch, capsys):
    """progress.png is redrawn at every evaluation, also where HellaSwag is the only one (a text too short for
    a validation batch): steps 0 and 2 in the loop, 4 at the end."""
    from conftest import REPO

    text = tmp_path / "short.txt"
    text.write_text((REPO / "input.txt").read_text()[:600])  # ~150 tokens: val's 10% < a 2 x 16 batch
    monkeypatch.setattr(machinery.run_log, "plot_log", drawing := DrawingSpy())
    assert main([*RUN, "--input_file", str(text), "--hellaswag", str(lopsided_items_file),
                 "--out_dir", str(tmp_path / "run")]) == 0
    assert "no validation:" in capsys.readouterr().out
    assert drawing.steps == [0, 2, 4]


class DrawingSpy:
    """plot_log, noting the step of the log's last record each time it draws."""

    def __init__(self):
        self.steps = []

    def __call__(self, log_path, png_path, gpt2_val_loss=None):
        with open(log_path) as f:
            self.steps.append(json.loads(f.read().splitlines()[-1])["step"])
        return plot_log(log_path, png_path, gpt2_val_loss)


def test_eval_only_scores_hellaswag_as_a_run_would(tmp_path, random_gpt2, lopsided_items_file, monkeypatch,
                                                  capsys):
    """--init_from DIR --eval_only --hellaswag FILE scores the items as count_correct does on DIR's
    model, and prints the line a run prints. The text here is too short for a validation batch: HellaSwag
    is the whole evaluation, and that is enough (the lopsided items tell acc from acc_norm)."""
    path, ours, _ = random_gpt2
    text = tmp_path / "small.txt"
    text.write_text(" word" * 1000)  # 900 train tokens, 100 val: fewer than one batch of 2 x 64 + 1
    evaluate, results = train_gpt2.evaluate, []
    monkeypatch.setattr(train_gpt2, "evaluate", lambda *a: results.append(evaluate(*a)) or results[-1])
    monkeypatch.chdir(tmp_path)
    assert main(["--init_from", str(path), "--input_file", str(text), "--B", "2", "--T", "64", "--eval_only",
                 "--hellaswag", str(lopsided_items_file), "--device", "cpu", "--dtype", "float32"]) == 0
    stdout = capsys.readouterr().out
    items = hellaswag_eval.read_items(str(lopsided_items_file))
    correct, correct_norm, n = hellaswag_eval.count_correct(ours, items, "cpu", torch.autocast("cpu", enabled=False))
    assert results == [{"hellaswag_acc": correct / n, "hellaswag_acc_norm": correct_norm / n}]
    assert [l for l in stdout.splitlines() if l.startswith("step")] == \
        [f"step     0 | hellaswag acc_norm {correct_norm / n:.4f}"]
    assert "no validation" in stdout and not (tmp_path / "out").exists()


def test_eval_only_hellaswag_is_shown_and_a_ctrl_c_continues(tmp_path, random_gpt2, lopsided_items_file, monkeypatch,
                                                             capsys):
    """--eval_only's HellaSwag is the whole job (tens of minutes for its 10,042 items on a CPU): it is
    scored as hellaswag.py scores, with a progress bar, and a Ctrl-C after the first batch of 8 is one line
    saying how far it got; the same command then scores only the rest and prints the same accuracy."""
    path, _, _ = random_gpt2
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # (where counts in progress are kept)
    (tmp_path / "many.jsonl").write_text(lopsided_items_file.read_text() * 3)  # 24 items: 3 batches of 8
    (tmp_path / "small.txt").write_text(" word" * 1000)  # (too short for a validation batch)
    args = ["--init_from", str(path), "--input_file", "small.txt", "--B", "2", "--T", "64", "--eval_only",
            "--hellaswag", "many.jsonl", "--device", "cpu", "--dtype", "float32"]
    monkeypatch.chdir(tmp_path)
    assert main(args) == 0
    out, err = capsys.readouterr()
    expected = [line for line in out.splitlines() if line.startswith("step")]
    assert "hellaswag: 100%" in err and "24/24" in err  # (tqdm's bar)
    count_correct, scored = hellaswag_eval.count_correct, []

    def recording(model, items, *args):
        scored.extend(items)
        return count_correct(model, items, *args)

    def stopped_at_the_second_batch(model, items, *args):
        if scored:
            raise KeyboardInterrupt
        return recording(model, items, *args)

    monkeypatch.setattr(hellaswag_eval, "count_correct", stopped_at_the_second_batch)
    assert main(args) == 130
    assert capsys.readouterr().err.endswith("\ninterrupted: scored 8 of 24 items; run the same command to continue\n")
    monkeypatch.setattr(hellaswag_eval, "count_correct", recording)
    scored.clear()
    assert main(args) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")] == expected
    assert len(scored) == 16 and not list((tmp_path / "cache").rglob("*.json"))


# ----------------------------------------------------------------------------- the picture


def is_png(path):
    from PIL import Image  # matplotlib's own dependency

    with Image.open(path) as image:
        image.verify()
        return image.format == "PNG" and image.size[0] > 100


def panels(path):
    """The panels of a picture plot_log drew, told by its width (100 dpi): 7 inches for the losses alone,
    12 with the HellaSwag panel beside them."""
    from PIL import Image

    assert is_png(path)
    with Image.open(path) as image:
        width = image.size[0]
    assert width in (700, 1200), f"{path} is {width} pixels wide"
    return 1 if width == 700 else 2


@pytest.fixture
def horizontal_lines(monkeypatch):
    """Every Axes.axhline a picture draws, as (panel, y, linestyle, label); the panel is "hellaswag" or
    "loss", read from the axes' y label once the picture is drawn."""
    import matplotlib.axes

    calls, axhline = [], matplotlib.axes.Axes.axhline

    def spy(self, y=0, *args, **kwargs):
        calls.append((self, y, kwargs.get("linestyle"), kwargs.get("label", "")))
        return axhline(self, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", spy)

    def drawn():
        lines = [("hellaswag" if "hellaswag" in ax.get_ylabel().lower() else "loss", y, style, label)
                 for ax, y, style, label in calls]
        calls.clear()
        return lines

    return drawn


def test_the_picture_marks_gpt2_and_the_next_mark_gpt3_small(tmp_path, horizontal_lines):
    """Dashed lines where OpenAI's models stand: on the HellaSwag panel GPT-2 124M (0.2955) and GPT-3
    Small (0.337, the next mark to reach); on the loss panel GPT-2 124M's validation loss on this data,
    where the caller knows it (3.2924 on FineWeb-Edu), and no such line where it does not."""
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(dict(step=s, loss=10 - s / 10, tokens=(s + 1) * 128,
                                           **(dict(val_loss=9.9 - s / 10, hellaswag_acc_norm=0.25 + s / 100)
                                              if s % 10 == 9 else {}))) + "\n" for s in range(30)))
    plot_log(str(log), str(tmp_path / "a.png"), gpt2_val_loss=3.2924)
    dashed = {(panel, y): label for panel, y, style, label in horizontal_lines() if style == "--"}
    assert set(dashed) == {("loss", 3.2924), ("hellaswag", 0.2955), ("hellaswag", 0.337)}
    assert "GPT-2" in dashed[("loss", 3.2924)] and "GPT-2" in dashed[("hellaswag", 0.2955)]
    assert "GPT-3" in dashed[("hellaswag", 0.337)]
    assert is_png(tmp_path / "a.png")
    plot_log(str(log), str(tmp_path / "b.png"))  # the loss of GPT-2 on this data is not known
    assert {(panel, y) for panel, y, style, _ in horizontal_lines() if style == "--"} == \
        {("hellaswag", 0.2955), ("hellaswag", 0.337)}


def test_plot_log_without_evaluations_and_with_a_half_written_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(dict(step=s, loss=10 - s / 10, lr=3e-4, norm=1.0, ms=10.0, tok_per_s=1e4,
                                           tokens=(s + 1) * 128)) + "\n" for s in range(30))
                   + '{"step": 30, "loss": 7.')  # a run still going, killed mid-record
    plot_log(str(log), str(tmp_path / "p.png"))
    assert panels(tmp_path / "p.png") == 1  # no HellaSwag results: the losses alone
    old = tmp_path / "old.jsonl"  # a log from before the "tokens" field
    old.write_text("".join(json.dumps(dict(step=s, loss=5.0)) + "\n" for s in range(3)))
    plot_log(str(old), str(tmp_path / "old.png"))
    assert is_png(tmp_path / "old.png")


def test_importing_hellaswag_does_nothing_visible():
    import subprocess

    from conftest import REPO

    r = subprocess.run([sys.executable, "-c", "import hellaswag"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
