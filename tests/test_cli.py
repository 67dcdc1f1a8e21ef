"""The script as users run it: a subprocess, flags, output, and one clear line for every bad input."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import machinery.files
from conftest import REPO, TINY, one_process_and_two, run_in_process, run_script, step_losses
from machinery.files import folder_problem

SMALL = [*TINY, "--B", "2", "--T", "16", "--num_samples", "2", "--max_new_tokens", "8"]


def test_train_end_to_end(tmp_path, text_file):
    r = run_script(*SMALL, "--input_file", text_file, "--max_steps", "5", "--out_dir", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert list(step_losses(r.stdout)) == [0, 1, 2, 3, 4]  # one line per step
    step_lines = [l for l in r.stdout.splitlines() if l.startswith("step") and "| loss" in l]
    assert len(step_lines) == 5
    for line in step_lines:  # "... | 12.3 ms | 2602 tok/s | ...": the step's 2 x 16 tokens over its time
        ms, tok_per_s = re.search(r"\| ([\d.]+) ms \| (\d+) tok/s \|", line).groups()
        assert float(tok_per_s) == pytest.approx(2 * 16 / (float(ms) / 1000), rel=0.02, abs=1)
    # the untrained model is evaluated before step 0 trains, the trained one after the last step
    lines = r.stdout.splitlines()
    val_lines = [l for l in lines if l.startswith("step") and "| val loss" in l]
    assert [l.split("|")[0] for l in val_lines] == ["step     0 ", "step     5 "]
    assert lines.index(val_lines[0]) < lines.index(step_lines[0])
    assert lines.index(val_lines[1]) > lines.index(step_lines[-1])
    assert "dtype" in lines[0]  # the precision is printed at start
    assert r.stdout.count("> Hello, I'm a language model,") == 2  # --num_samples 2 samples at the end
    assert (tmp_path / "run" / "ckpt.pt").exists()  # everything the run writes goes under out_dir
    # one record per step trained (0..4), and the final evaluation's at step 5
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in log] == [0, 1, 2, 3, 4, 5]


def test_flags_accept_both_spellings_and_help_lists_defaults(tmp_path, text_file):
    r = run_script(*SMALL, f"--input_file={text_file}", "--max_steps=2", "--out_dir=o", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert list(step_losses(r.stdout)) == [0, 1]
    h = run_script("--help", cwd=tmp_path)
    assert h.returncode == 0
    for name in ("max_steps", "B", "T", "lr", "seed", "device", "input_file", "init_from", "n_layer",
                 "n_head", "n_embd", "dtype", "out_dir", "total_batch_size", "min_lr", "warmup_steps",
                 "checkpoint_interval", "resume", "compile", "prompt", "num_samples", "top_k", "temperature"):
        assert f"--{name}" in h.stdout, name
    assert "(default: 50)" in h.stdout and "(default: 0.0003)" in h.stdout


@pytest.mark.parametrize("args,sdpa,compile", [
    ([], True, False), (["--no-sdpa", "--compile"], False, True),
    (["--sdpa", "false", "--compile", "true"], False, True),
    (["--sdpa=No", "--compile=1"], False, True), (["--sdpa", "--compile=off"], True, False),
    (["--sdpa", "0", "--compile", "yes"], False, True),
    (["--sdpa", "off", "--sdpa"], True, False),  # (the last one given wins)
])
def test_a_boolean_is_set_like_any_setting_or_by_its_name_alone(args, sdpa, compile):
    """--name value and --name=value, as every setting (true/false, yes/no, on/off, 1/0); and --name, --no-name."""
    from machinery.command_line import parse_args
    from train_gpt2 import TrainConfig
    cfg, given = parse_args(TrainConfig, args)
    assert (cfg.sdpa, cfg.compile) == (sdpa, compile)
    assert given == {arg.split("=")[0].replace("--no-", "--")[2:] for arg in args if arg.startswith("--")}


BAD_INPUTS = [  # (arguments, what the one line must say)
    (["--input_file", "missing.txt"], "not found"),
    (["--data_dir", "short.txt"], "--data_dir 'short.txt' is a file: a text file is read with --input_file"),
    (["--input_file", "."], "input file '.' is a folder (token shards are read with --data_dir)"),
    (["--input_file", "empty.txt"], "input file 'empty.txt' is empty"),
    (["--input_file", "blank.txt"], "input file 'blank.txt' holds only whitespace"),
    (["--input_file", "binary.bin"], "input file 'binary.bin' is not UTF-8 text (byte 128: invalid start byte)"),
    (["--input_file", "short.txt"], "fewer than"),
    (["--T", "65"], "T=65 exceeds block_size=64"),
    (["--init_from", "gpt5"], "unknown model 'gpt5': use one of gpt2, gpt2-medium, gpt2-large, gpt2-xl, a "
                              "directory written by save_pretrained or a run's ckpt.pt"),
    (["--init_from", "./runs/mine"], "unknown model './runs/mine' (no such folder): use one of gpt2"),
    (["--init_from", "/dev/null"], "unknown model '/dev/null' (not a folder or a file: a device?): use one of gpt2"),
    (["--hellaswag", "missing.jsonl"], "HellaSwag file 'missing.jsonl' not found"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--dtype", "float8"], "invalid choice"),
    (["--max_steps", "many"], "invalid int value"),
    (["--sdpa", "maybe"], "argument --sdpa: invalid true/false value: 'maybe'"),
    (["--learning_rate", "1"], "unrecognized arguments: --learning_rate"),
    (["--B", "0"], "--B must be positive"),
    (["--n_embd", "30", "--n_head", "4"], "multiple of --n_head"),
    # numbers that would train wrongly or fail mid-run (sampling at the end), refused at the start
    (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
    (["--lr", "nan"], "--lr must be a positive number, got nan"),
    (["--grad_clip", "0"], "--grad_clip must be positive (inf: no clipping), got 0.0"),
    (["--grad_clip", "-1"], "--grad_clip must be positive"),
    (["--weight_decay", "-5"], "--weight_decay must be a number >= 0, got -5.0"),
    (["--temperature", "nan"], "--temperature must be a number >= 0, got nan"),
    (["--temperature", "-1"], "--temperature must be a number >= 0"),
    (["--min_lr", "1", "--lr", "1e-4"], "--min_lr 1.0 must be between 0 and --lr 0.0001"),
    # a negative number in any of Python's spellings is a value, not a flag (argparse's own rule: -5 and -.5)
    (["--lr", "-1e-3"], "--lr must be a positive number, got -0.001"),
    (["--temperature", "-inf"], "--temperature must be a number >= 0, got -inf"),
    (["--weight_decay", "-2.5E+1"], "--weight_decay must be a number >= 0, got -25.0"),
    # decoupled weight decay scales a weight by 1 - lr x weight_decay a step: at 1 or more, zero or flipped
    (["--lr", "1e-3", "--weight_decay", "1e3"], "--weight_decay 1000.0 with --lr 0.001 would scale each decayed "
                                                "weight by 1 - 1 a step: lr x weight_decay must be below 1"),
    # 24T float32 weights (2 x 12 x C**2 in the blocks, (50257 + 64) x C in the tables), 87.5 TiB: refused before
    # making them, naming the flags of the largest part
    (["--n_embd", "1000000"], "24,050,349,000,000 parameters, block_size 64, needs 87.5 TiB"),
    (["--n_embd", "1000000"], "(smaller --n_layer or --n_embd)"),
    (["--vocab_size", "100000000000"], "(smaller --vocab_size or --n_embd)"),  # the token table
    (["--block_size", "10000000000", "--T", "16"], "block_size 10000000000, needs"),  # its attention masks
    (["--block_size", "10000000000", "--T", "16"], "(smaller --block_size)"),
    (["--seed", "-1"], "--seed must be between 0 and 2**32 - 1, got -1"),
    (["--out_dir", "short.txt"], "--out_dir 'short.txt' is a file, not a folder"),
    (["--out_dir", ""], "--out_dir is empty: name the folder"),  # (before a model is built, not after)
    (["--export_dir", "short.txt"], "--export_dir 'short.txt' is a file, not a folder"),
    # where the run writes, checked before it trains (not at its first save)
    (["--out_dir", "short.txt/run"], "--out_dir 'short.txt/run' cannot be made: "),
    (["--out_dir", "dangling"], "--out_dir 'dangling' is a link to 'gone', which does not exist"),
    (["--export_dir", "dangling/exported"], "dangling' is a link to 'gone', which does not exist"),  # (on the way)
    (["--out_dir", "loop_a"], "--out_dir 'loop_a' is a link in a loop of links, which leads nowhere"),
    (["--out_dir", "run/" + "x" * 300], "cannot be made: the name xxxxxxxxxxxxxxxxxxxx... is longer than the "),
    (["--out_dir", "holder"], "'holder/ckpt.pt' is a folder: the run's checkpoint is written there"),
    (["--out_dir", "logholder"], "'logholder/log.jsonl' is a folder: the run's log is written there"),
    (["--out_dir", "pictureholder"], "'pictureholder/progress.png' is a folder: the run's picture is written there"),
    (["--wandb_run_name", "first"], "--wandb_run_name names a run in --wandb_project, which is not set"),
    (["--eval_only", "--export_dir", "exported"], "--eval_only writes nothing, so --export_dir would not be written"),
    (["--input_file", "/dev/zero"], "input file '/dev/zero' is not a regular file"),
    (["--export_dir", "mine"], "--export_dir 'mine' holds config.json, not a GPT-2 export's, which the export would "
                               "replace: choose another folder"),
]


def test_the_hellaswag_items_are_read_before_the_model_is_built(tmp_path, text_file, monkeypatch, capsys):
    """A HellaSwag file that is not there (or a download that fails) is said before the model is built: a
    1.5B model takes minutes to load. (After a checkpoint is read, if the run starts from one: its model's
    block_size is what each item must fit.)"""
    code, out, err = run_in_process(*TINY, "--input_file", str(text_file), "--hellaswag", "missing.jsonl",
                                    cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err == "error: HellaSwag file 'missing.jsonl' not found\n"
    assert out.startswith("device cpu") and not any(line.startswith(("model", "memory")) for line in out.splitlines())


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_one_clear_line(tmp_path, text_file, args, message, monkeypatch, capsys):
    """In-process: an exception that escaped main (a traceback, from the command line) fails the test."""
    shutil.copy(text_file, tmp_path / "input.txt")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n\n \t\n")
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "short.txt").write_text("Too short.")
    os.symlink("gone", tmp_path / "dangling")
    os.symlink("loop_b", tmp_path / "loop_a")
    os.symlink("loop_a", tmp_path / "loop_b")
    (tmp_path / "holder" / "ckpt.pt").mkdir(parents=True)
    (tmp_path / "logholder" / "log.jsonl").mkdir(parents=True)
    (tmp_path / "pictureholder" / "progress.png").mkdir(parents=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text('{"my": "settings"}')
    code, out, err = run_in_process(*SMALL, "--max_steps", "1", *args, cwd=tmp_path, monkeypatch=monkeypatch,
                                    capsys=capsys)
    assert code != 0
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert message in lines[0]
    assert not (tmp_path / "out").exists()  # a failed start writes nothing
    assert (tmp_path / "short.txt").read_text() == "Too short."  # (nor touches a file named as a folder)
    assert (tmp_path / "mine" / "config.json").read_text() == '{"my": "settings"}'  # (nor a folder's files)


def test_sampling_alone_reads_no_sequence_of_T_tokens(tmp_path, monkeypatch, capsys):
    """--T bounds what training and evaluation read, which the position table must hold (T=65 with
    block_size 64: one line, above); sampling alone reads none, so the default --T is no obstacle there."""
    code, out, err = run_in_process(*SMALL, "--T", "65", "--max_steps", "0", "--num_samples", "1",
                                    "--max_new_tokens", "2", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and out.splitlines()[-1].startswith("> Hello"), err


def test_the_default_input_file_is_found_from_any_folder(tmp_path, monkeypatch, capsys):
    """`python path/to/train_gpt2.py` in a folder without input.txt trains on the input.txt beside the script
    (the data line names it), as DataLoaderLite's default does; a folder's own input.txt comes first, and a
    file typed (--input_file input.txt too) is only ever the one typed."""
    from train_gpt2 import DataLoaderLite

    code, out, err = run_in_process(*SMALL, "--max_steps", "1", "--num_samples", "0", cwd=tmp_path,
                                    monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and f"data {REPO / 'input.txt'} | " in out, err
    monkeypatch.chdir(tmp_path)
    assert DataLoaderLite(4, 32).n_tokens == DataLoaderLite(4, 32, input_file=str(REPO / "input.txt")).n_tokens
    (tmp_path / "input.txt").write_text("Only this folder's own words, again and again. " * 40)
    code, out, err = run_in_process(*SMALL, "--max_steps", "1", "--num_samples", "0", cwd=tmp_path,
                                    monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "data input.txt | " in out, err
    (tmp_path / "input.txt").unlink()
    for typed in ("other.txt", "input.txt"):
        code, _, err = run_in_process(*SMALL, "--input_file", typed, "--max_steps", "1", cwd=tmp_path,
                                      monkeypatch=monkeypatch, capsys=capsys)
        assert code == 1 and err == f"error: input file {typed!r} not found\n"


def test_an_out_dir_that_cannot_be_written_is_named_before_the_run(tmp_path, monkeypatch):
    """No permission to write in the folder (or in the one it would be made in): said at the start, not at
    the first save after hours of training. (Tests run as root, who may write anywhere: os.access is
    made to say no.)"""
    monkeypatch.setattr(machinery.files.os, "access", lambda path, mode: False)
    assert folder_problem(str(tmp_path)) == f"cannot be written: no permission to write in {str(tmp_path)!r}"
    assert folder_problem(str(tmp_path / "a" / "b")) == \
        f"cannot be written: no permission to write in {str(tmp_path)!r}"
    monkeypatch.undo()
    assert folder_problem(str(tmp_path / "a" / "b")) is None  # (made when the run saves)


def test_unknown_device_cuda_without_cuda(tmp_path, text_file):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    r = run_script(*SMALL, "--input_file", text_file, "--device", "cuda", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip() == "error: device 'cuda' requested but CUDA is not available"


def test_sample_only_from_a_local_gpt2_directory(tmp_path, hf_gpt2_dir):
    """--max_steps 0 with --init_from DIR prints samples and trains nothing (the offline GPT-2 path).
    The samples come from DIR's weights: greedy (--temperature 0, float32), each is the text
    transformers' greedy generate gives for the same prompt, token for token."""
    from machinery.tokens import get_tokenizer

    path, hf = hf_gpt2_dir(2, 2, 32, 64)
    prompt = "Hello, I'm a language model,"
    r = run_script("--init_from", path, "--max_steps", "0", "--num_samples", "3", "--max_new_tokens", "5",
                   "--temperature", "0", "--dtype", "float32", "--prompt", prompt, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    enc = get_tokenizer()
    ids = torch.tensor([enc.encode_ordinary(prompt)])
    greedy = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                         do_sample=False, pad_token_id=0)
    expected = f"> {enc.decode(greedy[0].tolist())}\n"
    assert r.stdout.count("> ") == 3 and r.stdout.count(expected) == 3, f"expected 3 x {expected!r}"
    assert "step" not in r.stdout and not (tmp_path / "out").exists()


def test_an_input_file_too_big_to_tokenize_in_ram_points_to_prepare(tmp_path, text_file, monkeypatch, capsys):
    """A text whose tokenizing at once (~12 bytes of RAM a byte of text) would not fit in the machine's
    RAM: one line naming prepare.py, which reads it a piece at a time; nothing made. (The RAM is set to
    just under what this text needs.)"""
    import machinery.tokens

    size = os.path.getsize(text_file)
    monkeypatch.setattr(machinery.tokens, "ram_bytes", lambda: machinery.tokens.TOKENIZE_BYTES_PER_BYTE * size - 1)
    code, _, err = run_in_process(*SMALL, "--input_file", text_file, "--max_steps", "1", cwd=tmp_path,
                                  monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: input file {str(text_file)!r} (") and "of RAM to tokenize at once" in err
    assert err.endswith(f"python prepare.py {text_file} --out_dir DIR  and train with --data_dir DIR\n")
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(machinery.tokens, "ram_bytes", lambda: machinery.tokens.TOKENIZE_BYTES_PER_BYTE * size)
    machinery.tokens._tokenize_file.cache_clear()
    assert len(machinery.tokens.tokenize_file(text_file)) > 0  # enough RAM: tokenized
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this machine, each tokenizing it: not enough
    with pytest.raises(ValueError, match="of RAM to tokenize at once"):
        machinery.tokens.tokenize_file(text_file)


def test_rank_set_without_torchruns_other_variables_is_one_line(tmp_path, text_file, monkeypatch, capsys):
    """RANK in the environment (a scheduler's, say) but not LOCAL_RANK and WORLD_SIZE beside it, as torchrun
    sets them: one line, not a KeyError."""
    monkeypatch.setenv("RANK", "0")
    for name in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    code, _, err = run_in_process(*SMALL, "--input_file", text_file, "--max_steps", "1", cwd=tmp_path,
                                  monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err == ("error: RANK is set, but not with LOCAL_RANK and WORLD_SIZE as torchrun sets them: "
                                 "start the run with torchrun, or unset RANK for one process\n")
    # numbers that cannot come from torchrun: rank 5 of 2 would wait forever for a group it is not in
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    code, _, err = run_in_process(*SMALL, "--input_file", text_file, "--max_steps", "1", cwd=tmp_path,
                                  monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err == ("error: RANK 5, LOCAL_RANK 0 and WORLD_SIZE 2 do not fit together (0 <= LOCAL_RANK "
                                 "<= RANK < WORLD_SIZE): start the run with torchrun\n")
    # LOCAL_WORLD_SIZE (read where the processes of a machine share its RAM): a count, not a ValueError of int()
    monkeypatch.setenv("RANK", "1")
    for processes_here in ("two", "1", "3"):  # not a number; too few for LOCAL_RANK 1; more than the group
        monkeypatch.setenv("LOCAL_RANK", "1")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", processes_here)
        code, _, err = run_in_process(*SMALL, "--input_file", text_file, "--max_steps", "1", cwd=tmp_path,
                                      monkeypatch=monkeypatch, capsys=capsys)
        assert code == 1 and err == (f"error: LOCAL_WORLD_SIZE '{processes_here}' is not a process count beside "
                                     "LOCAL_RANK 1 and WORLD_SIZE 2 (LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE): "
                                     "start the run with torchrun\n")


def test_torchrun_on_a_macs_gpu_is_one_line(monkeypatch):
    """torchrun's processes on a Mac pick its one GPU (mps) each, and the group's gloo backend carries no MPS
    tensor: the first all-reduce failed with a traceback. One line instead, before the group is joined. (No
    Mac here: torchrun_ranks is asked with the device type a Mac's --device auto gives.)"""
    from machinery.hardware import torchrun_ranks

    for name, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    assert torchrun_ranks("cpu") == (1, 1, 2)
    with pytest.raises(ValueError, match=r"^torchrun runs one process per GPU, and a Mac's GPU \(mps\) is one: run "
                                         r"python train_gpt2.py, or several processes on its CPU with --device cpu$"):
        torchrun_ranks("mps")


def test_samples_are_made_b_rows_at_a_time(tmp_path, monkeypatch, capsys):
    """--num_samples 5 at --B 2: three calls of generate, of 2, 2 and 1 rows (never more rows than a
    training micro-batch: a big --num_samples takes longer, not more memory), and five samples."""
    import train_gpt2

    rows, generate = [], train_gpt2.GPT.generate
    monkeypatch.setattr(train_gpt2.GPT, "generate", lambda self, idx, *a, **k: rows.append(len(idx)) or
                        generate(self, idx, *a, **k))
    code, out, err = run_in_process(*TINY, "--B", "2", "--max_steps", "0", "--num_samples", "5", "--max_new_tokens",
                                    "3", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert rows == [2, 2, 1] and out.count("\n> ") == 5, out


def test_an_empty_prompt_starts_a_document_and_prints_only_the_new_tokens(tmp_path, monkeypatch, capsys):
    """--prompt "": the model continues the end-of-text token, as at the start of a document; that token is
    not printed (it used to begin every sample as the text <|endoftext|>)."""
    import train_gpt2
    from machinery.tokens import get_tokenizer

    made, generate = [], train_gpt2.GPT.generate

    def recording(self, idx, *args, **kwargs):
        out = generate(self, idx, *args, **kwargs)
        made.append((idx.tolist(), out.tolist()))
        return out

    monkeypatch.setattr(train_gpt2.GPT, "generate", recording)
    code, out, err = run_in_process(*TINY, "--B", "2", "--max_steps", "0", "--num_samples", "2", "--max_new_tokens",
                                    "5", "--prompt", "", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    enc = get_tokenizer()
    (prompts, rows), = made
    assert prompts == [[enc.eot_token]] * 2 and all(len(row) == 6 for row in rows)
    assert all(f"> {enc.decode(row[1:])}\n" in out for row in rows) and "> <|endoftext|>" not in out, out


def test_sampling_outside_the_main_thread_leaves_the_signals_alone(tmp_path, monkeypatch, capsys):
    """Only the main thread may set signal handlers: main() called from another thread (a notebook's worker,
    a server) samples without touching them, where setting SIGTERM's would stop it with an error."""
    import threading

    from train_gpt2 import main

    monkeypatch.chdir(tmp_path)
    codes = []
    thread = threading.Thread(target=lambda: codes.append(main([*TINY, "--max_steps", "0", "--num_samples", "1",
                                                                "--max_new_tokens", "3"])))
    thread.start()
    thread.join(timeout=300)
    assert codes == [0], capsys.readouterr().err


def test_gpt2_by_name_offline_is_one_clear_line(tmp_path):
    r = run_script("--init_from", "gpt2", "--max_steps", "0", cwd=tmp_path, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: could not load GPT-2 weights from 'gpt2'")
    assert len(r.stderr.strip().splitlines()) == 1


def test_importing_does_nothing_visible(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import train_gpt2"], cwd=REPO, capture_output=True,
                       text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    modules = subprocess.run([sys.executable, "-c", "import sys, train_gpt2; print(sorted(sys.modules))"],
                             cwd=REPO, capture_output=True, text=True).stdout
    for heavy in ("'transformers'", "'matplotlib'", "'datasets'", "'hellaswag'"):
        assert heavy not in modules  # heavy or optional: imported only when a run needs it


def test_the_names_the_docs_import_from_train_gpt2_stay_importable():
    """The README and docs once showed these imported from train_gpt2 (issue 14 promised they stay)."""
    import machinery.run_log
    import machinery.tokens
    import train_gpt2

    for name in ("GPT", "GPTConfig", "DataLoaderLite", "get_tokenizer", "get_lr", "plot_log", "TrainConfig", "main"):
        assert hasattr(train_gpt2, name), name
    assert train_gpt2.get_tokenizer is machinery.tokens.get_tokenizer
    assert train_gpt2.plot_log is machinery.run_log.plot_log


def test_ddp_two_processes_match_one(tmp_path, text_file):
    """torchrun with 2 CPU processes (gloo) follows the single-process loss trajectory with the same
    total batch: 2 ranks x B=1 x 2 accumulation steps = 1 process x B=2 x 2 (float32, 1e-5)."""
    common = [*TINY, "--input_file", text_file, "--T", "16", "--total_batch_size", "64", "--dtype", "float32",
              "--max_steps", "4", "--eval_interval", "2", "--num_samples", "1", "--max_new_tokens", "2"]
    ddp_stdout, a, b = one_process_and_two(tmp_path, *common)
    assert "processes 2" in ddp_stdout
    assert ddp_stdout.count("| loss") == 4  # only rank 0 prints
    # steps 0-3 trained, and the final evaluation at step 4; validation at steps 0, 2 and 4 in both
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in a if "val_loss" in r] == [r["step"] for r in b if "val_loss" in r] == [0, 2, 4]
    for r, s in zip(a, b):
        assert abs(r.get("loss", 0) - s.get("loss", 0)) <= 1e-5
        assert abs(r.get("val_loss", 0) - s.get("val_loss", 0)) <= 1e-5


def test_a_fault_only_one_torchrun_process_meets_is_one_line_from_each(tmp_path, text_file):
    """Under torchrun, HellaSwag is downloaded by rank 0 alone (here offline: its one line), while rank 1
    waits for it in a collective that then fails: rank 1 says so in one line too, not in gloo's traceback.
    (What torchrun itself prints after a process fails is the launcher's.)"""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = run_script(*TINY, "--input_file", text_file, "--B", "1", "--T", "16", "--max_steps", "2", "--num_samples",
                   "0", "--hellaswag", "auto", cwd=tmp_path, runner=torchrun, env_extra={"OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 2 and "error: process 1 stopped: another process of the run stopped first (its line says " \
        "why; none if it was killed outright: by the OOM killer, say)" in ours, r.stderr
    assert any(line.startswith("error: downloading HellaSwag (Rowan/hellaswag) failed") for line in ours), r.stderr
    assert "[rank1]" not in r.stderr and "Connection closed by peer" not in r.stderr, r.stderr


def test_an_error_every_process_meets_alike_is_said_by_the_first_process_of_a_machine(monkeypatch, capsys):
    """console.say_error under torchrun: on a process other than local rank 0, a SettingError, a diverged
    loss or a damaged shard (every process opens it at the same step) waits (for torchrun to stop it, once
    rank 0 has said it and failed) before it is said; any other error is said at once, as it may be this
    process's alone. Local rank 0 says every error at once."""
    from machinery.console import say_error
    from machinery.files import SAY_ONCE_WAIT_S, SettingError
    from machinery.stopping import TrainingDiverged
    from machinery.tokens import DamagedShard

    waits = []
    monkeypatch.setattr(machinery.files.time, "sleep", waits.append)
    monkeypatch.setenv("RANK", "1")  # (torchrun's: without it, as in prepare.py run by hand, nothing waits)
    for local_rank in ("1", "0"):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        for error, alike in ((SettingError("a"), True), (TrainingDiverged("b"), True), (DamagedShard("e"), True),
                             (ValueError("c"), False), (OSError("d"), False)):
            waits.clear()
            say_error(error)
            assert waits == ([SAY_ONCE_WAIT_S] if alike and local_rank != "0" else []), (local_rank, error)
            assert capsys.readouterr().err == f"error: {error}\n"
    monkeypatch.delenv("RANK")  # a LOCAL_RANK left by something else: no torchrun to stop this process
    monkeypatch.setenv("LOCAL_RANK", "1")
    waits.clear()
    say_error(SettingError("e"))
    assert waits == [] and capsys.readouterr().err == "error: e\n"


@pytest.mark.parametrize("args,line", [
    (["--max_step", "5"], "error: unrecognized arguments: --max_step 5; did you mean --max_steps? (see --help)"),
    (["--B", "0"], "error: --B must be positive, got 0"),
    (["--resume"], "error: 'out/ckpt.pt' is not a checkpoint (not a file torch.save writes)"),
    (["--device", "foo"], "error: unknown device 'foo': use auto, cpu, cuda, cuda:N or mps"),
    (["--input_file", "empty.txt"], "empty.txt' is empty"),
    (["--B", "2", "--T", "16", "--total_batch_size", "100"], "error: --total_batch_size 100 is not a multiple of "
                                                             "B*T*processes = 2*16*2 = 64"),
], ids=["misspelled_flag", "bad_value", "corrupt_checkpoint", "unknown_device", "empty_data", "batch_arithmetic"])
def test_a_bad_setting_under_torchrun_is_one_line_not_one_from_each_process(tmp_path, text_file, args, line):
    """Every process of a torchrun run parses the same command line and reads the same files, so a
    misspelled flag, a bad value, a damaged checkpoint or unusable data stops them all alike: the first
    process says so once, and the others wait to be stopped with it (files.say_once) rather than each
    print the same line."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ckpt.pt").write_text("not a checkpoint")
    (tmp_path / "empty.txt").write_text("")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = run_script(*TINY, "--input_file", text_file, *args, cwd=tmp_path, runner=torchrun,
                   env_extra={"OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    ours = [said for said in r.stderr.splitlines() if said.startswith("error: ")]
    assert len(ours) == 1 and line in ours[0], r.stderr
    assert 'train_gpt2.py", line' not in r.stderr and "machinery" not in r.stderr  # (torchrun's own traceback: its)


def test_readme_documents_every_option():
    from dataclasses import fields

    from train_gpt2 import TrainConfig

    readme = (REPO / "README.md").read_text()
    table = [line for line in readme.splitlines() if line.startswith("| `")]
    for f in fields(TrainConfig):
        assert any(f"`{f.name}`" in line.split("|")[1] for line in table), f.name
    # and its default as TrainConfig has it (the table's words: off, on, empty, None; numbers as written)
    words = {"off": False, "on": True, "empty": "", "None": None}
    defaults = TrainConfig()
    for line in table:
        names, said = [n.strip(" `") for n in line.split("|")[1].split(",")], line.split("|")[2].strip()
        values = [v.strip(" `") for v in (said.split(", ") if len(names) > 1 else [said])]
        for name, value in zip(names, values):
            if name in {f.name for f in fields(TrainConfig)}:
                default = getattr(defaults, name)
                value = words.get(value, value)
                assert value == default or (isinstance(default, (int, float)) and not isinstance(default, bool)
                                            and float(value) == default), (name, value, default)


def test_more_torchrun_processes_than_gpus_is_one_line(tmp_path):
    """torchrun --nproc_per_node=2 on a one-GPU node (faked: a sitecustomize makes torch report CUDA
    with one device): every rank meets the line naming both counts, rank 0 says it once, none hangs
    waiting for the others, and no rank prints a traceback (torchrun's own failure report is its
    business). test_training checks in-process that rank 0, whose GPU exists, stops with the same line."""
    fake = tmp_path / "fake_one_gpu"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(
        "import torch\ntorch.cuda.is_available = lambda: True\ntorch.cuda.device_count = lambda: 1\n")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = run_script(*TINY, "--device", "cuda", cwd=tmp_path, runner=torchrun, timeout=300,
                   env_extra={"PYTHONPATH": str(fake), "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    line = ("error: torchrun started 2 processes on a node with 1 GPU(s): one process per GPU, "
            "so pass --nproc_per_node=1 (or --device cpu)")
    assert r.stderr.count(line) == 1, r.stderr
    assert 'train_gpt2.py", line' not in r.stderr  # no traceback through our code


def test_eval_only_under_torchrun_splits_the_evaluation_across_ranks(tmp_path, text_file, items_file):
    """A run's checkpoint evaluated by torchrun's two CPU processes with B=1 (each rank its half of every
    validation batch, and its share of the HellaSwag items, the results gathered) gives what the run
    itself, one process with B=2, gave in its final evaluation: the val loss to float32 rounding (1e-5; it is
    printed to 4 decimals), the HellaSwag accuracy exactly. Rank 0 alone prints; nothing is written."""
    import hashlib

    from train_gpt2 import main

    common = [*TINY, "--input_file", str(text_file), "--T", "16", "--dtype", "float32", "--eval_iters", "3",
              "--hellaswag", str(items_file), "--num_samples", "0", "--out_dir", str(tmp_path / "run")]
    assert main([*common, "--B", "2", "--max_steps", "2"]) == 0
    last = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and "loss" not in last  # the final evaluation, of the model saved after 2 steps
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "run").iterdir()}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = run_script(*common, "--B", "1", "--max_steps", "2", "--resume", "--eval_only", cwd=tmp_path, runner=torchrun,
                   env_extra={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "processes 2" in r.stdout
    val = [l for l in r.stdout.splitlines() if l.startswith("step     2 | val loss ")]
    assert len(val) == 1 and abs(float(val[0].split()[-1]) - last["val_loss"]) <= 0.5e-4 + 1e-5, (val, last)
    assert r.stdout.splitlines().count(f"step     2 | hellaswag acc_norm {last['hellaswag_acc_norm']:.4f}") == 1
    assert "| loss" not in r.stdout
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "run").iterdir()} == files
