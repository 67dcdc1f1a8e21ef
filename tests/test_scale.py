"""Bigger models on the hardware people have: --fsdp (FSDP2 over torchrun's processes, here CPU
processes over gloo), --activation_checkpointing, the memory a run needs said before it runs, a CUDA
out-of-memory error in one line, and torchrun across two machines (two launchers on this one)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch

from conftest import CONTEXTS, REPO, SCRIPT_ENV, TINY, official, run_in_process, run_script, step_losses

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# float32: the comparisons below are between arithmetic orders, not precisions
EXACT = ["--dtype", "float32", "--eval_interval", "2", "--eval_iters", "2", "--num_samples", "1", "--max_new_tokens", "4"]


def log(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def numbers(records, key):
    return [r[key] for r in records if key in r]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """The same 12 steps, 2 accumulation steps each: one process with B=4 ("single"); torchrun's two
    processes with --fsdp and B=2 each ("fsdp"), stopped by SIGTERM (as a scheduler stops a job) after
    step 3 or so and resumed under --fsdp; and one process cut after 2 steps ("plain") and resumed under
    --fsdp. The learning rate is constant, so a run cut and resumed must equal one that never stopped."""
    from train_gpt2 import main

    tmp = tmp_path_factory.mktemp("fsdp")
    (tmp / "text.txt").write_text((REPO / "input.txt").read_text()[:60_000])
    # 17 HellaSwag items: 9 for rank 0 (two batches of 8) and 8 for rank 1 (one), which must make the
    # same number of forward passes under FSDP
    items = [official(c, e, l, i) for i, (c, e, l) in enumerate((CONTEXTS * 3)[:17])]
    (tmp / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    common = [*TINY, *EXACT, "--input_file", "text.txt", "--total_batch_size", "256", "--max_steps", "12"]
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
    stopped = subprocess.Popen([*TORCHRUN, str(REPO / "train_gpt2.py"), *common, *hellaswag, "--B", "2", "--fsdp",
                                "--out_dir", "fsdp"], cwd=tmp, env={**os.environ, **SCRIPT_ENV},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = []
    for line in stopped.stdout:
        first.append(line)
        if line.startswith("step     3 | loss"):
            stopped.send_signal(signal.SIGTERM)  # torchrun passes it on to every process
            break
    rest, err = stopped.communicate(timeout=120)
    sharded = "".join(first) + rest
    resumed = {}
    for name, recompute in (("fsdp", ["--activation_checkpointing"]), ("plain", [])):  # (recomputing changes nothing)
        r = run_script(*common, "--B", "2", "--fsdp", "--resume", *recompute, "--out_dir", name, cwd=tmp,
                       runner=TORCHRUN)
        assert r.returncode == 0, r.stderr
        resumed[name] = r
    return tmp, sharded, resumed


def test_fsdp_over_two_processes_gives_one_processs_losses(fsdp_runs):
    tmp, sharded, _ = fsdp_runs
    one, two = log(tmp / "single"), log(tmp / "fsdp")
    assert "FSDP over 2: a 1/2 share" in sharded and "x 2 processes x 2 accumulation steps" in sharded
    for key in ("loss", "val_loss"):
        assert numbers(two, key) == pytest.approx(numbers(one, key), abs=1e-4), key
    # the clipped global norm of all processes' gradients: float32 sums in another order drift with the
    # steps (1.1e-4 at step 11 of a norm near 1.1, seen once)
    assert numbers(two, "norm") == pytest.approx(numbers(one, "norm"), rel=1e-3)
    assert [r["step"] for r in two if "val_loss" in r] == list(range(0, 13, 2))
    # HellaSwag at the stopped run's evaluations (the resume, without --hellaswag, did the rest): all 17
    # items, each counted once
    hellaswag = [(r["step"], r["hellaswag_acc_norm"]) for r in two if "hellaswag_acc_norm" in r]
    assert hellaswag and hellaswag == [(r["step"], r["hellaswag_acc_norm"]) for r in one if r["step"] <= hellaswag[-1][0]
                                       and "hellaswag_acc_norm" in r]


def test_an_fsdp_run_stopped_by_sigterm_saves_and_resumes_under_fsdp_exactly(fsdp_runs):
    tmp, sharded, resumed = fsdp_runs
    stopped_at = int(re.search(r"interrupted: saved step (\d+) to fsdp/ckpt.pt", sharded).group(1))
    assert 3 < stopped_at < 12  # the step running when the signal came was finished, then saved
    assert f"resumed from fsdp/ckpt.pt at step {stopped_at}" in resumed["fsdp"].stdout
    assert [r["step"] for r in log(tmp / "fsdp")] == list(range(13))  # no step lost, none twice
    assert resumed["fsdp"].stdout.count("> Hello") == 1  # every process samples (FSDP needs all), rank 0 prints


def test_a_plain_checkpoint_resumes_under_fsdp(fsdp_runs):
    tmp, _, resumed = fsdp_runs
    assert "resumed from plain/ckpt.pt at step 2" in resumed["plain"].stdout
    for key in ("loss", "val_loss"):
        assert numbers(log(tmp / "plain"), key) == pytest.approx(numbers(log(tmp / "single"), key), abs=1e-4), key


def test_an_fsdp_checkpoint_is_the_plain_file_one_process_reads(fsdp_runs, monkeypatch, capsys):
    tmp, _, resumed = fsdp_runs
    ckpt = torch.load(tmp / "fsdp" / "ckpt.pt", weights_only=True)  # written under FSDP at the end
    single = torch.load(tmp / "single" / "ckpt.pt", weights_only=True)
    assert ckpt["model"].keys() == single["model"].keys()
    assert ckpt["model"]["lm_head.weight"].data_ptr() == ckpt["model"]["transformer.wte.weight"].data_ptr()  # tied
    assert ckpt["optimizer"]["state"].keys() == single["optimizer"]["state"].keys()  # by name, in every mode
    # one plain process evaluates it: the FSDP run's last validation loss
    code, out, err = run_in_process("--resume", "--eval_only", "--out_dir", tmp / "fsdp", "--input_file", "text.txt",
                                    "--dtype", "float32", "--eval_iters", "2", "--B", "4", cwd=tmp,
                                    monkeypatch=monkeypatch, capsys=capsys)
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


def peak_mb(result):
    """{rank: MB} from tests/run_measuring_memory.py's lines."""
    return {int(r): float(mb) for r, mb in re.findall(r"peak_mb (\d+) ([\d.]+)", result.stdout)}


def test_fsdp_needs_measurably_less_memory_per_process_than_ddp(tmp_path):
    """A model whose state dominates (16M parameters: 256 MB of weights, gradients and moments; B=1, T=16):
    under DDP each process holds all of it, under FSDP its half plus one gathered block. Measured as
    each process's peak resident memory above what it held before training, the whole run: the model is
    built whole on each process before it is sharded, and rank 0 holds the full state gathered from
    all to write the checkpoint (on GPUs in the host's memory, not the GPU's; here both are the RAM)."""
    (tmp_path / "text.txt").write_text((REPO / "input.txt").read_text()[:20_000])
    args = ["--device", "cpu", "--n_layer", "4", "--n_head", "4", "--n_embd", "256", "--block_size", "64",
            "--B", "1", "--T", "16", "--max_steps", "2", "--eval_iters", "1", "--num_samples", "0",
            "--input_file", "text.txt"]
    runner = [*TORCHRUN, str(REPO / "tests" / "run_measuring_memory.py")]
    env = {**__import__("os").environ, **SCRIPT_ENV}
    ddp = subprocess.run([*runner, *args, "--out_dir", "ddp"], cwd=tmp_path, env=env, capture_output=True, text=True)
    fsdp = subprocess.run([*runner, *args, "--fsdp", "--out_dir", "fsdp"], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert ddp.returncode == 0 and fsdp.returncode == 0, ddp.stderr + fsdp.stderr
    ddp_mb, fsdp_mb = peak_mb(ddp), peak_mb(fsdp)
    assert len(ddp_mb) == len(fsdp_mb) == 2, ddp.stdout[-300:] + fsdp.stdout[-300:] + fsdp.stderr[-500:]
    print(f"peak MB above start, per rank: DDP {ddp_mb}, FSDP {fsdp_mb}")
    # the process that does not save: half of DDP's state, plus the root unit (the 51 MB token table and
    # its gradient) gathered whole for forward and backward
    assert fsdp_mb[1] < 0.8 * ddp_mb[1]
    assert fsdp_mb[0] < ddp_mb[0]  # rank 0, which gathers the whole state to save it, still less


def test_activation_checkpointing_gives_the_same_losses_with_less_memory(tmp_path):
    """Activations dominate here (16 layers of the explicit attention, whose (T, T) matrices backward
    keeps, B=4, T=256, float32; one step): recomputing each block's in backward keeps only the blocks' inputs, so
    the peak falls, and the arithmetic is the same."""
    (tmp_path / "text.txt").write_text((REPO / "input.txt").read_text()[:60_000])
    args = ["--device", "cpu", "--dtype", "float32", "--no-sdpa", "--n_layer", "16", "--n_head", "8", "--n_embd",
            "64", "--block_size", "256", "--B", "4", "--T", "256", "--max_steps", "1", "--eval_iters", "1",
            "--num_samples", "0", "--input_file", "text.txt"]
    runner = [sys.executable, str(REPO / "tests" / "run_measuring_memory.py")]
    env = {**__import__("os").environ, **SCRIPT_ENV}
    plain = subprocess.run([*runner, *args, "--out_dir", "plain"], cwd=tmp_path, env=env, capture_output=True, text=True)
    recomputed = subprocess.run([*runner, *args, "--activation_checkpointing", "--out_dir", "ac"], cwd=tmp_path,
                                env=env, capture_output=True, text=True)
    assert plain.returncode == 0 and recomputed.returncode == 0, plain.stderr + recomputed.stderr
    assert step_losses(recomputed.stdout) == step_losses(plain.stdout)
    print(f"peak MB above start: {peak_mb(plain)[0]} plain, {peak_mb(recomputed)[0]} recomputed")
    assert peak_mb(recomputed)[0] < 0.9 * peak_mb(plain)[0]


def test_the_memory_line_is_exact_from_the_parameter_counts(tmp_path, monkeypatch, capsys):
    (tmp_path / "text.txt").write_text((REPO / "input.txt").read_text()[:20_000])
    code, out, err = run_in_process(*TINY[:-2], "--input_file", "text.txt", "--max_steps", "1", "--num_samples", "0",
                                    cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    n = 1_635_744  # this shape's parameters, as the model line counts them
    assert f"| {n:,} parameters" in out
    line = next(l for l in out.splitlines() if l.startswith("memory per process"))
    assert line.startswith(f"memory per process: model state {16 * n / 1e6:.1f} MB = weights {4 * n / 1e6:.1f} MB "
                           f"+ gradients {4 * n / 1e6:.1f} MB + AdamW moments {8 * n / 1e6:.1f} MB (one process)")
    assert "| cpu has " in line


def test_fsdp_shares_are_the_largest_rows_per_process():
    from machinery.memory import parameters_per_process

    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))  # rows 5, 5, 2, 2
    assert parameters_per_process(model, 1) == 15 + 5 + 10 + 2
    assert parameters_per_process(model, 2) == 3 * 3 + 3 + 1 * 5 + 1  # ceil(rows / 2) of each
    assert parameters_per_process(model, 4) == 2 * 3 + 2 + 1 * 5 + 1


def test_out_of_memory_is_one_line_that_says_what_to_change(tmp_path, monkeypatch, capsys):
    import train_gpt2

    (tmp_path / "text.txt").write_text((REPO / "input.txt").read_text()[:20_000])
    backward = train_gpt2.forward_backward

    def out_of_memory_at_step_3(model, raw_model, loader, *args):
        if loader.state_dict()["position"] >= 3 * 4 * 32:  # the batch of step 3 (B=4, T=32)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.19 GiB total)")
        return backward(model, raw_model, loader, *args)

    monkeypatch.setattr(train_gpt2, "forward_backward", out_of_memory_at_step_3)
    code, out, err = run_in_process(*TINY[:-2], "--input_file", "text.txt", "--max_steps", "6", "--num_samples", "0",
                                    "--checkpoint_interval", "2", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("error: out of memory at step 3 (micro-batch 4 x 32 on cpu, ")
    assert "lower --B and keep --total_batch_size 128" in err and "--activation_checkpointing" in err
    assert "--fsdp" in err and "the last checkpoint is intact" in err
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["steps_done"] == 2


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
    env = {**__import__("os").environ, **SCRIPT_ENV}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                               str(REPO / "train_gpt2.py"), *common, "--B", "2", "--out_dir", "two"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "processes 2" in outputs[0][0] and outputs[1][0] == ""  # rank 0 (on node 0) prints
    code, out, err = run_in_process(*common, "--B", "4", "--out_dir", "one", cwd=tmp_path, monkeypatch=monkeypatch,
                                    capsys=capsys)
    assert code == 0, err
    for key in ("loss", "val_loss"):
        assert numbers(log(tmp_path / "two"), key) == pytest.approx(numbers(log(tmp_path / "one"), key), abs=1e-4)
