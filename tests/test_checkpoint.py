"""Training state that survives: atomic checkpoints, exact resume, safe loading, export."""

import errno
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile

import pytest
import torch

import machinery.checkpoints
import machinery.command_line
import machinery.console
import machinery.files
import machinery.run_log
import machinery.stopping
import train_gpt2
from conftest import (CPU_ALLOCATOR_FAILED, REPO, SCRIPT_ENV, TINY, Launched, run_in_process, run_script,
                      shakespeare_sample, step_losses)
from machinery.checkpoints import load_checkpoint, save_checkpoint
from machinery.stopping import say_stopping
from train_gpt2 import main

# warmup + cosine decay, periodic validation and sampling: every piece of state a resume must restore.
# float32: runs in separate processes are compared to the last digit, and on a CPU with AMX one
# process's bfloat16 step 0 once differed from another's in the 7th digit (the kernel oneDNN picks is
# a per-process decision); what is tested here is the resume, not that.
# TRAINING is RUN without the model's shape (TINY's flags): a resume takes the shape from the checkpoint.
TRAINING = ["--dtype", "float32", "--B", "2", "--T", "16", "--lr", "3e-3", "--warmup_steps", "4", "--min_lr", "3e-4",
            "--eval_interval", "5", "--sample_interval", "7", "--num_samples", "1", "--max_new_tokens", "4"]
RUN = [*TINY, *TRAINING]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_log(out_dir):
    return [json.loads(l) for l in (out_dir / "log.jsonl").read_text().splitlines()]


def finished_run(tmp_path_factory, name, max_steps):
    """A run of RUN for max_steps on the same text as the text_file fixture: (its stdout, its out_dir)."""
    tmp_path = tmp_path_factory.mktemp(name)
    r = run_script(*RUN, "--input_file", shakespeare_sample(tmp_path), "--max_steps", max_steps, "--out_dir", "run",
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return r.stdout, tmp_path / "run"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: 30 steps in one go (run once, shared)."""
    stdout, out_dir = finished_run(tmp_path_factory, "uninterrupted", 30)
    return stdout, read_log(out_dir)


def start(tmp_path, *args):
    return Launched([sys.executable, str(REPO / "train_gpt2.py"), *map(str, args)], tmp_path)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_interrupt_saves_and_resume_continues_exactly(tmp_path, text_file, uninterrupted, signum):
    ref_stdout, ref_log = uninterrupted
    args = (*RUN, "--input_file", text_file, "--max_steps", "30", "--out_dir", "run")
    with start(tmp_path, *args) as run:
        first = run.wait_for("step     8 | loss", deadline_s=120)  # (past step 7's sample: its stream has moved)
        run.send_signal(signum)  # Ctrl-C, or a scheduler's SIGTERM: finish the step, save, exit
        code, rest, err = run.finish(deadline_s=120)
    assert code == 130, err
    assert "Traceback" not in err
    # the signal is answered at once, before the step ends (an evaluation in it may take minutes)
    assert f"{signal.Signals(signum).name}: stopping after this step, with a checkpoint" in err
    # the step running when the signal came (9 or later) is finished: its model is the one saved
    stopped_at = load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["steps_done"]
    assert 9 < stopped_at < 30
    assert f"interrupted: saved step {stopped_at} to {os.path.join('run', 'ckpt.pt')}; continue with --resume" in rest

    resumed = run_script(*args, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "note: resumed with" not in resumed.stdout  # the run's own settings
    before = step_losses("".join(first) + rest)
    after = step_losses(resumed.stdout)
    assert min(after) == stopped_at  # the first step not done before is the first step done now
    combined = {**{s: l for s, l in before.items() if s < stopped_at}, **after}
    assert combined == step_losses(ref_stdout)  # the same losses, step for step, to the last digit
    # measured clocks and memory differ between runs; everything else is equal
    timing = ("ms", "tok_per_s", "tflops", "peak_memory_bytes")
    # (the last record, the final evaluation at step 30, trained nothing and has no clocks)
    assert [r["step"] for r in ref_log] == list(range(31)) and "loss" not in ref_log[-1]
    assert read_log(tmp_path / "run") == [{**r, **{k: s[k] for k in timing if k in s}}
                                          for r, s in zip(ref_log, read_log(tmp_path / "run"))]
    # and the samples printed after the stop, every sample_interval and at the end, are the same text: the
    # sampling stream went on from where it was (step 7's sample had drawn from it before the stop)
    samples_after = [l for l in resumed.stdout.splitlines() if l.startswith("> ")]
    assert len(samples_after) >= 2 and samples_after == \
        [l for l in ref_stdout.splitlines() if l.startswith("> ")][-len(samples_after):]


SECOND_SIGTERM = """import os, signal, sys, time
sys.path.insert(0, {repo!r})
from machinery.stopping import StopRequested, sigterm_stops_at_once
with sigterm_stops_at_once(), StopRequested() as stop:  # as main() and training_loop() nest them
    os.kill(os.getpid(), signal.SIGTERM)  # the first: asks to stop after the step
    time.sleep(0.1)
    print("asked" if stop.requested else "not asked", flush=True)
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # the second: at once
        time.sleep(5)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
print("default again" if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL else "not restored")
"""


def test_a_second_sigterm_stops_at_once_as_a_second_ctrl_c_does(tmp_path):
    """In the training loop the first SIGTERM (a scheduler's) asks to stop after the step; a second one
    interrupts at once, as a second Ctrl-C does, so main says so in one line (it used to end the process
    without a word). The signal handlers are back as they were after the loop."""
    r = subprocess.run([sys.executable, "-c", SECOND_SIGTERM.format(repo=str(REPO))], capture_output=True, text=True,
                       timeout=300)
    assert (r.returncode, r.stdout) == (0, "asked\ninterrupted\ndefault again\n"), r
    assert r.stderr.count("SIGTERM: stopping after this step") == 1  # the first is answered; the second stops


SECOND_SIGNAL = """import os, signal, sys, time
sys.path.insert(0, {repo!r})
from machinery.stopping import StopRequested, sigterm_stops_at_once
with sigterm_stops_at_once(), StopRequested() as stop:
    os.kill(os.getpid(), signal.{first})
    time.sleep(0.1)
    try:
        os.kill(os.getpid(), signal.{second})
        time.sleep(0.5)
        print("went on" if stop.requested else "not asked", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""


@pytest.mark.parametrize("first,second,torchrun,then", [
    ("SIGTERM", "SIGTERM", True, "went on"),  # Slurm signals every process, and torchrun passes its own on
    ("SIGTERM", "SIGTERM", False, "interrupted"),
    ("SIGINT", "SIGTERM", True, "interrupted"),  # Ctrl-C at torchrun (passed on as SIGINT), then a second one
    ("SIGTERM", "SIGINT", True, "interrupted"),
])
def test_under_torchrun_a_sigterm_after_a_sigterm_is_the_same_request(tmp_path, first, second, torchrun, then):
    """A scheduler (Slurm's --signal, scancel) signals every process of a job: torchrun, which passes its
    SIGTERM on, and each of its workers, which so get the one request twice. Taken as a second, it stopped
    every process at once without the checkpoint the stop was for. Under torchrun (RANK set) a SIGTERM after
    a SIGTERM is the same request; any other second signal, and every second signal without torchrun,
    still stops at once."""
    env = {**os.environ, "RANK": "0"} if torchrun else {k: v for k, v in os.environ.items() if k != "RANK"}
    r = subprocess.run([sys.executable, "-c", SECOND_SIGNAL.format(repo=str(REPO), first=first, second=second)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert (r.returncode, r.stdout) == (0, then + "\n"), r
    assert r.stderr.count("stopping after this step") == 1, r.stderr  # (the first is answered, once)


SIGTERM_MID_SAVE = """import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
import machinery.checkpoints as checkpoints
from machinery.files import write_atomically
from machinery.stopping import StopRequested, sigterm_stops_at_once


class SignalOnThirdWrite:  # the file torch.save writes into: the second SIGTERM comes as it writes
    def __init__(self, f):
        self.f, self.writes = f, 0

    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def write_with_a_signal(path, write):
    return write_atomically(path, lambda f: write(SignalOnThirdWrite(f)))


checkpoints.write_atomically = write_with_a_signal
with sigterm_stops_at_once(), StopRequested() as stop:
    os.kill(os.getpid(), signal.SIGTERM)  # the first: stop after the step (and save)
    try:
        checkpoints.save_checkpoint({{"model": {{"w": torch.ones(256, 256)}}}}, "ckpt.pt")
    except KeyboardInterrupt:
        print("stopped at once, the checkpoint whole:", torch.load("ckpt.pt")["model"]["w"].sum().item())
"""


def test_a_second_signal_while_the_checkpoint_is_written_stops_once_the_file_is_whole(tmp_path):
    """A second SIGTERM (or Ctrl-C) that comes while torch.save writes the stop's checkpoint: raised inside
    torch.save, its KeyboardInterrupt became a RuntimeError about the file's position with a 40-line
    traceback. Held until the file is written, it stops the run at once with the whole checkpoint kept."""
    r = subprocess.run([sys.executable, "-c", SIGTERM_MID_SAVE.format(repo=str(REPO))], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert (r.returncode, r.stdout) == (0, "stopped at once, the checkpoint whole: 65536.0\n"), r
    assert "Traceback" not in r.stderr and sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_a_sigterm_before_the_loop_stops_at_once_in_one_line(tmp_path, text_file):
    """A scheduler's SIGTERM while the model is still being built (GPT-2 350M's shape: seconds on a CPU,
    from the `device` line on) stops the run at once with the line a Ctrl-C there gives and exit code 130;
    without a handler the OS would end it without a word (exit code -15)."""
    args = ("--device", "cpu", "--n_layer", "24", "--n_head", "16", "--n_embd", "1024", "--input_file", text_file,
            "--B", "1", "--T", "8", "--max_steps", "1", "--num_samples", "0", "--out_dir", "run")
    with start(tmp_path, *args) as run:
        run.wait_for("device cpu", deadline_s=120)
        run.send_signal(signal.SIGTERM)
        code, rest, err = run.finish(deadline_s=120)
    assert code == 130, (rest, err)
    assert "interrupted: stopped at once, saving and exporting nothing more" in err and "Traceback" not in err
    assert "step     0" not in rest and not (tmp_path / "run" / "ckpt.pt").exists()  # (it never reached the loop)


def test_a_hangup_stops_after_the_step_with_a_checkpoint(tmp_path, text_file):
    """SIGHUP (the terminal closed, the ssh connection lost) stops a run as SIGTERM does: the step finished,
    saved, exit code 130; the OS's default would end it without a word and without its steps."""
    args = (*RUN, "--input_file", text_file, "--max_steps", "300", "--out_dir", "run")
    with start(tmp_path, *args) as run:
        run.wait_for("step     3 | loss", deadline_s=120)
        run.send_signal(signal.SIGHUP)
        code, rest, err = run.finish(deadline_s=120)
    assert code == 130, err
    assert "SIGHUP: stopping after this step, with a checkpoint" in err and "Traceback" not in err
    assert 4 < load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["steps_done"] < 300


def test_an_ignored_hangup_stays_ignored():
    """Under nohup, SIGHUP is ignored before the run starts: the run leaves it so (the user asked it to outlive
    the terminal), while Ctrl-C and SIGTERM still stop it after the step, and saving holds them."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with machinery.stopping.StopRequested() as stop, machinery.stopping.SignalsHeld():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # (not ignored: caught in the loop)
        with machinery.stopping.StopRequested() as stop:
            assert signal.getsignal(signal.SIGHUP) == stop._handle
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL  # (and put back)
    finally:
        signal.signal(signal.SIGHUP, previous)


TRAIN_WITHOUT_STDOUT = [*TINY, "--B", "2", "--T", "16", "--max_steps", "3", "--num_samples", "1",
                        "--max_new_tokens", "4", "--out_dir", "run"]


def test_a_run_whose_stdout_is_gone_goes_on_and_saves(tmp_path, text_file):
    """stdout's reader gone (a `| tee` stopped along with the run, a `| head`): every print would fail with a
    broken pipe. The run says so once on stderr and goes on: it trains, saves its checkpoint and log, exit 0."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # no reader: each write to stdout fails (EPIPE)
    try:
        r = subprocess.run([sys.executable, str(REPO / "train_gpt2.py"), *TRAIN_WITHOUT_STDOUT, "--input_file",
                            str(text_file)], cwd=tmp_path, stdout=write_end, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, **SCRIPT_ENV}, timeout=300)
    finally:
        os.close(write_end)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("cannot write to stdout") == 1 and "Traceback" not in r.stderr
    assert "cannot write to stdout (Broken pipe): its lines are dropped from here on; this one was: device cpu" \
        in r.stderr
    assert load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["steps_done"] == 3
    assert [record["step"] for record in read_log(tmp_path / "run")] == [0, 1, 2, 3]


def test_print_line_points_a_stream_gone_at_devnull(capsys):
    """print_line's fallback: the broken stream's descriptor becomes os.devnull (a later line, and what the
    failed one left in its buffer, go there quietly), and stderr is told once, with the line that was lost."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "w") as stream:
        machinery.files.print_line("the first line", stream)
        machinery.files.print_line("the second line", stream)
        assert os.path.samestat(os.fstat(stream.fileno()), os.stat(os.devnull))
    err = capsys.readouterr().err
    assert "cannot write to stdout (Broken pipe)" in err and "this one was: the first line" in err
    assert "second" not in err


def test_killed_run_resumes_from_its_last_periodic_checkpoint(tmp_path, text_file, uninterrupted):
    _, ref_log = uninterrupted
    args = (*RUN, "--input_file", text_file, "--max_steps", "30", "--out_dir", "run", "--checkpoint_interval", "5")
    with start(tmp_path, *args) as run:
        run.wait_for("step    12 | loss", deadline_s=120)
        run.kill()  # no chance to save anything
    saved = load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["steps_done"]
    assert saved % 5 == 0 and saved >= 10
    with open(tmp_path / "run" / "log.jsonl", "a") as f:
        f.write('{"step": 13, "loss": 2.5')  # as if killed in the middle of writing a record
    resumed = run_script(*args, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    log = read_log(tmp_path / "run")
    # steps 0-29 trained, then the final evaluation at step 30; the redone steps replaced, not duplicated
    assert [r["step"] for r in log] == list(range(31))
    assert [r.get("loss") for r in log] == [r.get("loss") for r in ref_log]
    assert [r.get("val_loss") for r in log] == [r.get("val_loss") for r in ref_log]


def test_checkpoint_contents_are_plain_and_unwrapped(tmp_path, text_file):
    code = main([*RUN, "--input_file", str(text_file), "--max_steps", "3", "--out_dir", str(tmp_path / "o")])
    assert code == 0
    ckpt = torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)  # no pickled code needed
    assert set(ckpt) == {"model", "optimizer", "steps_done", "model_config", "train_config", "train_loader", "rng",
                         "scaler"}
    assert ckpt["steps_done"] == 3  # the model after 3 optimizer steps: a resume runs step 3 next
    assert all(not k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert ckpt["model_config"] == {"block_size": 64, "vocab_size": 50257, "n_layer": 2, "n_head": 2,
                                    "n_embd": 32, "sdpa": True}
    assert isinstance(ckpt["train_config"], dict) and ckpt["train_config"]["max_steps"] == 3
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch", "sample"}
    assert ckpt["optimizer"]["state"] and ckpt["train_loader"]["position"] == 3 * 2 * 16
    assert ckpt["scaler"] == {}  # float32: no loss scaling, an empty GradScaler state


def test_a_resume_on_fewer_gpus_restores_the_cuda_streams_it_has(monkeypatch):
    """A checkpoint holds one CUDA random stream per GPU its saving process saw (all 8 of a node's, under
    torchrun); a resume that sees fewer (one GPU, CUDA_VISIBLE_DEVICES=0) sets those it has: setting the
    ninth of 8 failed the resume with "tuple index out of range". No GPU here: torch.cuda's calls are stood
    in for, so this checks which states set_rng_state hands to torch, not torch's handling of them."""
    from machinery.random_streams import get_rng_state, set_rng_state

    state = get_rng_state(torch.Generator())  # (before torch.cuda is stood in for: no "cuda" streams in it)
    state["cuda"] = [torch.full((16,), gpu, dtype=torch.uint8) for gpu in range(8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    set_rng_state(state, torch.Generator())
    assert [int(stream[0]) for stream in restored] == [0, 1]  # GPU 0's and GPU 1's, in order


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1, "w": torch.ones(1000)}, str(path))
    before = digest(path)

    def crash_half_way(obj, f):
        f.write(b"PK\x03\x04 partial bytes of a checkpoint" * 1000)
        raise OSError("disk full")

    monkeypatch.setattr(machinery.checkpoints.torch, "save", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2, "w": torch.zeros(1000)}, str(path))
    assert digest(path) == before
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def test_process_killed_while_writing_leaves_the_previous_checkpoint_intact(tmp_path):
    """A real kill in the middle of torch.save of a large checkpoint."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1, "w": torch.ones(10)}, str(path))
    before = digest(path)
    writer = subprocess.Popen([sys.executable, "-c", f"""
import sys, torch
sys.path.insert(0, {str(REPO)!r})
import machinery.checkpoints
state = {{"step": 2, "w": torch.zeros(200_000_000)}}  # 800 MB: takes a while to write
print("writing", flush=True)
machinery.checkpoints.save_checkpoint(state, {str(path)!r})
"""], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    tmp = tmp_path / "ckpt.pt.tmp"
    deadline = time.time() + 60
    while not (tmp.exists() and tmp.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.01)
    writer.kill()
    writer.wait()
    assert digest(path) == before
    assert torch.load(path, weights_only=True)["step"] == 1


class Exploit:
    def __reduce__(self):
        return (open, ("PWNED", "w"))


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A run's out_dir after 4 steps (made once; each test damages its own copy)."""
    return finished_run(tmp_path_factory, "four_steps", 4)[1]


def flip_a_byte_of_the_biggest_tensor(path):
    """Bits flipped on a disk: one byte in the middle of the largest record's data (the token table), found
    through the zip's local header (30 bytes, then the name and the extra field)."""
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[record.header_offset + 26: record.header_offset + 30])
    data[record.header_offset + 30 + name_length + extra_length + record.file_size // 2] ^= 0x40
    path.write_bytes(bytes(data))
    return record.filename


def test_a_checkpoint_in_torchs_format_before_zip_files_still_loads(tmp_path, four_steps):
    """torch.save wrote no zip (and no checksums) before torch 1.6: such a file, read whole by torch.load,
    has nothing for the checksum comparison to refuse."""
    state = torch.load(four_steps / "ckpt.pt", weights_only=True)
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(tmp_path / "legacy.pt")
    assert load_checkpoint(str(tmp_path / "legacy.pt"))["steps_done"] == 4


def test_memory_running_out_while_a_checkpoint_is_read_is_not_called_damage(four_steps, monkeypatch):
    """A checkpoint bigger than the RAM left: torch.load's allocator error goes on to the out-of-memory line,
    not "not a readable checkpoint (truncated or corrupt?)", which would send the user after a good file."""
    def ram_runs_out(*args, **kwargs):
        raise RuntimeError(CPU_ALLOCATOR_FAILED)

    monkeypatch.setattr(machinery.checkpoints.torch, "load", ram_runs_out)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        load_checkpoint(str(four_steps / "ckpt.pt"))


@pytest.mark.parametrize("kind", ["truncated", "garbage", "not_a_checkpoint", "pickle_with_code",
                                  "wrong_weights", "unreadable", "flipped_bits", "text"])
def test_bad_checkpoint_is_a_clear_error_and_nothing_is_written(tmp_path, text_file, four_steps, kind, monkeypatch,
                                                                capsys):
    shutil.copytree(four_steps, tmp_path / "run")
    args = (*RUN, "--input_file", text_file, "--max_steps", "4", "--out_dir", "run")
    ckpt = tmp_path / "run" / "ckpt.pt"
    if kind == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif kind == "garbage":
        ckpt.write_bytes(b"\x00\x01 not a zip file" * 100)
    elif kind == "not_a_checkpoint":
        torch.save({"weights": torch.ones(3)}, ckpt)
    elif kind == "wrong_weights":  # every key there, but the model's tensors are not ours
        state = torch.load(ckpt, weights_only=True)
        state["model"] = {"transformer.wte.weight": torch.ones(3)}
        torch.save(state, ckpt)
    elif kind == "unreadable":  # (as chmod 000 makes it: root, as tests often run, reads such files anyway)
        def refused(path, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))
        monkeypatch.setattr(machinery.checkpoints.torch, "load", refused)
    elif kind == "flipped_bits":  # torch.load itself takes the file, the byte changed
        record = flip_a_byte_of_the_biggest_tensor(ckpt)
        torch.load(ckpt, weights_only=True)
    elif kind == "text":  # (another of the run's files passed for it: not a pickle, let alone one of code)
        shutil.copy(tmp_path / "run" / "log.jsonl", ckpt)
    else:
        ckpt.write_bytes(pickle.dumps(Exploit()))
    before, log_before = digest(ckpt), digest(tmp_path / "run" / "log.jsonl")
    code, _, err = run_in_process(*args, "--resume", "--max_steps", "8", cwd=tmp_path, monkeypatch=monkeypatch,
                                  capsys=capsys)
    assert code == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "ckpt.pt" in err
    assert ("cannot read" in err) == (kind == "unreadable")  # (not "truncated or corrupt?")
    if kind == "flipped_bits":
        assert f"is damaged: the bytes of {record} no longer match the checksum saved with them" in err
    assert ("(a pickle of anything else is refused: loading it could run code)" in err) == (kind == "pickle_with_code")
    assert ("is not a checkpoint (not a file torch.save writes)" in err) == (kind in ("garbage", "text"))
    assert digest(ckpt) == before and digest(tmp_path / "run" / "log.jsonl") == log_before
    assert not (tmp_path / "PWNED").exists()  # loading never runs code from the file


# A hand-edited checkpoint: (the part edited, how, what the one line says is wrong)
HAND_EDITS = [
    ("steps_done", lambda c: c.update(steps_done=-1), "steps_done is -1, not a whole number >= 0"),
    ("steps_done", lambda c: c.update(steps_done="4"), "steps_done is '4', not a whole number >= 0"),
    ("model_config", lambda c: c["model_config"].update(n_layer="2"), "model_config n_layer is '2', not a whole"),
    ("model_config", lambda c: c["model_config"].update(dropout=0.1), "model_config has dropout, which GPTConfig"),
    ("model_config", lambda c: c["model_config"].update(n_head=3), "model_config n_embd 32 is not a multiple of its "
                                                                   "n_head 3"),
    ("train_config", lambda c: c["train_config"].pop("B"), "train_config B is None, not a whole number >= 1"),
    ("train_config", lambda c: c.update(train_config=[]), "train_config is a list, not a dict"),
    ("train_config", lambda c: c["train_config"].update(seed="x"), "train_config seed is 'x', not a whole number"),
    ("train_config", lambda c: c["train_config"].update(seed=2**70), "train_config seed is 1180591620717411303424, "
                                                                     "past 2**32 - 1"),
    ("train_config", lambda c: c["train_config"].update(data_dir=7), "train_config data_dir is 7, not a path"),
    ("train_config", lambda c: c["train_config"].update(shuffle="no"), "train_config shuffle is 'no', not True or"),
    # a shape the weights do not have: said before a model of that shape is built (2**20 channels: 200 GB)
    ("model_config", lambda c: c["model_config"].update(n_embd=2**20, n_head=2), "model_config makes "
     "transformer.wte.weight (50257, 1048576), and the weights hold (50257, 32)"),
    ("model_config", lambda c: c["model_config"].update(n_layer=5), "model_config n_layer is 5, and the weights "
                                                                    "hold 2 blocks"),
    ("model", lambda c: c.update(model=[]), "model is a list, not a dict of weights"),
    ("model", lambda c: c["model"]["transformer.h.1.mlp.c_fc.weight"][0, 0].fill_(float("nan")),
     "its transformer.h.1.mlp.c_fc.weight holds NaN or inf"),
    ("train_loader", lambda c: c["train_loader"].update(position=-32), "train_loader position is -32, not a whole"),
    ("train_loader", lambda c: c["train_loader"].update(file=3), "train_loader file is 3, not a shard's file name"),
    ("optimizer", lambda c: c.update(optimizer={}), "optimizer does not hold state, param_groups"),
    ("optimizer", lambda c: c["optimizer"].update(state=[1]), "optimizer state is not a dict, or its param_groups"),
    ("optimizer", lambda c: next(iter(c["optimizer"]["state"].values())).update(exp_avg=torch.zeros(3)),
     "cannot resume from 'run/ckpt.pt': its optimizer's exp_avg for transformer.wte.weight has shape (3,), the "
     "parameter ("),
    # moments missing would restart from zero without a word (the resume would not be the run's)
    ("optimizer", lambda c: c["optimizer"].update(state={}), "cannot resume from 'run/ckpt.pt': its optimizer holds "
                                                             "no exp_avg or exp_avg_sq for transformer.wte.weight"),
    ("optimizer", lambda c: c["optimizer"]["state"]["transformer.h.1.mlp.c_fc.weight"].pop("exp_avg_sq"),
     "its optimizer holds no exp_avg_sq for transformer.h.1.mlp.c_fc.weight"),
    # AdamW's step count and settings edited into text: the first step's TypeError, or torch's garbled line, before
    ("optimizer", lambda c: next(iter(c["optimizer"]["state"].values())).update(step="x"),
     "cannot resume from 'run/ckpt.pt': its optimizer's step for transformer.wte.weight is not a tensor"),
    ("optimizer", lambda c: c["optimizer"]["param_groups"][0].update(weight_decay="x"),
     "its optimizer's lr, eps, weight_decay and betas are [0.003, 1e-08, 'x', 0.9, 0.95]: not all numbers"),
    ("rng", lambda c: c["rng"].pop("torch"), "rng does not hold python, numpy, torch, sample"),
    ("rng", lambda c: c["rng"].update(python=(1, (), None)), "cannot resume from 'run/ckpt.pt': state with version 1"),
]


@pytest.mark.parametrize("part,edit,says", HAND_EDITS, ids=[f"{part}-{i}" for i, (part, _, _) in enumerate(HAND_EDITS)])
def test_a_hand_edited_checkpoint_is_one_line_naming_what_is_wrong(tmp_path, text_file, four_steps, part, edit, says,
                                                                   monkeypatch, capsys):
    """Every key there, but one part not what write_checkpoint makes: the resume ends in one line naming
    the file and the part (not a TypeError from deep in the run), and the checkpoint and log stay."""
    shutil.copytree(four_steps, tmp_path / "run")
    ckpt = tmp_path / "run" / "ckpt.pt"
    state = torch.load(ckpt, weights_only=True)
    edit(state)
    torch.save(state, ckpt)
    before = digest(ckpt), digest(tmp_path / "run" / "log.jsonl")
    code, _, err = run_in_process(*RUN, "--input_file", text_file, "--out_dir", "run", "--resume", "--max_steps", "8",
                                  cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: ") and "'run/ckpt.pt'" in err and says in err, err
    assert (digest(ckpt), digest(tmp_path / "run" / "log.jsonl")) == before


def test_running_out_of_memory_while_restoring_is_not_blamed_on_the_checkpoint(tmp_path, text_file, four_steps,
                                                                              monkeypatch, capsys):
    """A resume that runs out of memory putting the optimizer state back: the out-of-memory line (what
    to lower), not "cannot resume from ckpt.pt", which is for a file whose contents do not fit."""
    shutil.copytree(four_steps, tmp_path / "run")

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(machinery.checkpoints, "load_optimizer_state", out_of_memory)
    code, _, err = run_in_process(*RUN, "--input_file", text_file, "--out_dir", "run", "--resume", "--max_steps", "8",
                                  cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err.startswith("error: out of memory before training") and "cannot resume" not in err, err


@pytest.mark.parametrize("max_steps", ["4", "2"])
def test_a_resume_with_nothing_left_to_train_says_so_and_writes_nothing(tmp_path, text_file, four_steps, max_steps,
                                                                       monkeypatch, capsys):
    """four_steps' run has done 4 steps: resumed with --max_steps 4 (or a lower 2) it has nothing to train.
    It says so, samples, and leaves the checkpoint and log as they were."""
    shutil.copytree(four_steps, tmp_path / "run")
    before = digest(tmp_path / "run" / "ckpt.pt"), digest(tmp_path / "run" / "log.jsonl")
    code, out, err = run_in_process(*RUN, "--input_file", text_file, "--out_dir", "run", "--resume", "--max_steps",
                                    max_steps, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert f"nothing to train: the run has done 4 steps, --max_steps is {max_steps} (a higher one trains on)" \
        in out and "step     4" not in out and "> " in out
    assert (digest(tmp_path / "run" / "ckpt.pt"), digest(tmp_path / "run" / "log.jsonl")) == before


def test_a_resume_is_not_measured_against_ram_by_the_default_shape(tmp_path, text_file, four_steps, monkeypatch,
                                                                    capsys):
    """A resume's model is its checkpoint's (2 layers, 32 channels), not the default 124M the command's own
    shape flags describe: a machine whose RAM could not hold GPT-2 124M still resumes it."""
    shutil.copytree(four_steps, tmp_path / "run")
    monkeypatch.setattr(machinery.command_line, "ram_bytes", lambda: 200 * 2**20)  # (124M needs about 0.5 GB)
    code, _, err = run_in_process(*TRAINING, "--device", "cpu", "--input_file", text_file, "--out_dir", "run",
                                  "--resume", "--max_steps", "5", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err


def test_a_resume_with_nothing_left_to_train_does_not_need_the_runs_data(tmp_path, text_file, monkeypatch, capsys):
    """A resume that trains nothing (it samples, or exports) reads no data: the run's may be gone. One that
    trains on needs it, and says which is missing."""
    shutil.copy(text_file, tmp_path / "gone.txt")
    args = [*TINY, "--B", "2", "--T", "16", "--eval_iters", "1", "--num_samples", "1", "--max_new_tokens", "2",
            "--out_dir", "run"]
    code, _, err = run_in_process(*args, "--input_file", "gone.txt", "--max_steps", "2", cwd=tmp_path,
                                  monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    (tmp_path / "gone.txt").unlink()
    code, out, err = run_in_process(*args, "--resume", "--max_steps", "2", "--export_dir", "exported", cwd=tmp_path,
                                    monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "nothing to train" in out and (tmp_path / "exported" / "model.safetensors").exists(), err
    code, _, err = run_in_process(*args, "--resume", "--max_steps", "3", cwd=tmp_path, monkeypatch=monkeypatch,
                                  capsys=capsys)
    assert code == 1 and err == f"error: input file {str(tmp_path / 'gone.txt')!r} not found\n"


def test_a_resume_with_other_optimisation_settings_says_which_and_follows_them(tmp_path, text_file, four_steps,
                                                                              monkeypatch, capsys):
    """A resume is the run's command with --resume. four_steps' run (4 steps, --lr 3e-3 decaying to --min_lr
    3e-4) resumed with a higher --max_steps, to train on, and --min_lr left out (None: a constant rate):
    the model line names both, and from step 4 the learning rate is get_lr's for the new settings (3e-3),
    not the old schedule's end (3e-4). (Another --seed changes nothing here: the random streams come from
    the checkpoint, and a text file is read in order; it is not named.)"""
    shutil.copytree(four_steps, tmp_path / "run")
    i = RUN.index("--min_lr")
    without_min_lr = RUN[:i] + RUN[i + 2:]
    code, out, err = run_in_process(*without_min_lr, "--input_file", text_file, "--out_dir", "run", "--resume",
                                    "--max_steps", "6", "--seed", "7", cwd=tmp_path, monkeypatch=monkeypatch,
                                    capsys=capsys)
    assert code == 0, err
    assert ("note: resumed with --max_steps 6 (the run's: 4), --min_lr None (the run's: 0.0003): from step 4 on, "
            "training follows these settings, not the run's") in out
    lrs = {r["step"]: r["lr"] for r in read_log(tmp_path / "run") if "lr" in r}
    assert lrs[4] == lrs[5] == pytest.approx(train_gpt2.get_lr(5, 3e-3, 3e-3, 4, 6)) == pytest.approx(3e-3)
    # the run's last evaluation (of its step-4 model, the checkpoint's) stays in the log: step 4 is not an
    # evaluation step of the longer run (--eval_interval 5), so its record carries it on
    ended = read_log(four_steps)[-1]
    assert ended["step"] == 4 and "val_loss" in ended
    assert [r for r in read_log(tmp_path / "run") if r["step"] == 4][0]["val_loss"] == ended["val_loss"]


def test_a_resumes_own_evaluation_at_its_first_step_replaces_the_ended_runs(tmp_path, four_steps):
    """The resume's first record takes the place of the ended run's last (the same step): an evaluation the
    resume made there is the one kept; only what it did not evaluate (HellaSwag here) is carried over."""
    run = shutil.copytree(four_steps, tmp_path / "run")
    kept = read_log(run)[:-1]
    ended = {**read_log(run)[-1], "hellaswag_acc": 0.3}
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*kept, ended]))
    assert ended["step"] == 4 and ended["val_loss"] != 2.0
    with machinery.run_log.RunLog(train_gpt2.TrainConfig(out_dir=str(run), resume=True), 4) as log:
        log.write({"step": 4, "val_loss": 2.0, "loss": 4.0})
    assert read_log(run) == [*kept, {"step": 4, "val_loss": 2.0, "loss": 4.0, "hellaswag_acc": 0.3}]


def test_a_resume_that_names_no_data_reads_the_runs_own_from_any_folder(tmp_path, four_steps, monkeypatch, capsys):
    """The run's data is named in its checkpoint: a resume started in a folder with no input.txt (a
    scheduler's job folder) trains on it; where that data is gone, the line names the run's file."""
    shutil.copytree(four_steps, tmp_path / "run")
    assert not (tmp_path / "input.txt").exists()
    code, out, err = run_in_process(*RUN, "--out_dir", "run", "--resume", "--max_steps", "5", cwd=tmp_path,
                                    monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert list(step_losses(out)) == [4]
    ckpt = tmp_path / "run" / "ckpt.pt"
    state = torch.load(ckpt, weights_only=True)
    state["train_config"]["input_file"] = str(tmp_path / "gone.txt")
    torch.save(state, ckpt)
    code, out, err = run_in_process(*RUN, "--out_dir", "run", "--resume", "--max_steps", "6", cwd=tmp_path,
                                    monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err == f"error: input file {str(tmp_path / 'gone.txt')!r} not found\n"
    assert "model resumed" not in out  # (said before the model is built)


def test_init_from_a_hand_edited_checkpoint_checks_its_model_not_its_training_state(tmp_path, text_file, four_steps,
                                                                                     monkeypatch, capsys):
    """--init_from takes only the weights and shape: a model_config GPTConfig cannot take is one line; an
    optimizer state that is not there does not matter."""
    shutil.copytree(four_steps, tmp_path / "run")
    ckpt = tmp_path / "run" / "ckpt.pt"
    state = torch.load(ckpt, weights_only=True)
    state["optimizer"], state["rng"] = {}, {}
    torch.save(state, ckpt)
    args = (*RUN, "--input_file", text_file, "--out_dir", "new", "--init_from", "run/ckpt.pt", "--max_steps", "1")
    code, _, err = run_in_process(*args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    state["model_config"]["n_head"] = 0
    torch.save(state, ckpt)
    code, _, err = run_in_process(*args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err == ("error: 'run/ckpt.pt' is not a usable train_gpt2 checkpoint: model_config n_head "
                                 "is 0, not a whole number >= 1\n")
    # a vocabulary smaller than GPT-2's (the tokens would index past the table), and weights with a tensor missing
    state["model_config"]["n_head"], state["model_config"]["vocab_size"] = 2, 100
    weights = dict(state["model"])
    for name in ("transformer.wte.weight", "lm_head.weight"):  # (the tied matrix, trimmed to fit the config)
        state["model"][name] = weights[name][:100].clone()
    torch.save(state, ckpt)
    code, _, err = run_in_process(*args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err == ("error: 'run/ckpt.pt' is not a usable train_gpt2 checkpoint: model_config "
                                 "vocab_size is 100, below the tokenizer's 50257 ids\n")
    state["model_config"]["vocab_size"] = 50257
    state["model"] = weights
    del state["model"]["transformer.ln_f.weight"]
    torch.save(state, ckpt)
    code, _, err = run_in_process(*args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err.startswith("error: 'run/ckpt.pt' is not a usable train_gpt2 checkpoint: Missing key(s) "
                                        "in state_dict: \"transformer.ln_f.weight\"")
    # a checkpoint file is one whatever its name ends with (a model name or a save_pretrained folder is no file)
    shutil.copy(four_steps / "ckpt.pt", tmp_path / "run" / "model.ckpt")
    code, out, err = run_in_process(*RUN, "--input_file", text_file, "--out_dir", "new", "--init_from",
                                    "run/model.ckpt", "--max_steps", "1", cwd=tmp_path, monkeypatch=monkeypatch,
                                    capsys=capsys)
    assert code == 0 and "model run/model.ckpt | 2 layers" in out, err


def test_a_resume_that_names_its_runs_init_from_however_written_is_not_a_clash(tmp_path, text_file, four_steps,
                                                                              monkeypatch, capsys):
    """A fine-tuning run started with --init_from run/ckpt.pt and resumed with the command it was started
    by (a path relative to where it started), from another folder with the absolute path, or with ./ in
    front: the same file, so the resume goes on. Another file is a clash, named in one line."""
    shutil.copytree(four_steps, tmp_path / "run")
    (tmp_path / "elsewhere").mkdir()
    args = (*RUN, "--input_file", text_file, "--out_dir", tmp_path / "ft", "--checkpoint_interval", "1",
            "--num_samples", "0")
    code, _, err = run_in_process(*args, "--init_from", "run/ckpt.pt", "--max_steps", "1", cwd=tmp_path,
                                  monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    for steps, (init_from, cwd) in enumerate([("run/ckpt.pt", tmp_path), ("./run//ckpt.pt", tmp_path),
                                              (tmp_path / "run" / "ckpt.pt", tmp_path / "elsewhere")], 2):
        code, out, err = run_in_process(*args, "--init_from", init_from, "--resume", "--max_steps", steps, cwd=cwd,
                                        monkeypatch=monkeypatch, capsys=capsys)
        assert code == 0 and f"at step {steps - 1}" in out, err
    shutil.copy(tmp_path / "run" / "ckpt.pt", tmp_path / "other.pt")
    code, _, err = run_in_process(*args, "--init_from", "other.pt", "--resume", "--max_steps", "5", cwd=tmp_path,
                                  monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err == (f"error: checkpoint {str(tmp_path / 'ft' / 'ckpt.pt')!r} has init_from="
                                 f"{str(tmp_path / 'run' / 'ckpt.pt')!r}; the command line says init_from='other.pt' "
                                 "(leave these flags out: the checkpoint decides them)\n")


def test_resume_on_data_without_the_runs_position_is_a_clear_error(tmp_path, four_steps, monkeypatch, capsys):
    """The run stopped 4 x 32 tokens into its text; resumed on other data (a text of 90 training tokens,
    where that place is not there either), its train split's token count is not the run's: one line, and
    the checkpoint and the log (whose records a resume rewrites) untouched."""
    shutil.copytree(four_steps, tmp_path / "run")
    (tmp_path / "small.txt").write_text(" word" * 100)  # 100 tokens: 90 to train on
    before = digest(tmp_path / "run" / "ckpt.pt"), digest(tmp_path / "run" / "log.jsonl")
    code, _, err = run_in_process(*TRAINING, "--input_file", "small.txt", "--max_steps", "6", "--out_dir", "run",
                                  "--resume", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and re.fullmatch(r"error: the run trained on a train split of [\d,]+ tokens, and this data's "
                                      r"has 90: resume with the data the run trained on, or start a new run from "
                                      r"these weights with --init_from\n", err), err
    assert (digest(tmp_path / "run" / "ckpt.pt"), digest(tmp_path / "run" / "log.jsonl")) == before


def test_a_resumed_window_that_no_longer_fits_moves_to_the_next_shard(tmp_path):
    """A run may resume with a bigger --B (the same tokens a step, fewer micro-steps): where its saved
    place leaves room for the old window but not the new one, the loader goes on to the next shard (here:
    the next epoch's), as it would have in training, instead of stopping the run. A place past the
    data's end is still an error, and a checkpoint from before the position had all its keys reads
    the missing ones as 0."""
    (tmp_path / "text.txt").write_text(" word" * 212)
    small = train_gpt2.DataLoaderLite(2, 16, str(tmp_path / "text.txt"), split="train")
    n = len(small.current)  # 190 tokens: windows of 33 at 0, 32, ... 128 fit, and 160 not
    big = train_gpt2.DataLoaderLite(4, 16, str(tmp_path / "text.txt"), split="train")
    machinery.checkpoints.restore_data_position(small, {"epoch": 0, "shard": 0, "position": 128})
    machinery.checkpoints.restore_data_position(big, {"epoch": 0, "shard": 0, "position": 128})
    assert 128 + 33 <= n < 128 + 65
    assert small.state_dict() == {"epoch": 0, "shard": 0, "position": 128, "file": None, "tokens": n}  # (no file)
    assert big.state_dict() == {"epoch": 1, "shard": 0, "position": 0, "file": None, "tokens": n}
    machinery.checkpoints.restore_data_position(big, {"position": 64})
    assert big.state_dict() == {"epoch": 0, "shard": 0, "position": 64, "file": None, "tokens": n}
    for past in ({"epoch": 0, "shard": 0, "position": n + 1}, {"epoch": 0, "shard": 1, "position": 0}):
        with pytest.raises(ValueError, match="past the end of this data's train split"):
            machinery.checkpoints.restore_data_position(big, past)


def test_resume_with_a_different_model_is_a_clear_error(tmp_path, text_file, monkeypatch, capsys):
    """A resume's model is the checkpoint's: a shape flag typed on the command line that contradicts it
    is an error naming every contradiction in one line, and nothing is written; the same command
    without the shape flags resumes, with the checkpoint's shape (not the flags' defaults, 12 layers
    of 768 channels, block 1024)."""
    args = (*RUN, "--input_file", text_file, "--max_steps", "2", "--out_dir", "run")
    assert run_in_process(*args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)[0] == 0
    before = digest(tmp_path / "run" / "ckpt.pt"), digest(tmp_path / "run" / "log.jsonl")
    # (the same values as the checkpoint's, TINY's n_head and n_embd, are no contradiction)
    code, _, err = run_in_process(*args, "--resume", "--max_steps", "3", "--n_layer", "3", "--block_size", "1024",
                                  cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err.strip() == ("error: checkpoint 'run/ckpt.pt' has n_layer=2, block_size=64; the command "
                                         "line says n_layer=3, block_size=1024 (leave these flags out: the "
                                         "checkpoint decides them)")
    assert (digest(tmp_path / "run" / "ckpt.pt"), digest(tmp_path / "run" / "log.jsonl")) == before

    code, out, err = run_in_process(*TRAINING, "--input_file", text_file, "--max_steps", "3", "--out_dir", "run",
                                    "--resume", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert "2 layers, 2 heads, 32 channels, vocab 50257, block 64" in out
    assert "resumed from run/ckpt.pt at step 2" in out
    assert list(step_losses(out)) == [2]
    ckpt = load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    assert ckpt["steps_done"] == 3 and ckpt["model_config"]["n_layer"] == 2 and ckpt["model_config"]["block_size"] == 64


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, text_file, monkeypatch, capsys):
    code, _, err = run_in_process(*RUN, "--input_file", text_file, "--resume", cwd=tmp_path, monkeypatch=monkeypatch,
                                  capsys=capsys)
    assert code == 1 and err.strip() == "error: no checkpoint to resume from at 'out/ckpt.pt'"
    code, _, err = run_in_process(*RUN, "--input_file", text_file, "--init_from", "nothing.pt", cwd=tmp_path,
                                  monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err.strip() == "error: --init_from: no checkpoint at 'nothing.pt'"


def test_a_node_without_the_checkpoint_says_out_dir_must_be_shared(tmp_path, monkeypatch):
    """Across machines (torchrun's WORLD_SIZE over its LOCAL_WORLD_SIZE) every process reads the checkpoint to
    resume: a machine that has no copy of out_dir says why it might not."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"^no checkpoint to resume from at '.*ckpt.pt' on this machine \(a run "
                                         r"across machines needs its out_dir on a filesystem they share\)$"):
        load_checkpoint(str(tmp_path / "ckpt.pt"), resume=True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # one machine: the plain line
    with pytest.raises(ValueError, match=r"^no checkpoint to resume from at '.*ckpt.pt'$"):
        load_checkpoint(str(tmp_path / "ckpt.pt"), resume=True)


def test_a_run_is_evaluated_on_processes_that_do_not_divide_its_tokens_per_step(tmp_path):
    """--resume --eval_only on two processes of a one-process run of 64 tokens a step at B=2, T=32 (128 a
    micro-step over two): evaluating accumulates nothing, so it is not refused; resuming to train is, in one line."""
    from train_gpt2 import TrainConfig

    from conftest import REPO

    saved = dict(B=2, T=32, total_batch_size=64, input_file=str(REPO / "input.txt"))
    cfg = machinery.checkpoints.resumed_batch(TrainConfig(resume=True, eval_only=True), set(), saved, "run/ckpt.pt", 2,
                                              steps_done=4)
    assert (cfg.B, cfg.T, cfg.total_batch_size) == (2, 32, 64)
    with pytest.raises(ValueError, match="the run's 64 tokens per step are not a multiple of B\\*T\\*processes = "
                                         "2\\*32\\*2 = 128: resume with a --B that makes them one"):
        machinery.checkpoints.resumed_batch(TrainConfig(resume=True), set(), saved, "run/ckpt.pt", 2, steps_done=4)


def test_a_resume_continues_the_runs_batch_and_names_another_B(tmp_path, text_file, monkeypatch, capsys):
    """A run trained at --B 2 --T 16 (32 tokens a step) and resumed with no batch flags carries on as it
    was, not at the defaults (B=4, T=32); with --B 1 it says so in one line and keeps 32 tokens a step by
    two accumulation steps, the same arithmetic: the losses of the run that never stopped (float32, 1e-5).
    A --T or --total_batch_size other than the run's would make another run: refused in one line."""
    common = [*TINY, "--dtype", "float32", "--input_file", text_file, "--eval_interval", "2", "--num_samples", "0"]

    def run(*args):
        code, out, err = run_in_process(*common, *args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
        assert code == 0, err
        return out

    run("--B", "2", "--T", "16", "--max_steps", "4", "--out_dir", "whole")
    for name in ("same", "smaller"):
        run("--B", "2", "--T", "16", "--max_steps", "2", "--out_dir", name)
    out = run("--max_steps", "4", "--resume", "--out_dir", "same")
    assert "model resumed from same/ckpt.pt at step 2 | 2 layers" in out and "model scratch" not in out
    assert "32 tokens per step = 2 x 16 x 1 processes x 1 accumulation steps" in out and "instead of" not in out
    out = run("--max_steps", "4", "--resume", "--B", "1", "--out_dir", "smaller")
    assert "--B 1 instead of the run's 2: the same 32 tokens per step in smaller micro-batches\n" in out
    assert "32 tokens per step = 1 x 16 x 1 processes x 2 accumulation steps" in out
    # (validation reads --eval_iters steps' tokens: at B=1, twice the batches, the same tokens as the run)
    for name, key in (("same", "loss"), ("same", "val_loss"), ("smaller", "loss"), ("smaller", "val_loss")):
        assert [r[key] for r in read_log(tmp_path / name) if key in r] == \
            pytest.approx([r[key] for r in read_log(tmp_path / "whole") if key in r], abs=1e-5), (name, key)
    for flag, value, run_value in (("--T", "8", "16"), ("--total_batch_size", "64", "32")):
        code, _, err = run_in_process(*common, "--max_steps", "6", "--resume", flag, value, "--out_dir", "same",
                                      cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
        assert code == 1 and err == (f"error: {flag} {value} instead of the run's {run_value}: a resume continues the "
                                     f"run as it was; leave {flag} out, or start a new run from these weights with "
                                     f"--init_from same/ckpt.pt\n")
    (tmp_path / "short.args").write_text("--T 8\n")  # (from a recipe: the line names it)
    code, _, err = run_in_process(*common, "--max_steps", "6", "--resume", "@short.args", "--out_dir", "same",
                                  cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err.startswith("error: --T 8 (in recipe short.args) instead of the run's 16: "), err
    # a --B whose micro-batch does not divide the run's tokens per step is said in the run's terms
    code, _, err = run_in_process(*common, "--max_steps", "6", "--resume", "--B", "4", "--out_dir", "same",
                                  cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err == ("error: the run's 32 tokens per step are not a multiple of B*T*processes = 4*16*1 = "
                                 "64: resume with a --B that makes them one\n")
    # --total_batch_size 0 is B*T*processes, as when the run began: typed again, the run's own command resumes; with
    # another --B it is another batch, said in tokens
    code, _, err = run_in_process(*common, "--max_steps", "6", "--resume", "--total_batch_size", "0", "--B", "1",
                                  "--out_dir", "same", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err.startswith("error: --total_batch_size 0 (B*T*processes = 16) instead of the run's 32: ")
    out = run("--max_steps", "5", "--resume", "--total_batch_size", "0", "--out_dir", "same")
    assert "32 tokens per step = 2 x 16 x 1 processes x 1 accumulation steps" in out


class NanGradients(torch.autograd.Function):
    """The loss as it is, going forward; NaN gradients going back: a finite loss whose update poisons the weights."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("diverged", ["loss", "gradients"])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, text_file, monkeypatch, capsys, diverged):
    """A loss that is nan, or a finite loss whose gradients are (AdamW would apply them): the run stops in one
    line at that step, and the NaN state is never saved, over the last checkpoint or anywhere."""
    out = tmp_path / "o"
    args = [*RUN, "--input_file", str(text_file), "--out_dir", str(out)]
    assert main([*args, "--max_steps", "2"]) == 0
    capsys.readouterr()

    forward, trained = train_gpt2.GPT.forward, []

    def diverging(model, idx, targets=None):
        logits, loss = forward(model, idx, targets)
        if model.training:  # a training batch (evaluation puts the model in eval mode): one per step here
            trained.append(1)
            if len(trained) > 3:
                loss = loss * float("nan") if diverged == "loss" else NanGradients.apply(loss)
        return logits, loss

    monkeypatch.setattr(train_gpt2.GPT, "forward", diverging)
    said = "loss is nan at step 3" if diverged == "loss" else "the gradient norm is nan at step 3"
    # a fresh run into the same out_dir: it says it will replace the checkpoint, then diverges at step 3
    code = main([*args, "--max_steps", "10", "--checkpoint_interval", "1"])
    captured = capsys.readouterr()
    assert code == 1
    assert "replaces it when it saves its own" in captured.out
    assert said in captured.err
    # steps 0-2 were fine, each followed by a checkpoint; the last holds 3 steps done, and step 3's
    # NaN state was never written
    after_3 = digest(out / "ckpt.pt")
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["steps_done"] == 3 and all(torch.isfinite(w).all() for w in ckpt["model"].values())
    code = main([*args, "--max_steps", "10", "--resume", "--checkpoint_interval", "1"])
    assert code == 1 and said in capsys.readouterr().err
    assert digest(out / "ckpt.pt") == after_3


@pytest.mark.parametrize("fresh_run", ["killed after its first checkpoint", "stopped before it", "same second"])
def test_a_resume_settles_the_log_a_fresh_run_left_beside_another_run(tmp_path, four_steps, text_file, fresh_run,
                                                                      monkeypatch, capsys):
    """A fresh run beside another run's files logs to log.new.jsonl until its first checkpoint, then renames it
    log.jsonl. Killed (SIGKILL) between the two, it leaves its checkpoint newer than its log: a resume takes that
    log as the run's (not the other run's log.jsonl, which would mix two runs). Stopped before it saved, it
    leaves its log newer than the checkpoint, which is the other run's: a resume of that run removes it. (Times
    that tie, on a file system that keeps whole seconds, say nothing: the log stays where it is.)"""
    args = [*RUN, "--input_file", text_file, "--num_samples", "0"]
    code, _, err = run_in_process(*args, "--max_steps", "2", "--seed", "7", "--out_dir", "fresh", cwd=tmp_path,
                                  monkeypatch=monkeypatch, capsys=capsys)  # (the fresh run's files, apart)
    assert code == 0, err
    run = shutil.copytree(four_steps, tmp_path / "run")
    shutil.copy(tmp_path / "fresh" / "log.jsonl", run / "log.new.jsonl")
    killed = fresh_run.startswith("killed")
    if killed:
        shutil.copy(tmp_path / "fresh" / "ckpt.pt", run / "ckpt.pt")
    checkpoint_written = (run / "ckpt.pt").stat().st_mtime_ns
    log_written = checkpoint_written + {"killed": -1, "stopped": 1, "same": 0}[fresh_run.split()[0]] * 10**9
    os.utime(run / "log.new.jsonl", ns=(log_written, log_written))
    runs_log = read_log(tmp_path / "fresh" if killed else four_steps)
    code, out, err = run_in_process(*args, "--resume", "--max_steps", "6", "--out_dir", "run", cwd=tmp_path,
                                    monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    notes = {"killed": ["note: run/log.new.jsonl is the log of run/ckpt.pt (its run was killed before it took the "
                        "name): now log.jsonl"],
             "stopped": ["note: removed run/log.new.jsonl, left by a fresh run stopped here before it saved a "
                         "checkpoint (the checkpoint resumed is another run's)"],
             "same": []}
    assert [line for line in out.splitlines() if "log.new.jsonl" in line] == notes[fresh_run.split()[0]]
    done = len(runs_log) - 1  # (the run's records before its checkpoint's step: kept by the resume)
    assert read_log(run)[:done] == runs_log[:done] and [r["step"] for r in read_log(run)] == list(range(7))
    assert (run / "log.new.jsonl").exists() == (log_written == checkpoint_written)


def test_a_fresh_run_beside_a_log_without_a_checkpoint_says_so(tmp_path, four_steps, text_file, monkeypatch, capsys):
    """An out_dir that holds a run's log but no checkpoint (one stopped before its first save, or deleted): the
    fresh run keeps its own log apart until its first checkpoint, as beside a checkpoint, and says so."""
    (tmp_path / "run").mkdir()
    shutil.copy(four_steps / "log.jsonl", tmp_path / "run" / "log.jsonl")
    code, out, err = run_in_process(*RUN, "--input_file", text_file, "--out_dir", "run", "--max_steps", "1",
                                    cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "note: run/log.jsonl exists (a run's that saved no checkpoint); this fresh run replaces it " \
        "when it saves its first checkpoint (until then it logs to log.new.jsonl)" in out, err
    assert [r["step"] for r in read_log(tmp_path / "run")] == [0, 1]
    assert not (tmp_path / "run" / "log.new.jsonl").exists()


def test_a_fresh_run_leaves_the_other_runs_log_alone_until_it_saves_its_own(tmp_path, four_steps, text_file,
                                                                            monkeypatch, capsys):
    """A fresh run into a finished run's out_dir replaces the checkpoint only when it saves its own, and the
    log and picture with it: stopped before that, the other run is whole (a resume would continue it)."""
    run = shutil.copytree(four_steps, tmp_path / "run")
    files = ("ckpt.pt", "log.jsonl", "progress.png")
    before = [digest(run / name) for name in files]
    args = [*RUN, "--input_file", str(text_file), "--out_dir", str(run), "--max_steps", "3"]
    forward, trained = train_gpt2.GPT.forward, []

    def nan_at_step_1(model, idx, targets=None):
        logits, loss = forward(model, idx, targets)
        if model.training:
            trained.append(1)
            loss = loss * float("nan") if len(trained) > 1 else loss
        return logits, loss

    with monkeypatch.context() as m:
        m.setattr(train_gpt2.GPT, "forward", nan_at_step_1)
        assert main(args) == 1  # stopped at step 1, before any checkpoint of its own
    assert [digest(run / name) for name in files] == before
    assert [r["step"] for r in map(json.loads, (run / "log.new.jsonl").read_text().splitlines())] == [0]
    assert main(args) == 0  # the same fresh run, to its end: its checkpoint, its log, its picture
    assert [r["step"] for r in read_log(run)] == [0, 1, 2, 3]
    assert not (run / "log.new.jsonl").exists() and not (run / "progress.new.png").exists()
    assert [digest(run / name) == old for name, old in zip(files, before)] == [False, False, False]
    assert load_checkpoint(str(run / "ckpt.pt"))["steps_done"] == 3


def test_a_fresh_runs_stop_before_its_first_checkpoint_leaves_the_other_runs_checkpoint(tmp_path, four_steps,
                                                                                        text_file, monkeypatch, capsys):
    """A fresh run started by mistake in a finished run's out_dir and stopped (Ctrl-C, a scheduler's SIGTERM)
    before it saved a checkpoint of its own saves none: the stop's checkpoint would replace the other run's,
    which the user may be stopping this run to keep. Once it has saved its own, a stop saves as always."""
    run = shutil.copytree(four_steps, tmp_path / "run")
    files = ("ckpt.pt", "log.jsonl", "progress.png")
    before = [digest(run / name) for name in files]
    args = [*RUN, "--input_file", text_file, "--out_dir", run, "--max_steps", "8", "--checkpoint_interval", "4",
            "--seed", "7"]
    calls = []  # the stop asked after the 2nd step, then after the 6th (past this run's checkpoint at step 4)
    monkeypatch.setattr(train_gpt2, "stop_requested_anywhere",
                        lambda requested, device: calls.append(1) or len(calls) in (2, 6 + 2))
    code, out, _ = run_in_process(*args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 130 and f"interrupted after 2 steps, without saving: {run / 'ckpt.pt'} is still the other " \
        "run's (this run's log: log.new.jsonl; run the same command again to start this run over)" in out
    assert [digest(run / name) for name in files] == before  # the other run: whole, and resumable
    assert load_checkpoint(str(run / "ckpt.pt"))["steps_done"] == 4
    code, out, _ = run_in_process(*args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 130 and f"interrupted: saved step 6 to {run}/ckpt.pt" in out  # (its own, saved at step 4)
    assert load_checkpoint(str(run / "ckpt.pt"))["steps_done"] == 6


def test_a_fresh_run_that_draws_no_picture_leaves_none_of_the_other_runs(tmp_path, four_steps, text_file,
                                                                        monkeypatch):
    """A fresh run into a finished run's out_dir takes over its names once it has its own checkpoint: its log
    becomes log.jsonl, and the other run's progress.png goes too when this run has drawn none (no
    matplotlib, say: stood in for by a plot_log that draws nothing), so no picture of another run is left
    beside this run's log."""
    run = shutil.copytree(four_steps, tmp_path / "run")
    assert (run / "progress.png").exists()
    monkeypatch.setattr(machinery.run_log, "plot_log", lambda *args, **kwargs: None)
    assert main([*RUN, "--input_file", text_file, "--out_dir", str(run), "--max_steps", "2", "--seed", "7"]) == 0
    assert [r["step"] for r in read_log(run)] == [0, 1, 2] and not (run / "progress.png").exists()


def test_a_resumed_runs_stop_before_its_next_checkpoint_saves(tmp_path, four_steps, text_file, monkeypatch, capsys):
    """The checkpoint in out_dir is the resumed run's own: a stop after the resume's first step saves over it
    (the steps since the resume kept), where a fresh run's stop would leave another run's alone."""
    run = shutil.copytree(four_steps, tmp_path / "run")
    calls = []
    monkeypatch.setattr(train_gpt2, "stop_requested_anywhere", lambda requested, device: calls.append(1) or True)
    code, out, _ = run_in_process(*RUN, "--input_file", text_file, "--out_dir", run, "--max_steps", "8", "--resume",
                                  cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 130 and f"interrupted: saved step 5 to {run}/ckpt.pt" in out, out
    assert load_checkpoint(str(run / "ckpt.pt"))["steps_done"] == 5


def test_a_stop_in_the_last_step_saves_the_run_and_skips_its_samples_and_export(tmp_path, text_file, monkeypatch,
                                                                                capfd):
    """A Ctrl-C in the run's last step: as the answer says, the step is finished and saved (the run's last
    checkpoint, with its final evaluation), and the run stops there (130): the samples and the export that would
    follow are skipped. The same command with --resume makes them, training nothing."""
    train_step, calls = train_gpt2.forward_backward, []

    def ctrl_c_in_the_fourth_step(*args):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)  # (StopRequested's handler answers it: no KeyboardInterrupt)
        return train_step(*args)

    monkeypatch.setattr(train_gpt2, "forward_backward", ctrl_c_in_the_fourth_step)
    args = [*RUN, "--input_file", text_file, "--out_dir", "run", "--max_steps", "4", "--export_dir", "exported"]
    code, out, err = run_in_process(*args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capfd)
    assert code == 130 and "SIGINT: stopping after this step, with a checkpoint" in err, err
    assert out.splitlines()[-1] == "interrupted: saved step 4, the run's last, to run/ckpt.pt; its samples and " \
        "export skipped: the same command with --resume makes them"
    assert "> " not in out and not (tmp_path / "exported").exists()
    assert load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["steps_done"] == 4
    assert read_log(tmp_path / "run")[-1]["step"] == 4 and "val_loss" in read_log(tmp_path / "run")[-1]
    code, out, err = run_in_process(*args, "--resume", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capfd)
    assert code == 0 and "nothing to train" in out and "> " in out, err
    assert (tmp_path / "exported" / "model.safetensors").exists() and len(calls) == 4


def out_dir_removed_then_saved(state, path):
    shutil.rmtree(os.path.dirname(path))  # (what `rm -rf out` while the run trains does)
    machinery.checkpoints.save_checkpoint(state, path)


def test_a_run_whose_out_dir_was_removed_while_it_trained_still_saves_its_model(tmp_path, text_file, monkeypatch,
                                                                               capsys):
    """out_dir deleted mid-run (by hand, by a cleanup job): the checkpoint at the end is written into it made
    again, not lost to "No such file or directory" after the whole run."""
    monkeypatch.setattr(train_gpt2, "save_checkpoint", out_dir_removed_then_saved)
    code, _, err = run_in_process(*RUN, "--input_file", text_file, "--out_dir", "run", "--max_steps", "2",
                                  cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["steps_done"] == 2


def saved_then_interrupted(state, path):
    machinery.checkpoints.save_checkpoint(state, path)
    raise KeyboardInterrupt  # (a second Ctrl-C held during the write: SignalsHeld raises it once the file is whole)


def test_a_run_stopped_just_after_its_first_checkpoint_keeps_its_log_with_it(tmp_path, four_steps, text_file,
                                                                              monkeypatch, capsys):
    """A fresh run beside another run's files whose first checkpoint is written, and which stops at once
    before the training loop says so (a second Ctrl-C held while the file was written): the checkpoint is this run's,
    so its log and picture take the names beside it, not the other run's log."""
    run = shutil.copytree(four_steps, tmp_path / "run")
    monkeypatch.setattr(train_gpt2, "save_checkpoint", saved_then_interrupted)
    code, _, err = run_in_process(*RUN, "--input_file", text_file, "--out_dir", run, "--max_steps", "8",
                                  "--checkpoint_interval", "2", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 130 and err.startswith("interrupted: stopped at once"), err
    assert load_checkpoint(str(run / "ckpt.pt"))["steps_done"] == 2
    assert [r["step"] for r in read_log(run)] == [0, 1] and not (run / "log.new.jsonl").exists()  # (2: not begun)


@pytest.mark.parametrize("beside", [False, True], ids=["own_folder", "beside_another_run"])
def test_a_stop_while_the_last_checkpoint_is_written_keeps_the_trained_models_record(tmp_path, four_steps, text_file,
                                                                                    monkeypatch, capsys, beside):
    """A second Ctrl-C while the trained model's checkpoint is written (held until the file is whole) stops at
    once: the log already holds that model's record (its evaluation, the run's peak memory), which no resume
    would write again (it has nothing left to train), in its own folder or beside another run's files."""
    run = shutil.copytree(four_steps, tmp_path / "run") if beside else tmp_path / "run"
    monkeypatch.setattr(train_gpt2, "save_checkpoint", saved_then_interrupted)
    code, _, err = run_in_process(*RUN, "--input_file", text_file, "--out_dir", run, "--max_steps", "3",
                                  cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 130 and err.startswith("interrupted: stopped at once"), err
    assert load_checkpoint(str(run / "ckpt.pt"))["steps_done"] == 3
    assert [r["step"] for r in read_log(run)] == [0, 1, 2, 3] and not (run / "log.new.jsonl").exists()
    assert {"val_loss", "peak_memory_bytes"} <= read_log(run)[-1].keys()


def test_a_signal_during_the_first_checkpoints_write_is_answered_by_what_the_folder_holds(tmp_path, four_steps):
    """A first signal that comes while a fresh run's first checkpoint is written is answered once the file is
    whole (SignalsHeld), before the training loop says the checkpoint is written: the answer asks the folder (the
    checkpoint's identity), so it does not promise to keep the other run's checkpoint, already replaced."""
    run = shutil.copytree(four_steps, tmp_path / "run")
    with machinery.run_log.RunLog(train_gpt2.TrainConfig(out_dir=str(run)), 0) as log:
        assert log.other_checkpoint_kept()
        save_checkpoint(load_checkpoint(str(run / "ckpt.pt")), str(run / "ckpt.pt"))  # (this run's, say)
        assert log.keeps_other_checkpoint and not log.other_checkpoint_kept()


def test_the_first_signal_says_whether_the_stop_will_save(capfd, monkeypatch):
    """The first Ctrl-C or SIGTERM is answered at once: with what the stop will do to out_dir's checkpoint,
    and what a second signal does (under torchrun a second SIGTERM is the first again: torchrun's timeout
    is what ends the processes then)."""
    monkeypatch.delenv("RANK", raising=False)
    say_stopping(signal.SIGTERM)
    say_stopping(signal.SIGINT, "run")
    monkeypatch.setenv("RANK", "0")
    say_stopping(signal.SIGTERM)
    assert capfd.readouterr().err.splitlines() == [
        "SIGTERM: stopping after this step, with a checkpoint; a second Ctrl-C or SIGTERM stops at once, "
        "without saving",
        f"SIGINT: stopping after this step, without saving over {os.path.join('run', 'ckpt.pt')}, another run's "
        "(unless a checkpoint of this run falls due first); a second Ctrl-C or SIGTERM stops at once, without saving",
        "SIGTERM: stopping after this step, with a checkpoint; torchrun ends the processes, saved or not, after "
        "its --shutdown-timeout (30 s unless set)"]


def test_export_loads_in_transformers_and_checkpoint_samples(tmp_path, text_file):
    from transformers import GPT2LMHeadModel

    args = (*RUN, "--input_file", text_file, "--max_steps", "3", "--out_dir", "run")
    r = run_script(*args, "--export_dir", "hf", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ours = train_gpt2.GPT(train_gpt2.GPTConfig(**load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["model_config"]))
    ours.load_state_dict(load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["model"])
    idx = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        assert (ours.eval()(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4

    sampled = run_script(*args, "--resume", "--max_steps", "0", "--num_samples", "2", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    assert len([l for l in sampled.stdout.splitlines() if l.startswith("> Hello")]) == 2
    assert "| loss" not in sampled.stdout


def test_an_export_into_the_folder_the_run_starts_from_is_refused(tmp_path, text_file, hf_gpt2_dir, monkeypatch,
                                                                  capsys):
    """--export_dir naming the save_pretrained folder --init_from reads (however the path is written) would
    replace the model a fine-tuning started from with its result: one line before anything is built."""
    source, _ = hf_gpt2_dir()
    before = {path.name: digest(path) for path in source.iterdir()}
    capsys.readouterr()  # (save_pretrained's progress)
    for export_dir in (source, f"{source}/../{source.name}/"):
        code, out, err = run_in_process("--init_from", source, "--export_dir", export_dir, "--input_file", text_file,
                                        "--B", "2", "--T", "16", "--max_steps", "1", "--out_dir", "run",
                                        cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
        assert code == 1 and err == (f"error: --export_dir {str(export_dir)!r} is the folder --init_from reads: the "
                                     "export would replace the model this run starts from: choose another folder\n")
    assert {path.name: digest(path) for path in source.iterdir()} == before and not (tmp_path / "run").exists()
    # a resume's --init_from is the run's, from its checkpoint: the export into it is refused there
    tuning = ("--input_file", text_file, "--B", "2", "--T", "16", "--num_samples", "0", "--out_dir", "run")
    code, _, err = run_in_process("--init_from", source, *tuning, "--max_steps", "1", cwd=tmp_path,
                                  monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    code, _, err = run_in_process(*tuning, "--resume", "--max_steps", "2", "--export_dir", source, cwd=tmp_path,
                                  monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and "is the folder --init_from reads: the export would replace the model" in err
    assert {path.name: digest(path) for path in source.iterdir()} == before


def test_an_export_that_fails_leaves_the_model_there_as_it_was(tmp_path, text_file, monkeypatch, capsys):
    """The export is made in a folder of its own and moved in whole: a disk that fills up while the weights
    are written is one line, and the model exported before is still the one there (and loads); an export
    folder the failed export made is gone again. (Its files have the umask's modes: safetensors alone would
    make the weights readable by their owner only.)"""
    import safetensors.torch
    from safetensors import SafetensorError

    args = (*RUN, "--input_file", text_file, "--max_steps", "2", "--out_dir", "run", "--export_dir", "hf")
    code, out, _ = run_in_process(*args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "\nexported to hf\n" in out
    # exporting again, with nothing to train (no plan line said it would): the end says the model there was replaced
    code, out, _ = run_in_process("--init_from", "run/ckpt.pt", "--max_steps", "0", "--num_samples", "0",
                                  "--export_dir", "hf", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "\nexported to hf (the model that was there replaced)\n" in out
    exported = {path.name: digest(path) for path in (tmp_path / "hf").iterdir()}
    assert set(exported) == {"config.json", "model.safetensors"}
    modes = {path.stat().st_mode for path in (tmp_path / "hf").iterdir()}
    assert len(modes) == 1 and modes.pop() & 0o044 == 0o644 & ~current_umask() & 0o044

    def disk_full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"the first bytes of the weights")
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    (tmp_path / "hf" / ".export-killed").mkdir()  # what an export killed half way leaves: cleared by the next
    (tmp_path / "hf" / ".export-killed" / "model.safetensors").write_bytes(b"half")
    code, out, err = run_in_process(*args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert "exports to hf at the end (replacing the model there)" in out
    assert code == 1 and err == ("error: could not export to 'hf': Error while serializing: No space left on device "
                                 "(os error 28); nothing there was changed\n")
    assert {path.name: digest(path) for path in (tmp_path / "hf").iterdir()} == exported
    assert not [p for p in tmp_path.rglob(".export*")]  # no half-made folder left
    code, _, err = run_in_process(*args[:-1], "new/hf", "--resume", cwd=tmp_path, monkeypatch=monkeypatch,
                                  capsys=capsys)  # (nothing to train: the export at once)
    assert code == 1 and "could not export to 'new/hf'" in err and not (tmp_path / "new").exists()

    def ctrl_c(tensors, path, metadata=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", ctrl_c)  # (a Ctrl-C during the export: the same)
    code, _, err = run_in_process(*args[:-1], "new/hf", "--resume", cwd=tmp_path, monkeypatch=monkeypatch,
                                  capsys=capsys)
    assert code == 130 and "stopped at once" in err and not (tmp_path / "new").exists()


def current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_float16_resume_restores_the_grad_scaler(tmp_path, text_file, monkeypatch, capsys):
    """float16 training scales the loss by a factor the GradScaler adapts: it doubles after every
    growth_interval steps without overflow, and halves (skipping that step) on an overflow. A resumed
    run carries on with the saved scaler: after every step the same scaler state, and the same losses
    and norms, as a run that was never interrupted.

    PyTorch's growth_interval is 2000 steps; the test sets 2 (in the GradScaler the script builds, which
    also records its state after each step), so that 6 steps see the scale grow twice, overflow (inf
    norm, step skipped) and back off. A resume with a fresh scaler would run step 3 at the initial scale
    and step 4 without the overflow."""
    states = []

    class RecordingScaler(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, growth_interval=2, **kwargs)

        def update(self, new_scale=None):
            super().update(new_scale)
            states.append(self.state_dict())

    monkeypatch.setattr(torch.amp, "GradScaler", RecordingScaler)
    args = [*RUN, "--input_file", str(text_file), "--dtype", "float16", "--max_steps", "6", "--num_samples", "0",
            "--checkpoint_interval", "3", "--eval_interval", "6", "--eval_iters", "2"]  # evaluated at steps 0 and 6
    assert main([*args, "--out_dir", str(tmp_path / "ref")]) == 0
    ref_log, ref_states = read_log(tmp_path / "ref"), states[:]
    # the premise: the scale grew, then an overflow made it back off
    scales = [s["scale"] for s in ref_states]
    assert scales[0] < scales[3] and any(math.isinf(r["norm"]) for r in ref_log[3:6]), scales

    step_line = machinery.console.step_line

    def stop_at_4(record, *a):
        if record["step"] == 4:
            raise KeyboardInterrupt  # killed: the last checkpoint holds 3 steps done
        return step_line(record, *a)

    with monkeypatch.context() as m:
        m.setattr(train_gpt2, "step_line", stop_at_4)
        assert main([*args, "--out_dir", str(tmp_path / "run")]) == 130  # (a second Ctrl-C: at once, one line)
    assert capsys.readouterr().err == (f"interrupted: stopped at once, saving and exporting nothing more; "
                                       f"{tmp_path / 'run' / 'ckpt.pt'} holds the last checkpoint written, if any\n")
    assert load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["scaler"] == ref_states[2]  # saved after step 2
    states.clear()
    assert main([*args, "--out_dir", str(tmp_path / "run"), "--resume"]) == 0
    assert states == ref_states[3:]  # steps 3, 4 and 5
    assert load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["scaler"] == ref_states[-1]
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == list(range(7))  # steps 0-5 trained, and the final evaluation
    assert [(r["step"], r.get("loss"), r.get("norm"), r.get("val_loss")) for r in log] == \
        [(r["step"], r.get("loss"), r.get("norm"), r.get("val_loss")) for r in ref_log]


# ----------------------------------------------------------------------------- a full disk


def test_disk_full_at_a_checkpoint_is_one_line_and_the_same_command_continues(tmp_path, text_file, monkeypatch,
                                                                             capsys):
    """The disk fills while the second periodic checkpoint is written, the way torch's zip writer reports
    it: an OSError (errno 27, EFBIG) and, while handling it, a RuntimeError ("unexpected pos"). The run
    stops with one line that names the checkpoint; the first checkpoint is as it was, no temporary file
    is left, and the same command with --resume continues from it to the end."""
    out = tmp_path / "run"
    args = [*RUN, "--input_file", str(text_file), "--out_dir", str(out), "--max_steps", "6",
            "--checkpoint_interval", "2"]
    save, saved = torch.save, []

    def full_at_the_second_checkpoint(obj, f):
        if not saved:
            saved.append(digest(out / "ckpt.pt") if (out / "ckpt.pt").exists() else None)
            return save(obj, f)
        saved.append(digest(out / "ckpt.pt"))
        f.write(b"PK\x03\x04" + bytes(4096))  # what fitted
        try:
            raise OSError(errno.EFBIG, "File too large")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4096")

    with monkeypatch.context() as m:
        m.setattr(machinery.checkpoints.torch, "save", full_at_the_second_checkpoint)
        assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: disk full: writing {out / 'ckpt.pt'} failed (File too large)"), err
    assert "--resume" in err
    assert saved[0] is None and digest(out / "ckpt.pt") == saved[1]  # the checkpoint after 2 steps, untouched
    assert load_checkpoint(str(out / "ckpt.pt"))["steps_done"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "log.jsonl", "progress.png"]  # no ckpt.pt.tmp

    assert main([*args, "--resume"]) == 0  # space freed: the same command continues
    assert "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in read_log(out)] == list(range(7))  # steps 0-5, and the final evaluation
    assert load_checkpoint(str(out / "ckpt.pt"))["steps_done"] == 6


def test_a_second_run_into_a_folder_another_run_is_writing_is_refused(tmp_path, text_file, four_steps, monkeypatch,
                                                                       capsys):
    """Two runs writing one out_dir would overwrite each other's checkpoint and log: the second is refused
    in one line (the first holds a lock on the folder while it writes; held here as the first run would),
    before it builds a model (a fresh run: before it prints a line; a resume: once its checkpoint says it
    trains), and the folder's files are untouched. A resume with no steps left only samples, and may; once
    the first run has ended, the same command runs."""
    shutil.copytree(four_steps, tmp_path / "run")
    before = {p.name: digest(p) for p in (tmp_path / "run").iterdir()}
    first = machinery.files.lock_folder(str(tmp_path / "run"))
    refused = "error: another run is writing 'run' now: wait for it to end, or choose another --out_dir\n"
    fresh = (*RUN, "--input_file", text_file, "--max_steps", "6", "--out_dir", "run")
    code, out, err = run_in_process(*fresh, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err == refused and out == ""
    for writes_nothing in (["--max_steps", "0", "--num_samples", "1"], ["--eval_only", "--eval_iters", "1"]):
        code, out, err = run_in_process(*fresh, *writes_nothing, "--max_new_tokens", "2", cwd=tmp_path,
                                        monkeypatch=monkeypatch, capsys=capsys)  # (sampling or evaluating: may)
        assert code == 0, err
    args = (*fresh, "--resume")
    code, out, err = run_in_process(*args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err == refused and "model" not in out  # (only the device line: no model built)
    code, out, err = run_in_process(*args, "--max_steps", "4", "--num_samples", "1", "--max_new_tokens", "2",
                                    cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)  # (the last --max_steps)
    assert code == 0 and out.splitlines()[-1].startswith("> "), err
    assert {p.name: digest(p) for p in (tmp_path / "run").iterdir()} == before
    os.close(first)
    code, _, err = run_in_process(*args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err


def test_every_process_asks_for_the_folder_before_the_run_and_the_probes_never_meet(tmp_path, monkeypatch):
    """The early probe of out_dir's lock is every process's (under torchrun each meets another run's lock alike,
    and it is said once: a SettingError), with a shared lock: one process's probe never stops another's, and
    none is left held for rank 0's own (exclusive) lock."""
    held = machinery.files.lock_folder(str(tmp_path))  # another run's
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(machinery.files.SettingError, match="another run is writing"):
            machinery.files.check_folder_free(str(tmp_path))
    os.close(held)
    probing = machinery.files.lock_folder(str(tmp_path), shared=True)  # another process's probe, in the middle
    machinery.files.check_folder_free(str(tmp_path))  # (no error: probes do not meet)
    os.close(probing)
    machinery.files.check_folder_free(str(tmp_path))  # free again: no error, and no lock left held by the probe
    os.close(machinery.files.lock_folder(str(tmp_path)))


def test_a_folder_on_a_file_system_without_locks_is_written_unlocked(tmp_path, monkeypatch):
    """Some file systems (NFS without its lock service) refuse flock: lock_folder then holds no lock
    (None, as on Windows) and closes the folder's handle, rather than stop every run written there."""
    import errno
    import fcntl

    handles = []

    def no_locks(handle, operation):
        handles.append(handle)
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert machinery.files.lock_folder(str(tmp_path)) is None
    with pytest.raises(OSError):  # closed: no handle leaks
        os.fstat(handles[0])


def test_a_disk_with_less_room_than_a_checkpoint_is_said_before_training(tmp_path, text_file, monkeypatch, capsys):
    """The checkpoint's size is known before the first step (12 bytes a parameter): a disk with less free
    space than that stops the run there, in one line, not after hours of training at its first save."""
    usage = machinery.files.shutil.disk_usage
    monkeypatch.setattr(machinery.files.shutil, "disk_usage", lambda path: usage(path)._replace(free=10 ** 6))
    code, out, err = run_in_process(*RUN, "--input_file", text_file, "--max_steps", "2", "--out_dir", "run",
                                    cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err == ("error: --out_dir 'run' has 1.0 MB free, less than the run's checkpoints need "
                                 "(about 19.6 MB): free some space, or choose another --out_dir\n")
    assert "step    0" not in out and not (tmp_path / "run" / "ckpt.pt").exists()
    # an --export_dir with less room than the export (4 bytes a parameter) too, before training, not after it
    (tmp_path / "exported").mkdir()
    monkeypatch.setattr(machinery.files.shutil, "disk_usage",
                        lambda path: usage(path)._replace(free=10 ** 6 if path.endswith("exported") else 10 ** 9))
    code, out, err = run_in_process(*RUN, "--input_file", text_file, "--max_steps", "2", "--out_dir", "run",
                                    "--export_dir", "exported", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err == ("error: --export_dir 'exported' has 1.0 MB free, less than the export needs (about "
                                 "6.5 MB): free some space, or choose another folder\n")
    assert "step    0" not in out and not (tmp_path / "run" / "ckpt.pt").exists()
    # a run that saves twice (at step 1, then at 2) needs room for its second checkpoint while its first is
    # there (written whole before it replaces the first), less what a checkpoint out_dir holds now frees when
    # the first replaces it; a run that saves once, or a resume (its checkpoint there already), needs one
    monkeypatch.setattr(machinery.files.shutil, "disk_usage", lambda path: usage(path)._replace(free=25 * 10 ** 6))
    twice = (*RUN, "--input_file", text_file, "--max_steps", "2", "--out_dir", "run", "--checkpoint_interval", "1")
    for made_first, room in (([], "39.3 MB"), (["--n_embd", "16", "--max_steps", "1"], "29.5 MB")):
        if made_first:  # another run's checkpoint, smaller (9.9 MB): it frees less than this run's second needs
            assert run_in_process(*twice, *made_first, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)[0] == 0
        code, out, err = run_in_process(*twice, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
        assert code == 1 and err == ("error: --out_dir 'run' has 25.0 MB free, less than the run's checkpoints need "
                                     f"(about {room}, two at once: the last one is replaced only once the next is "
                                     "whole): free some space, or choose another --out_dir\n")
    for args in (("--checkpoint_interval", "2"), (), ("--resume", "--max_steps", "4")):  # once; twice; a resume
        code, out, err = run_in_process(*twice, *args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
        assert code == 0, err


@pytest.mark.parametrize("fills", ["ckpt.pt", "log.jsonl"])
def test_a_full_disk_before_a_runs_first_checkpoint_says_to_start_again_not_to_resume(tmp_path, text_file, four_steps,
                                                                                      monkeypatch, capsys, fills):
    """A fresh run whose first checkpoint, or first log record, finds the disk full has nothing to resume
    from: the line says to run the command again. (Beside another run's files: its checkpoint is not this
    run's either.)"""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    for out_dir in ("fresh", "beside"):
        if out_dir == "beside":
            shutil.copytree(four_steps, tmp_path / out_dir)
        with monkeypatch.context() as m:
            if fills == "ckpt.pt":
                m.setattr(machinery.checkpoints.torch, "save", full)
            else:
                m.setattr(machinery.run_log.json, "dumps", full)
            code, _, err = run_in_process(*RUN, "--input_file", text_file, "--out_dir", out_dir, "--max_steps", "2",
                                          cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
        assert code == 1 and err.count("\n") == 1, err
        assert err.startswith("error: disk full: writing ") and err.endswith(
            "(No space left on device); no checkpoint of this run was saved yet: free some space and run the same "
            "command again\n"), err


# A real limit on file size (what `ulimit -f` sets): a write past it fails with errno 27, EFBIG, as on a
# full disk (Python ignores the SIGXFSZ signal that would otherwise kill the process)
FILE_SIZE_LIMIT = """import os, resource, runpy, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = sys.argv[2:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("fills", ["ckpt.pt", "log.jsonl"])
def test_a_file_that_cannot_grow_is_one_line_and_the_checkpoint_stays(tmp_path, text_file, four_steps, monkeypatch,
                                                                      fills):
    """Not a stand-in: the process may not write files past a size limit, and torch.save or the log's
    append meets the real error. A resume of four_steps' run to step 6 (its checkpoint: 20 MB; its
    log: 5 records, steps 0-3 and the final evaluation at step 4, whose place the resume's first record
    takes) under a limit of 4 MB, which the checkpoint cannot take, or of the log's size plus 50 bytes,
    which the log with step 4's training record cannot. One line naming the file, the checkpoint byte for byte as
    it was, no temporary file; then, without the limit, the same command finishes the run."""
    pytest.importorskip("resource")  # POSIX only
    shutil.copytree(four_steps, tmp_path / "run")
    ckpt = tmp_path / "run" / "ckpt.pt"
    before = digest(ckpt)
    limit = 4_000_000 if fills == "ckpt.pt" else (tmp_path / "run" / "log.jsonl").stat().st_size + 50
    args = (*RUN, "--input_file", text_file, "--max_steps", "6", "--out_dir", "run", "--resume")
    r = run_script(*args, cwd=tmp_path, runner=[sys.executable, "-c", FILE_SIZE_LIMIT, str(limit)])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: disk full: writing {os.path.join('run', fills)} failed (File too large)"), \
        r.stderr
    assert r.stderr.count("\n") == 1
    assert digest(ckpt) == before
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
    monkeypatch.chdir(tmp_path)
    assert main(list(map(str, args))) == 0  # the same command, in this process (its start-up is slow)
    assert [r["step"] for r in read_log(tmp_path / "run")] == list(range(7))
    assert load_checkpoint(str(ckpt))["steps_done"] == 6


def test_a_full_disk_when_a_resume_first_writes_its_log_says_to_resume_again(tmp_path, text_file, four_steps,
                                                                              monkeypatch, capsys):
    """The resume writes its log again before its first step (the records before its checkpoint): a full disk
    there is the same one line as later in the run, with what to do, and the log as it was."""
    shutil.copytree(four_steps, tmp_path / "run")
    before = digest(tmp_path / "run" / "log.jsonl")

    def disk_full(path, write):
        raise machinery.files.DiskFull(f"disk full: writing {path} failed (No space left on device)")

    monkeypatch.setattr(machinery.run_log, "write_atomically", disk_full)
    code, _, err = run_in_process(*RUN, "--input_file", text_file, "--max_steps", "6", "--out_dir", "run", "--resume",
                                  cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err == ("error: disk full: writing run/log.jsonl failed (No space left on device); the last "
                                 "checkpoint is intact: free some space and continue with --resume\n")
    assert digest(tmp_path / "run" / "log.jsonl") == before


def test_a_resume_skips_damaged_log_lines_as_it_skips_a_half_written_one(tmp_path, text_file, four_steps, monkeypatch,
                                                                         capsys):
    """four_steps' log (steps 0-3, and step 4's final evaluation) with damaged lines among its records:
    bytes that are not UTF-8, a record whose step is text, one that is not an object. The resume keeps
    the records it can read, drops the rest as it drops a line a killed run left half-written, and its
    picture is drawn from the same log."""
    shutil.copytree(four_steps, tmp_path / "run")
    log = tmp_path / "run" / "log.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:2]) + b'{"step": 1, "loss": \xff\xfe}\n' + b'{"step": "2", "loss": 1.0}\n'
                    + b"[3]\n" + b"".join(lines[2:]) + b'{"step": 4, "lo')
    code, _, err = run_in_process(*RUN, "--input_file", text_file, "--max_steps", "6", "--out_dir", "run", "--resume",
                                  cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "Traceback" not in err, err
    assert [r["step"] for r in read_log(tmp_path / "run")] == list(range(7))
    assert (tmp_path / "run" / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_resume_from_another_folder_finds_the_runs_data(tmp_path, text_file, monkeypatch, capsys):
    """The run read t.txt in its folder; its resume, started in another folder and naming no data, reads
    the same file (the checkpoint keeps the path absolute), and trains on."""
    (tmp_path / "a").mkdir()
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(text_file, tmp_path / "a" / "t.txt")
    code, _, err = run_in_process(*RUN, "--input_file", "t.txt", "--max_steps", "2", "--out_dir", "run",
                                  cwd=tmp_path / "a", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    state = load_checkpoint(str(tmp_path / "a" / "run" / "ckpt.pt"))
    assert state["train_config"]["input_file"] == str(tmp_path / "a" / "t.txt")
    code, out, err = run_in_process("--out_dir", str(tmp_path / "a" / "run"), "--resume", "--max_steps", "3",
                                    "--num_samples", "0", "--device", "cpu", cwd=tmp_path / "elsewhere",
                                    monkeypatch=monkeypatch,
                                    capsys=capsys)
    assert code == 0, err
    assert [r["step"] for r in read_log(tmp_path / "a" / "run")] == [0, 1, 2, 3]


def test_a_resume_stopped_before_its_first_record_leaves_the_log_as_it_was(tmp_path, text_file, four_steps,
                                                                          monkeypatch, capsys):
    """The resume's first record takes the place of the run's last one (step 4's final evaluation, which it
    carries on); until it is written, the log is the finished run's, byte for byte: as a kill in the resume's
    first step finds it (a SIGKILL has no handler to mend it), and as a stop there leaves it."""
    import train_gpt2

    shutil.copytree(four_steps, tmp_path / "run")
    before = digest(tmp_path / "run" / "log.jsonl")
    during = []

    def interrupted(*args):
        during.append(digest(tmp_path / "run" / "log.jsonl"))  # (what a SIGKILL here would leave)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_gpt2, "forward_backward", interrupted)
    code, _, err = run_in_process(*RUN, "--input_file", text_file, "--max_steps", "8", "--out_dir", "run", "--resume",
                                  cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 130 and "stopped at once" in err, err
    assert during == [before] and digest(tmp_path / "run" / "log.jsonl") == before


def test_a_picture_that_cannot_be_written_is_one_line_and_the_run_goes_on(tmp_path, text_file, monkeypatch,
                                                                          capsys):
    """progress.png is only a picture of the log: when the disk cannot take it, each attempt (at every
    evaluation) says so in one line, and the run finishes, its checkpoint and log written."""
    import matplotlib.figure

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    out = tmp_path / "run"
    assert main([*RUN, "--input_file", str(text_file), "--out_dir", str(out), "--max_steps", "4",
                 "--eval_interval", "2"]) == 0
    stdout = capsys.readouterr().out
    line = f"could not draw progress.png: disk full: writing {out / 'progress.png'} failed (No space left on device)"
    said = [l for l in stdout.splitlines() if "progress.png" in l]
    assert said[0].startswith("writes ") and said[1:] == [line, line, line]  # the plan; then steps 0, 2 and 4
    size = machinery.files.in_units(os.path.getsize(out / "ckpt.pt"))
    assert stdout.splitlines()[-1].startswith(f"wrote {out / 'ckpt.pt'} ({size}), {out / 'log.jsonl'} | ")  # no picture
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "log.jsonl"]
    assert [r["step"] for r in read_log(out)] == [0, 1, 2, 3, 4]  # 4: the final evaluation


# ----------------------------------------------------------------------------- evaluating a checkpoint


def test_eval_only_on_other_batches_reads_the_runs_tokens_or_says_it_cannot(tmp_path, text_file, four_steps,
                                                                             monkeypatch, capsys):
    """An evaluation reads eval_iters x total_batch_size tokens (20 x 32 = 640 here, a run of B=2, T=16). At
    --B 4 (batches of 64) --eval_only reads those and prints the run's own val loss; at --B 3 (48) no whole
    number of batches makes 640, so it reads 624 and says so, rather than print another number silently."""
    shutil.copytree(four_steps, tmp_path / "run")
    last = read_log(tmp_path / "run")[-1]
    for B, note in (("4", None), ("3", "note: validation reads 624 tokens, not eval_iters x total_batch_size = 640, "
                                       "which B*T*processes = 48 does not divide: its loss compares only roughly")):
        code, out, _ = run_in_process(*RUN, "--input_file", text_file, "--out_dir", "run", "--resume", "--eval_only",
                                      "--B", B, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
        assert code == 0
        notes = [line for line in out.splitlines() if line.startswith("note: validation reads")]
        assert notes == [] if note is None else len(notes) == 1 and notes[0].startswith(note)
        if note is None:
            assert f"step     4 | val loss {last['val_loss']:.4f}" in out


def test_eval_only_of_a_checkpoint_prints_the_runs_last_evaluation_and_writes_nothing(tmp_path, text_file,
                                                                                    monkeypatch, capsys):
    """--resume --eval_only loads the checkpoint a run saved after its last step and evaluates it as
    that step did: the same `step 4 | val loss` line (the same batches, the same weights: the same
    number, to the last bit, as the run logged; both in this process, so on the same kernels), no
    training, no samples, and out_dir byte for byte as it was (its files and their contents)."""
    out = tmp_path / "run"
    args = [*RUN, "--input_file", str(text_file), "--max_steps", "4", "--num_samples", "0", "--out_dir", str(out)]
    assert main(args) == 0
    run_lines = [l for l in capsys.readouterr().out.splitlines() if "val loss" in l]
    last = read_log(out)[-1]  # the final evaluation: of the model after 4 steps, the one saved
    assert last.keys() == {"step", "val_loss", "peak_memory_bytes"} and last["step"] == 4
    assert run_lines[-1] == f"step     4 | val loss {last['val_loss']:.4f}"
    before = {p.name: digest(p) for p in out.iterdir()}
    evaluate, results = train_gpt2.evaluate, []
    monkeypatch.setattr(train_gpt2, "evaluate", lambda *a: results.append(evaluate(*a)) or results[-1])
    assert main([*args, "--num_samples", "1", "--resume", "--eval_only"]) == 0
    stdout = capsys.readouterr().out
    assert results == [{"val_loss": last["val_loss"]}]
    assert [l for l in stdout.splitlines() if "val loss" in l] == run_lines[-1:]
    assert "| loss" not in stdout and "> " not in stdout  # nothing trained, nothing sampled
    assert {p.name: digest(p) for p in out.iterdir()} == before
