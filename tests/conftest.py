"""Shared helpers. Everything here runs offline and on the CPU."""

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# A model small enough to train in a fraction of a second per step, on the CPU: the tests mean the CPU,
# and say so, so that they run the same on a machine with a GPU.
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "64", "--device", "cpu"]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# What torch's CPU allocator raises where RAM (or a `ulimit -v`) runs out: a RuntimeError, not torch's
# OutOfMemoryError (test_memory.py checks that a real allocation that fails is known by these words)
CPU_ALLOCATOR_FAILED = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                        "tried to allocate 4294967296 bytes. Error code 12 (Cannot allocate memory)")

# Scripts run by the tests use one thread. With two, a busy CPU sometimes sums a float32 reduction in
# another order: here one fresh process in ten printed step 0's loss 2e-6 off (10.811058 for 10.811056),
# and the tests compare separate runs to the last digit. One thread made 30 of 30 runs agree.
SCRIPT_ENV = {**OFFLINE_ENV, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread(request):
    """In-process runs use one thread too, for the reason SCRIPT_ENV gives (restored after each test);
    a test marked all_threads keeps them (compiling is slower on one)."""
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("all_threads") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    config.addinivalue_line("markers", "all_threads: the test runs with torch's default thread count")
    # torch.compile imports torch's own torch/utils/mkldnn.py, which still uses torch.jit.script_method
    # and warns at import; nothing of ours calls it, so the suite's output stays clean without it
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails, as on an air-gapped machine."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def shakespeare_sample(folder):
    """About 60 kB of the shipped Shakespeare, as folder/text.txt: ~15k tokens, enough for train and val."""
    path = folder / "text.txt"
    path.write_text((REPO / "input.txt").read_text()[:60_000])
    return path


@pytest.fixture
def text_file(tmp_path):
    return shakespeare_sample(tmp_path)


def die_with_pytest():
    """In the child, before it runs: the kernel sends it SIGTERM if pytest dies (torchrun, so told, stops
    its workers): a killed test run leaves no training behind. And SIGHUP at its default, as a command
    typed in a terminal has it: under `nohup pytest` it would be ignored, and a run keeps it ignored."""
    import ctypes

    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def descendants(pid):
    """The processes `pid` started, and theirs, from Linux's /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(command name)": state, ppid, ...
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def environment_of(pid):
    """A process's environment variables, from Linux's /proc ({} if it is gone or not ours to read)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(entry.decode(errors="replace").split("=", 1) for entry in entries if b"=" in entry)


class Launched:
    """A command in a session of its own, its output read line by line with deadlines. When a deadline
    passes, or the test is done with it (`with Launched(...) as run:`), it is killed with every process it
    started, torchrun's workers too: a hung collective fails its test within the deadline, and leaves
    nothing running."""

    def __init__(self, cmd, cwd, env_extra=None):
        self.proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **SCRIPT_ENV, **(env_extra or {})},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True, preexec_fn=die_with_pytest)
        self.lines, self.err = queue.Queue(), []  # stdout as it comes; stderr, all of it
        self.readers = [threading.Thread(target=self.read, args=(stream, sink), daemon=True)
                        for stream, sink in ((self.proc.stdout, self.lines.put), (self.proc.stderr, self.err.append))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def read(stream, sink):
        for line in stream:
            sink(line)
        sink(None)  # the end

    def wait_for(self, start, deadline_s):
        """The lines printed up to and including the first that starts with `start`."""
        lines, end = [], time.monotonic() + deadline_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"no line {start!r} within {deadline_s} s; printed: {''.join(lines)[-2000:]}")
            if line is None:
                raise AssertionError(f"ended before a line {start!r}: {''.join(lines)[-2000:]}{self.stderr()}")
            lines.append(line)
            if line.startswith(start):
                return lines

    def finish(self, deadline_s):
        """(exit code, the rest of stdout, stderr) once it ends; killed, and an AssertionError, after deadline_s."""
        try:
            code = self.proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {deadline_s} s: killed") from None
        for reader in self.readers:
            reader.join()
        rest = []
        while (line := self.lines.get()) is not None:
            rest.append(line)
        return code, "".join(rest), self.stderr()

    def wait_for_stderr(self, text, deadline_s):
        """Once stderr holds `text` (an AssertionError after deadline_s)."""
        end = time.monotonic() + deadline_s
        while text not in self.stderr():
            if time.monotonic() > end:
                self.kill()
                raise AssertionError(f"no {text!r} on stderr within {deadline_s} s: {self.stderr()[-2000:]}")
            time.sleep(0.01)

    def stderr(self):
        return "".join(line for line in self.err if line is not None)

    def send_signal(self, signum, to_descendants=False):
        """`signum` to the process; to_descendants: to each process it started too (torchrun's workers), as
        Slurm signals every process of a job step."""
        for pid in [self.proc.pid, *(descendants(self.proc.pid) if to_descendants else [])]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def kill(self):
        """SIGKILL to the process and all its descendants (torchrun starts each worker in a session of
        its own, out of reach of a signal to the group)."""
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def run_script(*args, cwd, timeout=300, env_extra=None, runner=None, script="train_gpt2.py"):
    """Run a script as a user would, on the CPU unless `args` name another --device (a later flag
    wins); returns a CompletedProcess with text output. Past `timeout` seconds it is killed, with any
    processes it started, and the test fails."""
    cpu = [] if script == "prepare.py" else ["--device", "cpu"]  # prepare.py has no device
    cmd = (runner or [sys.executable]) + [str(REPO / script), *cpu, *map(str, args)]
    with Launched(cmd, cwd, env_extra) as run:
        code, out, err = run.finish(timeout)
    return subprocess.CompletedProcess(cmd, code, out, err)


def run_in_process(*args, cwd, monkeypatch, capsys):
    """train_gpt2.main as `python train_gpt2.py --device cpu ARGS` run in `cwd` would run it, without
    starting a process (a second or two less): (exit code, stdout, stderr). A flag argparse refuses exits
    through SystemExit with its code; any other exception that escapes main fails the test."""
    from train_gpt2 import main

    monkeypatch.chdir(cwd)
    try:
        code = main(["--device", "cpu", *map(str, args)])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_process_and_two(tmp_path, *args):
    """The same run twice: one process with B=2, and torchrun's two CPU processes (gloo) with B=1 each,
    so the same total batch (args must fix it with --total_batch_size). Returns torchrun's stdout and
    both logs, as lists of records."""
    import json

    single = run_script(*args, "--B", "2", "--out_dir", "single", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ddp = run_script(*args, "--B", "1", "--out_dir", "ddp", cwd=tmp_path, runner=torchrun,
                     env_extra={"OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr
    assert "Warning" not in ddp.stderr, ddp.stderr  # (torch's deprecations included: a run's output stays clean)
    logs = [[json.loads(l) for l in (tmp_path / name / "log.jsonl").read_text().splitlines()]
            for name in ("single", "ddp")]
    return ddp.stdout, *logs


def step_losses(stdout):
    """{step: loss string} from the per-step lines."""
    out = {}
    for line in stdout.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if line.startswith("step") and len(parts) > 1 and parts[1].startswith("loss "):
            out[int(parts[0].split()[1])] = parts[1].split()[1]
    return out


@pytest.fixture
def hf_gpt2_dir(tmp_path_factory):
    """Factory: a random-weight transformers GPT-2 of the given shape, saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def make(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257, seed=0):
        torch.manual_seed(seed)
        config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                            vocab_size=vocab_size)
        model = GPT2LMHeadModel(config)
        path = tmp_path_factory.mktemp(f"hf_{n_layer}_{n_head}_{n_embd}")
        model.save_pretrained(path)
        return path, model.eval()

    return make


WORDS = ("the king queen castle night sword river crown ghost storm letter poison friend honest tomorrow, "
         "speak! why? 'tis 1603 Ünïcödé naïve — «quoted» 日本 <|endoftext|> \t tabs\nnew lines").split(" ")


def make_documents(n, seed=0, max_words=120):
    """n documents of random words (punctuation, digits, non-ASCII, a literal <|endoftext|>), some empty."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(0, max_words))) for _ in range(n)]


@pytest.fixture
def corpus_folder(tmp_path):
    """A folder with every kind of source file prepare.py reads, and the documents in reading order:
    a.txt (one document), b.jsonl (one per line), c.parquet (one per row), sub/d.txt."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    docs = make_documents(160, seed=1)
    (folder / "a.txt").write_text(docs[0], encoding="utf-8")
    with open(folder / "b.jsonl", "w", encoding="utf-8") as f:
        for d in docs[1:80]:
            f.write(json.dumps({"id": len(d), "text": d}) + "\n")
    pq.write_table(pa.table({"text": docs[80:159], "n": list(range(79))}), folder / "c.parquet")
    (folder / "sub" / "d.txt").write_text(docs[159], encoding="utf-8")
    (folder / "ignored.csv").write_text("not,a,source\n")
    return folder, docs


# Handmade items in the official format (extra fields as in the released jsonl; label an int)
CONTEXTS = [
    ("A man is sitting on a roof. He", ["starts pulling up roofing on a roof.", "is using wrap to wrap a pair of skis.",
                                        "is ripping level tiles off.", "is holding a rubik's cube."], 0),
    ("A woman pours water into a glass. She", ["drinks it slowly.", "paints the fence blue with a brush.",
                                               "drives the car to the moon and back again.", "sings."], 0),
    ("The chef slices an onion. Then he", ["puts the pieces in a pan.", "climbs a tree.",
                                           "reads a long novel about the sea and its many sailors.", "sleeps."], 0),
    ("Kids are playing football in a park. One of them", ["kicks the ball into the goal.", "flies.",
                                                          "becomes a teapot.", "writes a symphony for strings."], 1),
    ("A dog runs across the beach. It", ["chases a frisbee into the waves.", "files its taxes.",
                                         "opens a bank account at noon.", "barks."], 3),
    ("Two people are rowing a boat. They", ["row toward the shore.", "eat the oars.",
                                            "turn into birds.", "play chess on the water surface."], 2),
    ("A girl is brushing her hair. She", ["ties it into a ponytail.", "plants it.",
                                          "mails it to Paris in a small box.", "smiles."], 0),
]


def official(ctx, endings, label, i):
    return {"ind": i, "activity_label": "Test", "ctx_a": ctx, "ctx_b": "", "ctx": ctx, "split": "val",
            "split_type": "indomain", "label": label, "endings": endings, "source_id": f"test~{i}"}


@pytest.fixture
def items_file(tmp_path):
    """A HellaSwag jsonl file of the handmade items."""
    import json

    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(official(c, e, l, i)) + "\n" for i, (c, e, l) in enumerate(CONTEXTS)))
    return path
