"""Training helpers: learning-rate schedule, optimizer groups, gradient accumulation, device and
precision policy, and main() run in-process on a tiny model."""

import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import sys

import pytest
import torch

import machinery.checkpoints
import machinery.command_line
import machinery.files
import machinery.hardware
import machinery.run_log
import machinery.speed
import machinery.tokens
import train_gpt2
from conftest import TINY
from machinery.hardware import resolve_dtype
from train_gpt2 import GPT, GPTConfig, get_lr, main, resolve_device


def test_lr_schedule_endpoints_and_shape():
    kw = dict(max_lr=6e-4, min_lr=6e-5, warmup_steps=10, max_steps=100)
    assert get_lr(0, **kw) == pytest.approx(6e-5)  # warmup starts above zero: step 0 trains
    assert get_lr(9, **kw) == pytest.approx(6e-4)  # end of warmup: the peak
    warmup = [get_lr(s, **kw) for s in range(10)]
    assert all(b - a == pytest.approx(6e-5) for a, b in zip(warmup, warmup[1:]))  # linear
    assert get_lr(10, **kw) == pytest.approx(6e-4)  # decay starts at the peak
    assert get_lr(55, **kw) == pytest.approx((6e-4 + 6e-5) / 2)  # cosine: halfway at the midpoint
    decay = [get_lr(s, **kw) for s in range(10, 101)]
    assert all(b < a for a, b in zip(decay, decay[1:]))  # strictly falling
    assert get_lr(100, **kw) == pytest.approx(6e-5)
    assert get_lr(5000, **kw) == pytest.approx(6e-5)  # then flat
    # a warmup as long as the run: at max_steps, min_lr (no decay of length 0 to divide by)
    assert get_lr(100, max_lr=6e-4, min_lr=6e-5, warmup_steps=100, max_steps=100) == 6e-5


def test_the_time_left_counts_the_steps_after_this_one():
    """The step line's eta: the typical step (the median, step 0's warm-up left out) times the steps still to
    run after this one: none after the last step, an hour for 3,600 more steps of 1 s."""
    import machinery.console

    record = dict(loss=1.0, lr=1e-3, norm=1.0, ms=1000.0, tok_per_s=128.0, tflops=0.1)
    times = [30.0, 1.0, 1.0, 1.2]  # (step 0: compiling, say)
    assert machinery.console.step_line({**record, "step": 99}, times, 100).endswith("| eta 0:00:00")
    assert machinery.console.step_line({**record, "step": 0}, times, 3601).endswith("| eta 1:00:00")


def test_default_schedule_is_constant():
    assert {get_lr(s, 3e-4, 3e-4, 0, 50) for s in range(60)} == {3e-4}


def test_a_warmup_longer_than_the_run_is_a_note(tmp_path, text_file, capsys):
    """A recipe's warmup in a run cut short (--max_steps 3, --warmup_steps 5): the note says the rate never
    reaches --lr, and the log agrees (get_lr's rates, the last 4/5 of it); one as long as the run reaches it in
    the last step, and never decays (to --min_lr); a warmup that leaves steps after it says nothing."""
    code, log = run_main(tmp_path, text_file, "--max_steps", "3", "--warmup_steps", "5", "--lr", "1e-3")
    assert code == 0
    assert "note: --warmup_steps 5 is more than --max_steps 3: the learning rate rises for the whole run and " \
           "never reaches --lr 0.001" in capsys.readouterr().out
    assert [r["lr"] for r in trained(log)] == pytest.approx([2e-4, 4e-4, 6e-4])
    code, log = run_main(tmp_path / "whole", text_file, "--max_steps", "3", "--warmup_steps", "3", "--lr", "1e-3",
                         "--min_lr", "1e-4")
    assert code == 0 and "note: --warmup_steps 3 is equal to --max_steps 3: the learning rate rises for the whole " \
        "run and reaches --lr 0.001 in its last step only" in capsys.readouterr().out
    assert [r["lr"] for r in trained(log)] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])
    code, _ = run_main(tmp_path / "fits", text_file, "--max_steps", "3", "--warmup_steps", "2")
    assert code == 0 and "note:" not in capsys.readouterr().out


def test_weight_decay_groups(capsys):
    """Decay on the matrices and embeddings, none on biases and LayerNorm; the method says how many of each."""
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, device_type="cpu")
    # counted another way, by module: Linear and Embedding weights (lm_head is wte: once) against the rest
    matrices = {id(m.weight): m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    rest = [p for p in model.parameters() if id(p) not in matrices]
    assert capsys.readouterr().out.splitlines() == [
        f"optimizer decayed: {len(matrices)} tensors, {sum(p.numel() for p in matrices.values()):,} parameters",
        f"optimizer not decayed: {len(rest)} tensors, {sum(p.numel() for p in rest):,} parameters"]
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert decayed["betas"] == (0.9, 0.95) and decayed["eps"] == 1e-8
    assert decayed["fused"]  # the fused kernel: several times faster than the default loop on CPU


def test_fused_adamw_matches_the_default_loop():
    """The fused kernel is only a faster way to run the same AdamW update."""
    torch.manual_seed(0)
    a = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32))
    b = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32))
    b.load_state_dict(a.state_dict())
    opt_a = a.configure_optimizers(0.1, 1e-3, "cpu")
    opt_b = torch.optim.AdamW([{"params": [p for p in b.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                               {"params": [p for p in b.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                              lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    x = torch.randint(0, 1000, (2, 16))
    for model, optimizer in ((a, opt_a), (b, opt_b)):
        for _ in range(3):
            optimizer.zero_grad()
            model(x, x)[1].backward()
            optimizer.step()
    # each Adam step moves a weight by about lr = 1e-3; the two kernels round differently, so allow
    # 1% of one step
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


def test_four_micro_batches_give_the_gradients_of_one_batch(text_file):
    """forward_backward, the training loop's own accumulation, over 4 micro-batches of B=1 gives the
    gradients and the mean loss of one B=4 batch of the same tokens (a loader of B=1 serves, in 4 calls,
    the rows of a B=4 loader's first batch). float32: equal to rounding (rtol 1e-4, atol 1e-7)."""
    from train_gpt2 import DataLoaderLite, forward_backward

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))
    fp32, no_scaling = contextlib.nullcontext(), torch.amp.GradScaler("cpu", enabled=False)

    def gradients(B, grad_accum_steps):
        model.zero_grad(set_to_none=True)
        loader = DataLoaderLite(B, 16, text_file, split="train")
        loss = forward_backward(model, model, loader, grad_accum_steps, fp32, no_scaling, "cpu")
        return loss, [p.grad.clone() for p in model.parameters()]

    big_loss, big = gradients(4, 1)
    acc_loss, acc = gradients(1, 4)
    torch.testing.assert_close(acc_loss, big_loss, rtol=1e-5, atol=0)
    for g, h in zip(acc, big):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-7)


def test_device_resolution():
    assert resolve_device("cpu") == ("cpu", "cpu")
    assert resolve_device("auto")[1] in ("cpu", "cuda", "mps")
    for bad in ("tpu", "cuda:x", "gpu0"):
        with pytest.raises(ValueError, match="unknown device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_cuda_n_becomes_the_current_gpu_and_a_missing_one_is_one_line(monkeypatch):
    """--device cuda:1 in one process: what asks torch.cuda for "the current GPU" (the dtype from its
    capability, the memory it holds) must ask GPU 1, so it is made the current one.
    A GPU the machine does not have is one line. (CUDA faked: two GPUs; on real GPUs not tested here.)"""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert resolve_device("cuda:1") == ("cuda:1", "cuda") and current == ["cuda:1"]
    assert resolve_device("cuda") == ("cuda", "cuda") and current == ["cuda:1"]  # (no index: left as it is)
    with pytest.raises(ValueError, match=r"^device 'cuda:2' requested but this machine has 2 GPU\(s\)$"):
        resolve_device("cuda:2")


def test_precision_policy(monkeypatch):
    assert resolve_dtype("float16", "cpu") is torch.float16  # an explicit choice always wins
    assert resolve_dtype("auto", "mps") is torch.float32
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert resolve_dtype("auto", "cuda") is torch.bfloat16  # A100, H100: native bf16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert resolve_dtype("auto", "cuda") is torch.float16  # T4: bf16 only emulated; fp16 + GradScaler
    monkeypatch.setattr(machinery.hardware, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(machinery.hardware, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") is torch.float32


def run_main(tmp_path, text_file, *args):
    out = tmp_path / "out"
    code = main([*TINY, "--input_file", str(text_file), "--out_dir", str(out), "--B", "2", "--T", "16",
                 "--num_samples", "1", "--max_new_tokens", "4", *map(str, args)])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] \
        if (out / "log.jsonl").exists() else []
    return code, log


def trained(log):
    """The records of the steps that trained (they hold a loss): all but a final evaluation's."""
    return [r for r in log if "loss" in r]


def called_without_cuda(name, *args, **kwargs):
    raise AssertionError(f"torch.cuda.{name} called on a machine without CUDA")


def test_cpu_run_makes_no_cuda_calls(tmp_path, text_file, monkeypatch):
    """The classic script synchronized CUDA unconditionally and crashed without a GPU."""
    if torch.cuda.is_available():
        pytest.skip("checks the behaviour on a machine without CUDA")
    for name in ("synchronize", "get_device_capability", "set_device", "get_rng_state_all",
                 "max_memory_allocated", "is_bf16_supported"):
        # one stand-in per name: torch's compiler tables functions by identity, and refuses one under two names
        monkeypatch.setattr(torch.cuda, name, functools.partial(called_without_cuda, name))
    code, log = run_main(tmp_path, text_file, "--max_steps", "2")
    assert code == 0 and [r["step"] for r in log] == [0, 1, 2]  # two steps trained, and the final evaluation


def test_same_seed_same_losses_other_seed_other_losses(tmp_path, text_file):
    _, a = run_main(tmp_path / "a", text_file, "--max_steps", "4")
    _, b = run_main(tmp_path / "b", text_file, "--max_steps", "4")
    _, c = run_main(tmp_path / "c", text_file, "--max_steps", "4", "--seed", "7")
    assert len(trained(a)) == len(trained(c)) == 4
    assert [r["loss"] for r in trained(a)] == [r["loss"] for r in trained(b)]
    assert [r["loss"] for r in trained(a)] != [r["loss"] for r in trained(c)]
    assert a[-1]["val_loss"] == b[-1]["val_loss"] != c[-1]["val_loss"]  # and so the trained models


def test_accumulation_run_equals_big_batch_run(tmp_path, text_file):
    """--B 1 with total_batch_size 4*T trains exactly like --B 4 (float32): both runs finish their 4 steps
    with the same losses and gradient norms."""
    args = ("--max_steps", "4", "--dtype", "float32", "--lr", "1e-3")
    big_code, big = run_main(tmp_path / "big", text_file, *args, "--B", "4")
    acc_code, acc = run_main(tmp_path / "acc", text_file, *args, "--B", "1", "--total_batch_size", "64")
    assert big_code == acc_code == 0
    assert [r["step"] for r in trained(big)] == [r["step"] for r in trained(acc)] == [0, 1, 2, 3]
    for r, s in zip(trained(big), trained(acc)):
        assert r["loss"] == pytest.approx(s["loss"], abs=1e-5)
        assert r["norm"] == pytest.approx(s["norm"], rel=1e-4)


def test_total_batch_size_must_divide(tmp_path, text_file, capsys):
    code, _ = run_main(tmp_path, text_file, "--total_batch_size", "100")
    assert code == 1 and "not a multiple of B*T" in capsys.readouterr().err


def test_log_has_one_record_per_step_with_val_loss_when_computed(tmp_path, text_file):
    """A record at step s describes the model after s optimizer steps: steps 0-4 train, each with a
    record, those at every eval_interval (0, 2, 4) hold the validation loss of the model they start from;
    then step 5 = max_steps evaluates the trained model, and its record holds that and the most memory
    the run held (on a CPU its peak resident memory, which the kernel also counts, as VmHWM)."""
    code, log = run_main(tmp_path, text_file, "--max_steps", "5", "--eval_interval", "2",
                         "--warmup_steps", "2", "--min_lr", "3e-5")
    assert code == 0
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4, 5]
    assert [("val_loss" in r) for r in log] == [True, False, True, False, True, True]  # every 2 steps, and last
    assert {"loss", "lr", "norm", "ms", "tok_per_s"} <= set(log[0])
    assert set(log[5]) == {"step", "val_loss", "peak_memory_bytes"}  # the final evaluation trains nothing
    with open("/proc/self/status") as f:  # (this run ran in this process)
        kernels_peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    assert 16 * 1_635_744 < log[5]["peak_memory_bytes"] <= kernels_peak  # more than the model's state
    assert log[0]["lr"] == pytest.approx(1.5e-4) and log[4]["lr"] < log[2]["lr"]
    assert all(math.isfinite(r["loss"]) for r in log[:5])
    # before any training the model guesses uniformly among the 50,257 tokens: a loss of ln(50257) = 10.8
    assert log[0]["val_loss"] == pytest.approx(math.log(50257), abs=0.1)
    assert log[5]["val_loss"] < log[0]["val_loss"]


def test_learning_happens(tmp_path, text_file):
    """A tiny model on Shakespeare: the loss after 40 steps is well below where it started, on the
    batches it trained on and on the validation text, which it never trained on."""
    code, log = run_main(tmp_path, text_file, "--max_steps", "40", "--lr", "3e-3", "--B", "4")
    assert code == 0 and trained(log)[-1]["loss"] < trained(log)[0]["loss"] - 2.0
    assert log[-1]["step"] == 40 and log[-1]["val_loss"] < log[0]["val_loss"] - 2.0


def test_bfloat16_path_trains_the_same_model_as_float32(tmp_path, text_file):
    """The fast path (bf16 autocast) from the same initial weights and batches: its first 20 losses
    stay within bf16 tolerance of the float32 path. bf16 keeps 8 bits of mantissa (relative error
    about 0.4% per rounding); after 20 steps of training we allow 2% relative."""
    args = ("--max_steps", "20", "--lr", "1e-3", "--B", "4", "--T", "32")
    _, fp32 = run_main(tmp_path / "fp32", text_file, *args, "--dtype", "float32")
    _, bf16 = run_main(tmp_path / "bf16", text_file, *args, "--dtype", "bfloat16")
    assert len(trained(fp32)) == len(trained(bf16)) == 20
    for a, b in zip(trained(fp32), trained(bf16)):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.02), a["step"]
    assert bf16[-1]["val_loss"] == pytest.approx(fp32[-1]["val_loss"], rel=0.02)  # the trained models
    assert fp32[0]["loss"] != bf16[0]["loss"]  # it really ran in another precision
    assert trained(bf16)[-1]["loss"] < bf16[0]["loss"] - 0.5  # and learned


def test_compile_failure_falls_back_to_eager_with_one_line(tmp_path, text_file, monkeypatch, capsys):
    def broken_compile(model, *args, **kwargs):
        raise RuntimeError("no working C++ compiler found\nlong details ...")

    monkeypatch.setattr(torch, "compile", broken_compile)
    code, log = run_main(tmp_path, text_file, "--max_steps", "2", "--compile")
    out = capsys.readouterr().out
    assert code == 0 and len(trained(log)) == 2
    assert "compile failed, running eagerly: no working C++ compiler found" in out
    assert "long details" not in out


@pytest.mark.all_threads
def test_compiled_training_follows_eager(tmp_path, text_file, capsys):
    """--compile trains the same model (float32: equal to 1e-4); evaluation and sampling still work."""
    args = ("--max_steps", "3", "--dtype", "float32", "--eval_interval", "2")
    _, eager = run_main(tmp_path / "eager", text_file, *args)
    code, compiled = run_main(tmp_path / "compiled", text_file, *args, "--compile")
    assert code == 0 and "compiled in" in capsys.readouterr().out
    assert len(trained(eager)) == len(trained(compiled)) == 3
    for a, b in zip(trained(eager), trained(compiled)):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    assert compiled[-1]["val_loss"] == pytest.approx(eager[-1]["val_loss"], abs=1e-4)


def test_text_too_short_for_validation_trains_without_it(tmp_path, capsys):
    """1,000 tokens: the 10% validation split (100 tokens) is shorter than one batch of 2 x 64."""
    path = tmp_path / "small.txt"
    path.write_text(" word" * 1000)
    code, log = run_main(tmp_path, path, "--max_steps", "2", "--T", "64")
    out = capsys.readouterr().out
    assert code == 0 and [r["step"] for r in log] == [0, 1, 2]
    assert set(log[2]) == {"step", "peak_memory_bytes"}  # nothing to evaluate: the final record holds the peak
    assert "no validation: the val split" in out and "val loss" not in out
    assert all("val_loss" not in r for r in log)
    steps_and_after = out[out.index("step     0"):out.index("> ")]
    assert "\n\n" not in steps_and_after  # the evaluation step prints no empty line in place of results


@pytest.mark.parametrize("rank", [0, 1])
def test_more_processes_than_gpus_stops_every_rank_before_it_touches_a_gpu(tmp_path, text_file, monkeypatch,
                                                                           capsys, rank):
    """Two processes on a node with one GPU (faked): rank 1 has no GPU, and rank 0, whose GPU exists,
    must stop too, or it would wait forever in init_process_group for a rank 1 that never comes. Both
    meet the same line: rank 0 says it, rank 1 waits for torchrun to stop it (files.say_once)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def forbidden(*args, **kwargs):
        raise AssertionError("called after the check should have stopped the run")

    monkeypatch.setattr(torch.cuda, "set_device", forbidden)
    monkeypatch.setattr(train_gpt2.dist, "init_process_group", forbidden)
    waits = []
    monkeypatch.setattr(machinery.files.time, "sleep", waits.append)
    for name, value in dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2).items():
        monkeypatch.setenv(name, str(value))
    code, _ = run_main(tmp_path, text_file, "--device", "cuda")
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert waits == ([machinery.files.SAY_ONCE_WAIT_S] if rank else [])  # rank 1 waits for torchrun to stop it
    assert err.startswith("error: torchrun started 2 processes on a node with 1 GPU(s)")
    assert "--nproc_per_node=1" in err and "--device cpu" in err


def test_attention_prefers_cudnn_on_hopper_only(monkeypatch):
    """PyTorch's default order tries cuDNN's attention last; on compute capability 9 (H100, H200) the
    script puts it first, the other kernels after it, and restores the order afterwards."""
    from torch.nn.attention import SDPBackend

    default = torch._C._get_sdp_priority_order()
    assert isinstance(machinery.hardware.attention_kernels("cpu"), type(machinery.hardware.contextlib.nullcontext()))
    for capability, first in (((8, 0), default[0]), ((9, 0), int(SDPBackend.CUDNN_ATTENTION))):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        with machinery.hardware.attention_kernels("cuda"):
            order = torch._C._get_sdp_priority_order()
            assert order[0] == first
            q = torch.randn(1, 2, 8, 4)  # and attention still runs (here on the CPU: math)
            assert torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).shape == q.shape
        assert torch._C._get_sdp_priority_order() == default


# ----------------------------------------------------------------------------- how well the hardware is used

# torch.cuda.get_device_name() of the GPUs reproducers use -> dense bf16 TFLOP/s (datasheets; no sparsity)
GPU_NAMES = [
    ("NVIDIA H100 80GB HBM3", 989.5),  # H100 SXM
    ("NVIDIA H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H200", 989.5),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.05),
    ("NVIDIA L40", 181.05),
    ("NVIDIA A10", 125.0),
    ("NVIDIA A10G", None),  # AWS's variant: other clocks, not in the table
    ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA GeForce RTX 3090", 71.0),
    ("NVIDIA RTX A6000", 154.8),
    ("Tesla T4", None),  # no bf16 tensor cores
]


@pytest.mark.parametrize("name,peak", GPU_NAMES, ids=[n for n, _ in GPU_NAMES])
def test_bf16_peak_by_gpu_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert machinery.speed.bf16_peak_tflops("cuda") == peak


def test_the_clock_and_the_peak_ask_the_gpu_they_are_given(monkeypatch):
    """synchronize and bf16_peak_tflops take the run's device ("cuda:1") and ask that GPU, not the current one;
    on a CPU there is nothing to wait for. (CUDA faked.)"""
    asked = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: asked.append(("synchronize", device)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: asked.append(("name", device)) or "H100")
    monkeypatch.setattr(torch.mps, "synchronize", lambda: asked.append(("synchronize", "mps")))
    for device in ("cuda:1", "cpu", "mps"):
        machinery.hardware.synchronize(device)
    assert machinery.speed.bf16_peak_tflops("cuda:1") == 989.5
    assert asked == [("synchronize", "cuda:1"), ("synchronize", "mps"), ("name", "cuda:1")]


def test_no_peak_on_cpu_or_mps(monkeypatch):
    def forbidden(*args):
        raise AssertionError("asked a GPU's name off the GPU")

    monkeypatch.setattr(torch.cuda, "get_device_name", forbidden)
    assert machinery.speed.bf16_peak_tflops("cpu") is None and machinery.speed.bf16_peak_tflops("mps") is None


def step_lines(stdout):
    return [l for l in stdout.splitlines() if l.startswith("step") and "| loss" in l]


def tiny_flops_per_token():
    """FLOPs a token of run_main's model at its T=16."""
    return GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)).flops_per_token(16)


def test_step_line_and_log_show_model_tflops_and_no_mfu_on_a_cpu(tmp_path, text_file, capsys):
    """On a CPU (no known peak) every step line and record carries the model's TFLOP/s, 6 N + 12 L C T
    FLOPs a token times the tokens of the step, over its time; and no MFU."""
    code, log = run_main(tmp_path, text_file, "--max_steps", "3")
    lines = step_lines(capsys.readouterr().out)
    assert code == 0 and len(lines) == len(trained(log)) == 3
    flops_per_token = tiny_flops_per_token()
    for r, line in zip(trained(log), lines):
        assert r["tflops"] == pytest.approx(flops_per_token * 2 * 16 / (r["ms"] / 1000) / 1e12, rel=1e-9)
        assert f"| {r['tflops']:.3f} TFLOP/s |" in line  # 3 decimals below 10, 1 above
        assert "mfu" not in r and "MFU" not in line


def test_step_line_and_log_show_mfu_where_the_peak_is_known(tmp_path, text_file, monkeypatch, capsys):
    """With a peak (faked: 1e-4 TFLOP/s, so that a tiny model on a CPU shows a large MFU), the record's
    mfu is 100 tflops / peak and the step line shows it."""
    peaks = []
    monkeypatch.setattr(train_gpt2, "bf16_peak_tflops", lambda device_type: peaks.append(device_type) or 1e-4)
    code, log = run_main(tmp_path, text_file, "--max_steps", "3")
    lines = step_lines(capsys.readouterr().out)
    assert code == 0 and peaks == ["cpu"] and len(lines) == len(trained(log)) == 3
    for r, line in zip(trained(log), lines):
        assert r["mfu"] == pytest.approx(100 * r["tflops"] / 1e-4, rel=1e-9)
        assert f"| {r['tflops']:.3f} TFLOP/s | MFU {r['mfu']:.1f}% |" in line


def test_tflops_are_per_process(tmp_path, text_file, monkeypatch):
    """Under torchrun each process reports its own rate: its share of the step's tokens (total /
    world_size) over the step's time. Here rank 0 of a world of 2, faked in this one process (no process
    group: the loaders serve rank 0's share, averages over ranks are the rank's own): the step's tokens
    are 2 x B x T, the rate counts B x T; with two micro-batches a step, twice each."""
    monkeypatch.setattr(train_gpt2, "join_process_group", lambda device, device_type: (False, 0, 2, device))
    flops_per_token = tiny_flops_per_token()
    for micro_batches in (1, 2):
        code, log = run_main(tmp_path / str(micro_batches), text_file, "--max_steps", "2",
                             "--total_batch_size", micro_batches * 2 * 2 * 16)
        assert code == 0 and len(trained(log)) == 2
        for r in trained(log):
            assert r["tokens"] == (r["step"] + 1) * micro_batches * 2 * 2 * 16  # B=2, T=16, 2 processes
            assert r["tflops"] == pytest.approx(flops_per_token * r["tok_per_s"] / 2 / 1e12, rel=1e-9)


def test_only_rank_0_saves_the_checkpoint(tmp_path, text_file, monkeypatch):
    """Rank 0 alone writes ckpt.pt (every process holds the same weights under DDP): here rank 1 of 2, faked in
    this one process, trains its share and writes none."""
    monkeypatch.setattr(train_gpt2, "join_process_group", lambda device, device_type: (False, 1, 2, device))
    code, _ = run_main(tmp_path, text_file, "--max_steps", "2")
    assert code == 0 and not (tmp_path / "out" / "ckpt.pt").exists()


def test_a_run_resumed_at_its_end_under_more_processes_only_samples(tmp_path, text_file, monkeypatch, capsys):
    """A one-process run resumed under two (faked here: rank 0 of 2) with no step left only samples: its
    tokens a step, which the two do not divide, are no obstacle, as for --eval_only."""
    code, _ = run_main(tmp_path, text_file, "--max_steps", "2")
    assert code == 0
    monkeypatch.setattr(train_gpt2, "join_process_group", lambda device, device_type: (False, 0, 2, device))
    code, _ = run_main(tmp_path, text_file, "--max_steps", "2", "--resume")
    out = capsys.readouterr().out
    assert code == 0 and "nothing to train: the run has done 2 steps" in out and out.splitlines()[-1].startswith("> ")


# ----------------------------------------------------------------------------- what a run says it wrote


def human_size(n):
    """Bytes for people, in powers of 1000: 340 B, 56.6 kB, 19.7 MB, 1.5 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def test_last_line_names_what_the_run_wrote_with_the_checkpoints_size(tmp_path, text_file, capsys):
    code, log = run_main(tmp_path, text_file, "--max_steps", "2")
    out = tmp_path / "out"
    size = human_size((out / "ckpt.pt").stat().st_size)
    assert code == 0 and size.endswith(" MB")  # 1.6M parameters with their Adam moments: about 20 MB
    last_line = capsys.readouterr().out.splitlines()[-1]
    peak = log[-1]["peak_memory_bytes"]  # the same peak as the log's last record, or a little more
    wrote, said = last_line.split(" | peak memory ")
    assert wrote == f"wrote {out / 'ckpt.pt'} ({size}), {out / 'log.jsonl'} and {out / 'progress.png'}"
    number, unit, what = said.split()  # e.g. 874.2 MiB (resident), or 1.0 GiB with an older torch
    scale = {"MiB": 2**20, "GiB": 2**30}[unit]
    assert what == "(resident)" and float(number) >= round(peak / scale, 1)


def test_before_training_the_run_says_what_it_will_write_and_how_big(tmp_path, text_file, capsys):
    """Before step 0: the checkpoint's size foretold from the parameter count (float32 weights and AdamW's
    two moments, 12 bytes a parameter), within 1% of the file the run then writes."""
    code, _ = run_main(tmp_path, text_file, "--max_steps", "1")
    stdout, out = capsys.readouterr().out, tmp_path / "out"
    n_params = sum(p.numel() for p in GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)).parameters())
    line = (f"writes {out / 'ckpt.pt'} at the end (about {human_size(12 * n_params)}: weights and AdamW moments), "
            f"{out / 'log.jsonl'} and {out / 'progress.png'}")
    assert code == 0 and line in stdout.splitlines()
    assert stdout.index(line) < stdout.index("step     0 | loss")
    assert (out / "ckpt.pt").stat().st_size == pytest.approx(12 * n_params, rel=0.01)


@pytest.fixture
def models_built(monkeypatch):
    """How many GPT models were built (GPT.__init__ calls)."""
    built, init = [], GPT.__init__
    monkeypatch.setattr(GPT, "__init__", lambda self, config: built.append(config) or init(self, config))
    return built


@pytest.mark.parametrize("data", [["--input_file", "missing.txt"], ["--data_dir", "missing"]], ids=["file", "dir"])
@pytest.mark.parametrize("eval_only", [[], ["--eval_only", "--max_steps", "0"]], ids=["train", "eval_only"])
def test_missing_data_is_one_line_before_any_model_is_built(tmp_path, models_built, capsys, monkeypatch, data,
                                                            eval_only):
    monkeypatch.chdir(tmp_path)
    assert main([*TINY, *data, *eval_only]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "missing" in err
    assert ("not found" if data[0] == "--input_file" else "has no manifest.json (there is no such folder)") in err
    assert models_built == [] and not (tmp_path / "out").exists()


def test_eval_only_with_nothing_to_evaluate_is_one_line(tmp_path, capsys):
    """1,000 tokens: too few for one validation batch of 2 x 64, and no --hellaswag."""
    path = tmp_path / "small.txt"
    path.write_text(" word" * 1000)
    code, _ = run_main(tmp_path, path, "--T", "64", "--eval_only")
    captured = capsys.readouterr()
    assert code == 1 and captured.err == \
        "error: nothing to evaluate: the data has no validation batch, and --hellaswag is not set\n"
    assert "| loss" not in captured.out and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- Weights & Biases, by a stand-in

STAND_IN_WANDB = '''"""A stand-in for wandb that records what a run sends it; it never touches a network."""
import copy
import os

calls = []


class Run:
    def log(self, data, step=None):
        calls.append(("log", copy.deepcopy(data), step))

    def finish(self):
        calls.append(("finish",))


def init(project=None, name=None, config=None, **kwargs):
    if os.environ.get("STAND_IN_WANDB_FAILS"):  # (as wandb.init fails without a login in online mode)
        raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")
    calls.append(("init", dict(project=project, name=name, config=copy.deepcopy(config), kwargs=kwargs,
                               WANDB_MODE=os.environ.get("WANDB_MODE"))))
    return Run()
'''


@pytest.fixture
def stand_in_wandb(tmp_path, monkeypatch):
    """An importable `wandb` package (the stand-in above) on sys.path; not imported yet. Yields its
    folder; the test finds what the run sent in sys.modules["wandb"].calls."""
    folder = tmp_path / "site-packages"
    (folder / "wandb").mkdir(parents=True)
    (folder / "wandb" / "__init__.py").write_text(STAND_IN_WANDB)
    monkeypatch.syspath_prepend(str(folder))
    assert "wandb" not in sys.modules
    yield folder
    sys.modules.pop("wandb", None)


def test_wandb_gets_the_config_and_every_record_of_the_log(tmp_path, text_file, stand_in_wandb, monkeypatch):
    """--wandb_project: wandb.init with the project, the run's name and its config (the TrainConfig as
    a dict, as the checkpoint keeps it), every record of log.jsonl logged at its step (evaluations
    included), finish at the end. WANDB_MODE=offline in the environment (clusters without internet)
    reaches wandb as it was, and the run is the same run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    code, log = run_main(tmp_path, text_file, "--max_steps", "4", "--eval_interval", "2",
                         "--wandb_project", "gpt2-repro", "--wandb_run_name", "tiny")
    assert code == 0 and len(log) == 5 and "val_loss" in log[2] and "loss" not in log[4]  # evaluations too
    calls = sys.modules["wandb"].calls
    kind, init = calls[0]
    assert kind == "init"
    config = machinery.checkpoints.load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))["train_config"]
    assert init == dict(project="gpt2-repro", name="tiny", config=config, kwargs={}, WANDB_MODE="offline")
    assert config["wandb_project"] == "gpt2-repro" and config["max_steps"] == 4
    assert calls[1:-1] == [("log", r, r["step"]) for r in log]
    assert calls[-1] == ("finish",)
    _, untracked = run_main(tmp_path / "untracked", text_file, "--max_steps", "4", "--eval_interval", "2")
    timing = ("ms", "tok_per_s", "tflops", "peak_memory_bytes")  # clocks and memory differ between runs
    assert [{k: v for k, v in r.items() if k not in timing} for r in log] == \
        [{k: v for k, v in r.items() if k not in timing} for r in untracked]


def test_a_wandb_that_cannot_start_is_one_line_and_leaves_out_dir_untouched(tmp_path, text_file, stand_in_wandb,
                                                                            monkeypatch, capsys):
    """wandb.init fails (no login, no network in online mode): one line with wandb's reason and the offline
    way, said before the run's folder is touched (a run's files there stay as they were; none are made)."""
    monkeypatch.setenv("STAND_IN_WANDB_FAILS", "1")
    code, _ = run_main(tmp_path, text_file, "--max_steps", "2", "--wandb_project", "p")
    assert code == 1 and capsys.readouterr().err == ("error: could not start wandb: api_key not configured (no-tty) "
                                                     "(WANDB_MODE=offline logs without a network)\n")
    assert not (tmp_path / "out").exists()


def test_without_a_project_wandb_is_never_imported(tmp_path, text_file, stand_in_wandb):
    code, log = run_main(tmp_path, text_file, "--max_steps", "2")
    assert code == 0 and len(log) == 3
    assert "wandb" not in sys.modules  # importable (the stand-in), and not imported


def test_wandb_not_installed_is_one_line_before_anything_runs(tmp_path, text_file, monkeypatch, models_built,
                                                             capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    code, _ = run_main(tmp_path, text_file, "--wandb_project", "x")
    captured = capsys.readouterr()
    assert code == 1 and captured.err.count("\n") == 1 and "pip install wandb" in captured.err
    assert captured.err.startswith("error: --wandb_project needs the wandb package")
    assert captured.out == "" and models_built == [] and not (tmp_path / "out").exists()


def test_only_rank_0_logs_and_tracks(tmp_path, stand_in_wandb, monkeypatch):
    """Under torchrun every process opens a RunLog; only RANK 0's writes the log and talks to wandb."""
    from train_gpt2 import TrainConfig

    argv = ["--out_dir", str(tmp_path / "out"), "--wandb_project", "p"]
    cfg, _ = machinery.command_line.parse_args(TrainConfig, argv)
    record = dict(step=0, loss=10.0, lr=3e-4, norm=1.0, ms=10.0, tok_per_s=100.0, tokens=64, tflops=1e-3)
    monkeypatch.setenv("RANK", "1")
    with machinery.run_log.RunLog(cfg, 0) as log:
        log.write(record, picture=True)
    assert not (tmp_path / "out").exists() and "wandb" not in sys.modules
    monkeypatch.setenv("RANK", "0")
    with machinery.run_log.RunLog(cfg, 0) as log:
        log.write(record)
    assert (tmp_path / "out" / "log.jsonl").read_text() == json.dumps(record) + "\n"
    assert [c[0] for c in sys.modules["wandb"].calls] == ["init", "log", "finish"]


def test_validation_reads_eval_iters_steps_of_tokens_and_at_most_the_whole_split(tmp_path, text_file, monkeypatch):
    """Validation reads eval_iters optimizer steps' tokens (total_batch_size each: B=2, T=16 with 2
    accumulation steps is 2 micro-batches a step), the same tokens whatever B or the processes, and never
    more than the split holds: with eval_iters 1000 it reads each of its batches once."""
    import train_gpt2

    counts, estimate = [], train_gpt2.estimate_val_loss
    monkeypatch.setattr(train_gpt2, "estimate_val_loss", lambda model, loader, n_batches, *args: counts.append(
        (n_batches, machinery.tokens.batches_per_pass(loader))) or estimate(model, loader, n_batches, *args))
    code, _ = run_main(tmp_path / "a", text_file, "--max_steps", "1", "--total_batch_size", "64", "--eval_iters", "3")
    assert code == 0 and [n for n, _ in counts] == [6, 6]  # (step 0 and the trained model: 3 steps x 2)
    counts.clear()
    code, _ = run_main(tmp_path / "b", text_file, "--max_steps", "1", "--eval_iters", "1000")
    whole_split = counts[0][1]
    assert code == 0 and 0 < whole_split < 1000 and counts == [(whole_split, whole_split)] * 2


def recording_estimate(records, estimate, model, loader, n_batches, *args):
    """estimate_val_loss, recording (rows read, rows the split holds in whole batches, the loss) of each call."""
    loss = estimate(model, loader, n_batches, *args)
    records.append((n_batches * loader.B, machinery.tokens.batches_per_pass(loader) * loader.B, loss))
    return loss


def test_a_split_smaller_than_the_evaluation_is_read_in_whole_steps_the_same_at_any_B(tmp_path, text_file,
                                                                                       monkeypatch):
    """A validation split shorter than eval_iters steps of total_batch_size (64) tokens: it is read in as many
    whole steps as it holds, the same tokens at B=1, 2 or 4, so a checkpoint evaluated at another B (a resume
    takes the run's) gives the run's loss (at B=1 a cut to whole batches read one row more: 10.7525 for 10.7535)."""
    import train_gpt2

    records = []
    monkeypatch.setattr(train_gpt2, "estimate_val_loss",
                        functools.partial(recording_estimate, records, train_gpt2.estimate_val_loss))
    assert run_main(tmp_path / "run", text_file, "--max_steps", "1", "--dtype", "float32")[0] == 0
    for B in ("1", "2", "4"):
        assert main([*TINY, "--init_from", str(tmp_path / "run" / "out" / "ckpt.pt"), "--input_file", str(text_file),
                     "--eval_only", "--B", B, "--T", "16", "--total_batch_size", "64", "--eval_iters", "1000",
                     "--dtype", "float32"]) == 0
    (rows, fits, loss), *others = records[-3:]
    assert all(other_rows == rows for other_rows, _, _ in others) and rows * 16 % 64 == 0  # whole steps of 64 tokens
    assert all(rows <= other_fits < rows + 4 for _, other_fits, _ in records[-3:])  # all but under a step's rows
    assert all(other_loss == pytest.approx(loss, abs=1e-5) for _, _, other_loss in others)  # (float32 sums)


def test_evaluating_alone_takes_a_total_batch_size_the_processes_do_not_divide():
    """--eval_only accumulates nothing: the reproduction's 524,288 tokens a step over 3 GPUs (196,608 a
    micro-step) evaluates; training with it is refused in one line. So does a run with no step left
    (it only samples): a resume at its end, or of a one-process run under two processes."""
    from train_gpt2 import TrainConfig, batch_arithmetic

    cfg = TrainConfig(B=64, T=1024, total_batch_size=524288, eval_only=True)
    assert batch_arithmetic(cfg, 3)[0].total_batch_size == 524288
    with pytest.raises(ValueError, match="is not a multiple of B\\*T\\*processes = 64\\*1024\\*3 = 196608"):
        batch_arithmetic(dataclasses.replace(cfg, eval_only=False), 3)
    training = dataclasses.replace(cfg, eval_only=False, max_steps=100)
    assert batch_arithmetic(training, 3, start_step=100)[0].total_batch_size == 524288
    with pytest.raises(ValueError, match="is not a multiple of B"):
        batch_arithmetic(training, 3, start_step=99)
    saved = dataclasses.asdict(TrainConfig(B=2, T=16, total_batch_size=32, max_steps=4))  # (one process's run)
    resume = machinery.checkpoints.resumed_batch  # (settings, flags typed, the run's, its path, processes, steps done)
    assert resume(TrainConfig(resume=True, max_steps=4), set(), saved, "run/ckpt.pt", 2, 4).total_batch_size == 32
    with pytest.raises(ValueError, match="the run's 32 tokens per step are not a multiple of B\\*T\\*processes"):
        resume(TrainConfig(resume=True, max_steps=6), set(), saved, "run/ckpt.pt", 2, 4)
