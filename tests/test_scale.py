"""Bigger models on the hardware people have: --fsdp (FSDP2 over torchrun's processes, here CPU
processes over gloo), --activation_checkpointing, the memory a run needs said before it runs, a CUDA
out-of-memory error in one line, and torchrun across two machines (two launchers on this one)."""

import json
import os
import re
import signal
import socket
import sys

import pytest
import torch

from machinery.files import in_binary_units
from train_gpt2 import GPT, GPTConfig
from conftest import (CONTEXTS, REPO, TINY, Launched, descendants, environment_of, official, run_in_process,
                      run_script, step_losses)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# float32: the comparisons below are between arithmetic orders, not precisions
EXACT = ["--dtype", "float32", "--eval_interval", "2", "--eval_iters", "2", "--num_samples", "1",
         "--max_new_tokens", "4"]


def log(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def numbers(records, key):
    return [r[key] for r in records if key in r]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """The same 12 steps, 2 accumulation steps each: one process with B=4 ("single"); torchrun's two
    processes with --fsdp and B=2 each ("fsdp"), stopped by SIGTERM (as a scheduler stops a job) after
    step 3 or so and resumed under --fsdp; and one process cut after 2 steps ("plain") and resumed under
    --fsdp --cpu_offload. The learning rate is constant, so a run cut and resumed must equal one that never
    stopped. Every launch has a deadline: a hung collective fails the tests in minutes, its processes killed."""
    from train_gpt2 import main

    tmp = tmp_path_factory.mktemp("fsdp")
    (tmp / "text.txt").write_text((REPO / "input.txt").read_text()[:60_000])
    # 17 HellaSwag items: 9 for rank 0 (two batches of 8) and 8 for rank 1 (one), which must make the
    # same number of forward passes under FSDP
    items = [official(c, e, l, i) for i, (c, e, l) in enumerate((CONTEXTS * 3)[:17])]
    (tmp / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    # (--no-sdpa: the explicit attention, whose mask buffers rank 0 sends apart from the state dict)
    common = [*TINY, *EXACT, "--input_file", "text.txt", "--total_batch_size", "256", "--max_steps", "12", "--no-sdpa"]
    hellaswag = ["--hellaswag", "items.jsonl"]
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(tmp)
    torch.set_num_threads(1)
    try:  # the one-process runs in this process (seconds less than a new one)
        assert main([*common, *hellaswag, "--B", "4", "--out_dir", "single"]) == 0
        assert main([*common, "--B", "4", "--max_steps", "2", "--out_dir", "plain"]) == 0
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    with Launched([*TORCHRUN, str(REPO / "train_gpt2.py"), *common, *hellaswag, "--B", "2", "--fsdp",
                   "--out_dir", "fsdp"], tmp) as stopped:
        first = stopped.wait_for("step     3 | loss", deadline_s=120)
        # as Slurm stops a job: to torchrun, which passes it on to every process, and to each process itself
        # (here once the first has been answered, so that the two are not merged into one by the OS)
        stopped.send_signal(signal.SIGTERM)
        stopped.wait_for_stderr("SIGTERM: stopping after this step", deadline_s=60)
        stopped.send_signal(signal.SIGTERM, to_descendants=True)
        code, rest, err = stopped.finish(deadline_s=120)
    assert code != 0 and "interrupted: saved step" in rest, err
    assert err.count("SIGTERM: stopping after this step") == 1, err  # every process got it; rank 0 answers
    sharded = "".join(first) + rest
    resumed = {}
    # (recomputing activations changes nothing, all of each block or all but its matmuls; neither does
    # keeping the state in RAM)
    for name, extra in (("fsdp", ["--activation_checkpointing"]),
                        ("plain", ["--cpu_offload", "--activation_checkpointing", "selective"])):
        r = run_script(*common, "--B", "2", "--fsdp", "--resume", *extra, "--out_dir", name, cwd=tmp,
                       runner=TORCHRUN, timeout=300)
        assert r.returncode == 0, r.stderr
        resumed[name] = r
    return tmp, sharded, resumed


def test_fsdp_over_two_processes_gives_one_processs_losses(fsdp_runs):
    tmp, sharded, _ = fsdp_runs
    one, two = log(tmp / "single"), log(tmp / "fsdp")
    assert "FSDP over 2: a 1/2 share" in sharded and "x 2 processes x 2 accumulation steps" in sharded
    # and the share is what each process holds: every tensor split along its first dimension in two
    share = sum(-(-p.shape[0] // 2) * p[0].numel() for p in GPT(GPTConfig(block_size=64, n_layer=2, n_head=2,
                                                                           n_embd=32)).parameters())
    assert f"model state {in_binary_units(16 * share)} = weights {in_binary_units(4 * share)} " in sharded
    for key in ("loss", "val_loss"):
        assert numbers(two, key) == pytest.approx(numbers(one, key), abs=1e-4), key
    # the clipped global norm of all processes' gradients: float32 sums in another order drift with the
    # steps (1.1e-4 at step 11 of a norm near 1.1, seen once)
    assert numbers(two, "norm") == pytest.approx(numbers(one, "norm"), rel=1e-3)
    assert [r["step"] for r in two if "val_loss" in r] == list(range(0, 13, 2))
    # HellaSwag at the stopped run's evaluations (the resume, without --hellaswag, did the rest): all 17
    # items, each counted once
    hellaswag = [(r["step"], r["hellaswag_acc_norm"]) for r in two if "hellaswag_acc_norm" in r]
    assert hellaswag and hellaswag == [(r["step"], r["hellaswag_acc_norm"]) for r in one
                                       if r["step"] <= hellaswag[-1][0]
                                       and "hellaswag_acc_norm" in r]


def test_an_fsdp_run_stopped_by_sigterm_saves_and_resumes_under_fsdp_exactly(fsdp_runs):
    tmp, sharded, resumed = fsdp_runs
    stopped_at = int(re.search(r"interrupted: saved step (\d+) to fsdp/ckpt.pt", sharded).group(1))
    assert 3 < stopped_at < 12  # the step running when the signal came was finished, then saved
    assert f"resumed from fsdp/ckpt.pt at step {stopped_at}" in resumed["fsdp"].stdout
    assert [r["step"] for r in log(tmp / "fsdp")] == list(range(13))  # no step lost, none twice
    assert resumed["fsdp"].stdout.count("> Hello") == 1  # every process samples (FSDP needs all), rank 0 prints


def test_a_signal_to_one_process_stops_every_process_after_the_same_step(tmp_path):
    """A signal that reaches one of torchrun's processes only (a `kill` of its pid, a scheduler's agent): all of
    them stop after the same step, the largest of their stop flags taken each step, and the run saves. (The
    others waited forever in the next step's collectives, or trained on without it.)"""
    from machinery.checkpoints import load_checkpoint

    (tmp_path / "text.txt").write_text((REPO / "input.txt").read_text()[:60_000])
    args = [*TINY, "--input_file", "text.txt", "--B", "2", "--T", "16", "--max_steps", "300", "--num_samples", "0"]
    with Launched([*TORCHRUN, str(REPO / "train_gpt2.py"), *args], tmp_path, {"OMP_NUM_THREADS": "1"}) as run:
        run.wait_for("step     3 | loss", deadline_s=120)
        rank = {pid: environment_of(pid).get("RANK") for pid in descendants(run.proc.pid)}
        os.kill(next(pid for pid, r in rank.items() if r == "1"), signal.SIGTERM)  # rank 1's process, alone
        code, rest, err = run.finish(deadline_s=120)
    assert code != 0 and "interrupted: saved step" in rest, err
    assert 3 < load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))["steps_done"] < 300


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_a_torchrun_run_into_a_folder_another_run_writes_is_refused_in_one_line(tmp_path, resume):
    """Two processes started into an out_dir another run holds: each meets its lock before it builds a model,
    and the refusal is said once (a resume's rank 1, past the process group's start, waited for rank 0 in a
    collective, and then said "another process stopped first")."""
    from machinery.files import lock_folder

    (tmp_path / "text.txt").write_text((REPO / "input.txt").read_text()[:20_000])
    args = [*TINY, "--input_file", "text.txt", "--B", "2", "--T", "16", "--num_samples", "0"]
    if resume:  # (the run's first step, in one process; the other run holds the folder now)
        assert run_script(*args, "--total_batch_size", "64", "--max_steps", "1", cwd=tmp_path).returncode == 0
    else:
        (tmp_path / "out").mkdir()
    before = {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()}
    held = lock_folder(str(tmp_path / "out"))
    try:
        r = run_script(*args, "--max_steps", "3", *(["--resume"] if resume else []), cwd=tmp_path, runner=TORCHRUN,
                       env_extra={"OMP_NUM_THREADS": "1"}, timeout=300)
    finally:
        os.close(held)
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("error:")]  # (torchrun reports beside them)
    assert ours == ["error: another run is writing 'out' now: wait for it to end, or choose another --out_dir"], \
        r.stderr
    assert {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()} == before


def test_a_plain_checkpoint_resumes_under_fsdp_with_the_state_in_ram(fsdp_runs):
    tmp, _, resumed = fsdp_runs
    assert "resumed from plain/ckpt.pt at step 2" in resumed["plain"].stdout
    assert "memory in RAM (--cpu_offload): model state " in resumed["plain"].stdout
    assert "(FSDP over 2: a 1/2 share); this machine: " in resumed["plain"].stdout
    assert "with activation checkpointing (selective) (estimate)" in resumed["plain"].stdout
    for key in ("loss", "val_loss"):
        assert numbers(log(tmp / "plain"), key) == pytest.approx(numbers(log(tmp / "single"), key), abs=1e-4), key


def test_an_fsdp_checkpoint_is_the_plain_file_one_process_reads(fsdp_runs, monkeypatch, capsys):
    tmp, _, resumed = fsdp_runs
    ckpt = torch.load(tmp / "fsdp" / "ckpt.pt", weights_only=True)  # written under FSDP at the end
    single = torch.load(tmp / "single" / "ckpt.pt", weights_only=True)
    assert ckpt["model"].keys() == single["model"].keys()
    assert ckpt["model"]["lm_head.weight"].data_ptr() == ckpt["model"]["transformer.wte.weight"].data_ptr()  # tied
    assert ckpt["optimizer"]["state"].keys() == single["optimizer"]["state"].keys()  # by name, in every mode
    # one plain process evaluates it with the run's own B (2): the FSDP run's last validation loss (the same
    # tokens: eval_iters steps of total_batch_size, read in twice the batches of 2 processes)
    code, out, err = run_in_process("--resume", "--eval_only", "--out_dir", tmp / "fsdp", "--input_file", "text.txt",
                                    "--dtype", "float32", "--eval_iters", "2", cwd=tmp, monkeypatch=monkeypatch,
                                    capsys=capsys)
    assert code == 0, err
    printed = float(re.search(r"step    12 \| val loss (\S+)", out).group(1))
    assert printed == pytest.approx(log(tmp / "fsdp")[-1]["val_loss"], abs=1e-4)
    # and the HellaSwag command and the export read it as any checkpoint
    import hellaswag

    assert hellaswag.main(["--out_dir", str(tmp / "fsdp"), "--data", str(tmp / "items.jsonl"), "--device", "cpu"]) == 0
    code, out, err = run_in_process("--resume", "--max_steps", "0", "--num_samples", "0", "--out_dir", tmp / "fsdp",
                                    "--export_dir", tmp / "exported", cwd=tmp, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and (tmp / "exported" / "model.safetensors").exists(), err


def test_fsdp_without_torchrun_is_one_line(tmp_path, monkeypatch, capsys):
    code, out, err = run_in_process("--fsdp", "--max_steps", "1", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("error: --fsdp splits the model's state across processes: start two or more with torchrun")


@pytest.fixture
def group_of_one():
    """A process group of this one process, as --cpu_offload makes without torchrun (FSDP needs one)."""
    import gc

    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    gc.collect()  # FSDP's modules hold the group
    dist.destroy_process_group()


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))


def test_cpu_offload_in_one_process_trains_as_without_it_and_resumes_either_way(tmp_path, monkeypatch, capsys):
    """--cpu_offload without torchrun: FSDP2 over a group of one process, each Block its own unit and the
    state in RAM, on the run's device (here the CPU). Four steps of two micro-batches each, float32: the
    same losses, validation losses and norms as without the flag (1e-5), and its checkpoint resumes
    without the flag, as a plain one resumes with it."""
    import train_gpt2

    (tmp_path / "text.txt").write_text((REPO / "input.txt").read_text()[:60_000])
    sharded, shard = [], train_gpt2.shard_model
    monkeypatch.setattr(train_gpt2, "shard_model", lambda model, *args: sharded.append(model) or shard(model, *args))
    common = [*TINY, *EXACT, "--input_file", "text.txt", "--B", "2", "--total_batch_size", "128", "--num_samples", "0"]

    def run(name, *args):
        code, out, err = run_in_process(*common, "--out_dir", name, *args, cwd=tmp_path, monkeypatch=monkeypatch,
                                        capsys=capsys)
        assert code == 0, err
        return out

    run("plain", "--max_steps", "4")
    out = run("offloaded", "--max_steps", "2", "--cpu_offload")
    assert "memory in RAM (--cpu_offload): model state 25.0 MiB = " in out and "(one process); this machine" in out
    run("offloaded", "--max_steps", "4", "--resume")  # without the flag
    run("back", "--max_steps", "2")
    run("back", "--max_steps", "4", "--resume", "--cpu_offload")
    assert len(sharded) == 2
    for key, tolerance in (("loss", dict(abs=1e-5)), ("val_loss", dict(abs=1e-5)), ("norm", dict(rel=1e-5))):
        for name in ("offloaded", "back"):
            assert numbers(log(tmp_path / name), key) == pytest.approx(numbers(log(tmp_path / "plain"), key),
                                                                        **tolerance), (name, key)
    # what ran: each Block a unit of its own, the root one more, every weight kept on the mesh of the run's device
    from torch.distributed.fsdp import FSDPModule

    model = sharded[0]
    assert all(isinstance(block, FSDPModule) for block in model.transformer.h) and isinstance(model, FSDPModule)
    assert {p.device_mesh.device_type for p in model.parameters()} == {"cpu"} and model.offloaded


def test_fsdp_reduces_gradients_once_per_step_and_offload_after_every_micro_batch(group_of_one):
    """The mechanism, not only the numbers: plain FSDP keeps each micro-batch's gradients unreduced
    until the step's last (the sharded gradients appear only then); offloaded, every micro-batch's
    gradients go to the CPU shards at once, so the GPU never holds a whole model's gradients."""
    from contextlib import nullcontext

    from machinery.sharding import shard_model
    from train_gpt2 import DataLoaderLite, forward_backward

    class Watched(DataLoaderLite):  # notes, as each micro-batch starts, whether reduced gradients exist
        def next_batch(self):
            self.seen.append(any(p.grad is not None for p in model.parameters()))
            return super().next_batch()

    for cpu_offload, expected in ((False, [False, False, False]), (True, [False, True, True])):
        model = tiny_gpt()
        shard_model(model, model.transformer.h, "cpu", cpu_offload)
        loader = Watched(2, 16, input_file=str(REPO / "input.txt"))
        loader.seen = []
        forward_backward(model, model, loader, 3, nullcontext(), torch.amp.GradScaler("cpu", enabled=False), "cpu")
        assert loader.seen == expected, cpu_offload
        assert all(p.grad is not None for p in model.parameters())  # all reduced once the step is done


def test_fsdp_shards_on_the_runs_device_even_where_cuda_exists(group_of_one, monkeypatch):
    """CPU processes (--device cpu) on a machine with GPUs: without a mesh, fully_shard would pick CUDA."""
    from machinery.sharding import shard_model

    if torch.version.cuda and not torch.cuda.is_available():
        pytest.skip("a CUDA build of torch without a GPU: NCCL refuses the GPUs this test pretends there are")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch._C, "_get_accelerator", lambda: torch.device("cuda"))  # fully_shard's default
    model = tiny_gpt()
    shard_model(model, model.transformer.h, "cpu", cpu_offload=False)
    assert {p.device_mesh.device_type for p in model.parameters()} == {"cpu"}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def peak_mb(result):
    """{rank: MB} from tests/run_measuring_memory.py's lines."""
    return {int(r): float(mb) for r, mb in re.findall(r"peak_mb (\d+) ([\d.]+)", result.stdout)}


def test_fsdp_needs_measurably_less_memory_per_process_than_ddp(tmp_path):
    """A model whose state dominates (16 blocks, 25.5M parameters: 408 MB of weights, gradients and moments;
    B=1, T=16): under DDP each process holds all of it, under FSDP its half plus the units in use. Measured as
    each process's peak resident memory above what it held before training, the whole run: rank 0 builds
    the model and sends the others their shares, and holds the full state gathered from all to write the
    checkpoint (on GPUs in the host's memory, not the GPU's; here both are the RAM)."""
    (tmp_path / "text.txt").write_text((REPO / "input.txt").read_text()[:20_000])
    args = ["--n_layer", "16", "--n_head", "4", "--n_embd", "256", "--block_size", "64", "--B", "1", "--T", "16",
            "--max_steps", "2", "--eval_iters", "1", "--num_samples", "0", "--input_file", "text.txt"]
    ddp, fsdp = (run_script(*args, *extra, cwd=tmp_path, runner=TORCHRUN, script="tests/run_measuring_memory.py")
                 for extra in (["--out_dir", "ddp"], ["--fsdp", "--out_dir", "fsdp"]))
    assert ddp.returncode == 0 and fsdp.returncode == 0, ddp.stderr + fsdp.stderr
    ddp_mb, fsdp_mb = peak_mb(ddp), peak_mb(fsdp)
    assert len(ddp_mb) == len(fsdp_mb) == 2, ddp.stdout[-300:] + fsdp.stdout[-300:] + fsdp.stderr[-500:]
    print(f"peak MB above start, per rank: DDP {ddp_mb}, FSDP {fsdp_mb}")
    # the process that does not save: half of DDP's state, plus the root unit (the 51 MB token table and
    # its gradient) gathered whole for forward and backward (measured: 0.65 of a DDP process)
    assert fsdp_mb[1] < 0.8 * ddp_mb[1]
    assert fsdp_mb[0] < ddp_mb[0]  # rank 0, which gathers the whole state to save it, still less


def test_under_fsdp_one_process_builds_the_model_and_sampling_needs_no_whole_copy(tmp_path):
    """Two CPU processes under --fsdp, a model of 228M parameters (868 MiB of float32 weights in 64 blocks:
    a shape where it shows) that only samples, in bf16 autocast. Rank 0 builds the weights and sends rank
    1 its half, so rank 1 never holds them all: its peak is its half, the largest tensor (the token
    table, 98 MiB) in passing, and for the sample the units in use (measured: 725 MiB). Building the model
    whole in every process, or autocast's cache of bf16 weight copies (which kept a copy of every block
    for the whole sample), each put rank 1 above the whole model's weights."""
    weights_mib = 4 * 227_517_952 / 2**20
    args = ["--dtype", "bfloat16", "--n_layer", "64", "--n_head", "8", "--n_embd", "512", "--block_size", "64",
            "--fsdp", "--max_steps", "0", "--num_samples", "1", "--max_new_tokens", "2"]
    r = run_script(*args, cwd=tmp_path, runner=TORCHRUN, script="tests/run_measuring_memory.py", timeout=300)
    assert r.returncode == 0, r.stderr
    peaks = peak_mb(r)
    print(f"peak MiB above start, per rank: {peaks}; the whole model's weights: {weights_mib:.0f} MiB")
    assert peaks[0] > weights_mib  # rank 0 built it
    assert peaks[1] < weights_mib


def test_activation_checkpointing_gives_the_same_losses_with_less_memory(tmp_path):
    """Activations dominate here (16 layers of the explicit attention with 16 heads, whose (T, T) matrices
    backward keeps: 0.8 GB at B=1, T=512, float32; one step): recomputing each block's in backward keeps
    only the blocks' inputs, so the peak falls, and the arithmetic is the same. (One sequence: the logits,
    T x 50,257, are 0.1 GB, and how the allocator reuses their blocks varies by 0.1-0.3 GB from run to run;
    at B=4, T=256 that noise was as big as the saving. Measured on a Zen 4: 1.27-1.35 GB without, 0.73-0.89
    GB with.)"""
    (tmp_path / "text.txt").write_text((REPO / "input.txt").read_text()[:60_000])
    args = ["--dtype", "float32", "--no-sdpa", "--n_layer", "16", "--n_head", "16", "--n_embd", "64", "--block_size",
            "512", "--B", "1", "--T", "512", "--max_steps", "1", "--eval_iters", "1", "--num_samples", "0",
            "--input_file", "text.txt"]
    plain, recomputed = (run_script(*args, *extra, cwd=tmp_path, script="tests/run_measuring_memory.py")
                         for extra in (["--out_dir", "plain"], ["--activation_checkpointing", "--out_dir", "ac"]))
    assert plain.returncode == 0 and recomputed.returncode == 0, plain.stderr + recomputed.stderr
    assert step_losses(recomputed.stdout) == step_losses(plain.stdout)
    print(f"peak MB above start: {peak_mb(plain)[0]} plain, {peak_mb(recomputed)[0]} recomputed")
    assert peak_mb(recomputed)[0] < 0.9 * peak_mb(plain)[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_train_as_one(tmp_path, monkeypatch, capsys):
    """torchrun on two nodes, one process each (node ranks 0 and 1, over localhost): each process reads
    its part of every batch by its global rank, and the run equals one process with both parts."""
    (tmp_path / "text.txt").write_text((REPO / "input.txt").read_text()[:60_000])
    common = [*TINY, *EXACT, "--input_file", "text.txt", "--total_batch_size", "128", "--max_steps", "3"]
    port = free_port()
    nodes = [Launched([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                       "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                       str(REPO / "train_gpt2.py"), *common, "--B", "2", "--out_dir", "two"], tmp_path)
             for rank in (0, 1)]
    try:
        outputs = [node.finish(deadline_s=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [code for code, _, _ in outputs] == [0, 0], outputs
    # rank 0 (on node 0) prints; the other nothing of ours (torch 2.8-2.10's gloo says it connected)
    ours = [[line for line in out.splitlines() if not line.startswith("[Gloo] ")] for _, out, _ in outputs]
    assert "device cpu | dtype float32 | processes 2" in ours[0] and ours[1] == []
    code, out, err = run_in_process(*common, "--B", "4", "--out_dir", "one", cwd=tmp_path, monkeypatch=monkeypatch,
                                    capsys=capsys)
    assert code == 0, err
    for key in ("loss", "val_loss"):
        assert numbers(log(tmp_path / "two"), key) == pytest.approx(numbers(log(tmp_path / "one"), key), abs=1e-4)
