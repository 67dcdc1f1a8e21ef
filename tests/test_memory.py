"""What a run says about memory: before its first step, what each process will need and where it lives
(the model state exact from the counts, the activations from a formula fitted to measurements, in the
units the device's own tools use, beside what the device has); a --cpu_offload run the machine's RAM
cannot hold refused before step 0; a CUDA out-of-memory error in one line; and, at the end, the peak the
run really used."""

import dataclasses
import math
import os
import re
import sys
import types

import pytest
import torch

import machinery.console
import machinery.memory
from conftest import CPU_ALLOCATOR_FAILED, REPO, TINY, run_in_process
from machinery.memory import activation_bytes, describe_out_of_memory, parameters_per_process, plan_memory
from train_gpt2 import GPT, GPTConfig, TrainConfig

N_TINY = 1_635_744  # TINY's parameters, as the model line counts them
GIB, MIB = 2**30, 2**20


@pytest.fixture
def small_text(tmp_path):
    (tmp_path / "text.txt").write_text((REPO / "input.txt").read_text()[:20_000])
    return tmp_path


def test_the_memory_line_is_exact_from_the_parameter_counts(small_text, monkeypatch, capsys):
    code, out, err = run_in_process(*TINY[:-2], "--input_file", "text.txt", "--max_steps", "1", "--num_samples", "0",
                                    cwd=small_text, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    n = N_TINY
    assert f"| {n:,} parameters" in out
    line = next(l for l in out.splitlines() if l.startswith("memory per process"))
    assert line.startswith(f"memory per process: model state {16 * n / MIB:.1f} MiB = weights {4 * n / MIB:.1f} MiB "
                           f"+ gradients {4 * n / MIB:.1f} MiB + AdamW moments {8 * n / MIB:.1f} MiB (one process) "
                           f"+ activations about ")
    assert "at B=4, T=32 (estimate) = about " in line and "| cpu" in line and " has " in line


def test_a_run_that_only_samples_says_only_the_weights(small_text, monkeypatch, capsys):
    code, out, err = run_in_process(*TINY[:-2], "--max_steps", "0", "--num_samples", "1", "--max_new_tokens", "2",
                                    cwd=small_text, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    line = next(l for l in out.splitlines() if l.startswith("memory per process"))
    assert line.startswith(f"memory per process: weights {4 * N_TINY / MIB:.1f} MiB (no training) | cpu")
    assert "gradients" not in out and "AdamW" not in out


def test_fsdp_shares_are_the_largest_rows_per_process():
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))  # rows 5, 5, 2, 2
    assert parameters_per_process(model, 1) == 15 + 5 + 10 + 2
    assert parameters_per_process(model, 2) == 3 * 3 + 3 + 1 * 5 + 1  # ceil(rows / 2) of each
    assert parameters_per_process(model, 4) == 2 * 3 + 2 + 1 * 5 + 1


# The peaks of allocated memory the formula was fitted to (NVIDIA H200, bf16 autocast, fused attention,
# T=1024, V=50,304), and how far its estimate may be from each: docs/memory.md states the same errors.
MEASURED = [  # (n_layer, n_head, n_embd, B, activation checkpointing, peak GB, relative error of the estimate)
    (12, 12, 768, 16, "none", 9.0, +0.216),
    (12, 12, 768, 64, "none", 43.8, -0.137),
    (12, 12, 768, 64, "full", 24.0, -0.062),
    (48, 25, 1600, 16, "none", 76.1, -0.089),
    (48, 25, 1600, 16, "full", 35.2, -0.008),
]


@pytest.mark.parametrize("n_layer, n_head, n_embd, B, checkpointing, peak_gb, error", MEASURED)
def test_the_activation_estimate_is_within_its_stated_error_of_each_measurement(n_layer, n_head, n_embd, B,
                                                                               checkpointing, peak_gb, error):
    config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=50304)
    with torch.device("meta"):
        state = 16 * sum(p.numel() for p in GPT(config).parameters())
    estimate = state + activation_bytes(config, B, 1024, checkpointing)
    assert (estimate - peak_gb * 1e9) / (peak_gb * 1e9) == pytest.approx(error, abs=0.0005)


def cuda_of(monkeypatch, name, total_memory):
    """torch.cuda as a machine with one GPU of this name and memory would answer plan_memory."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        total_memory=total_memory))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def gpt2_xl():
    with torch.device("meta"):  # the shape alone: no memory
        return GPT(GPTConfig(n_layer=48, n_head=25, n_embd=1600, vocab_size=50304))


def test_the_device_is_named_in_the_units_its_tools_use(monkeypatch):
    """torch says an H200 has 150.1e9 bytes; nvidia-smi says 143,771 MiB: the line says 139.8 GiB."""
    cuda_of(monkeypatch, "NVIDIA H200", 150_100_000_000)
    cfg = TrainConfig(B=16, T=1024)
    line = plan_memory(gpt2_xl(), cfg, 1, "cuda", torch.bfloat16)
    assert line.endswith("| cuda:0 (NVIDIA H200) has 139.8 GiB")
    assert "likely does not fit" not in line  # the H200 measured 76.1 GB at this shape


def test_a_run_that_likely_does_not_fit_says_so_and_offload_makes_it_fit(monkeypatch):
    """GPT-2 1.5B on a 24 GB card: its state alone (24.9 GB) is more than the card; with --cpu_offload and
    activation checkpointing at B=4 the card holds the activations and a few gathered units, and the RAM
    the state (this machine's RAM: the test says 64 GiB free), weights and gradients page-locked."""
    cuda_of(monkeypatch, "NVIDIA GeForce RTX 4090", 25_386_352_640)
    monkeypatch.setattr(machinery.memory, "available_ram", lambda: 64 * GIB)
    cfg = TrainConfig(B=4, T=1024)
    line = plan_memory(gpt2_xl(), cfg, 1, "cuda", torch.bfloat16)
    assert "model state 23.2 GiB" in line and ": likely does not fit | cuda:0 (NVIDIA GeForce RTX 4090) has 23.6 GiB" \
        in line
    offloaded = plan_memory(gpt2_xl(), dataclasses.replace(cfg, cpu_offload=True, activation_checkpointing="full"),
                            1, "cuda", torch.bfloat16)
    on_gpu, in_ram = offloaded.splitlines()
    assert "likely does not fit" not in on_gpu and "model state" not in on_gpu and "gathered units" in on_gpu
    assert in_ram.startswith("memory in RAM (--cpu_offload): model state 23.2 GiB = weights 5.8 GiB")
    # weights and gradients in page-locked RAM, which torch allocates in powers of two, and AdamW's moments
    model = gpt2_xl()
    page_locked = sum(2 ** math.ceil(math.log2(4 * p.numel())) for p in model.parameters())
    held = (2 * page_locked + 8 * sum(p.numel() for p in model.parameters())) / GIB
    assert round(held, 1) == 29.1
    assert in_ram.endswith(f"(one process), {held:.1f} GiB with weights and gradients page-locked; "
                           f"this machine: {held:.1f} GiB of 64.0 GiB free")


def test_cpu_offload_that_the_ram_cannot_hold_is_refused_before_step_0(small_text, monkeypatch, capsys):
    """TINY's state is 25.0 MiB; the machine has 10 MiB free, and the 6.2 MiB of weights this process
    built before sharding them (which sharding gives back) count as free too."""
    monkeypatch.setattr(machinery.memory, "available_ram", lambda: 10 * MIB)
    code, out, err = run_in_process(*TINY[:-2], "--input_file", "text.txt", "--max_steps", "2", "--cpu_offload",
                                    "--out_dir", "run", cwd=small_text, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: --cpu_offload needs about 25.0 MiB of RAM on this machine, which has "
                          f"{(10 * MIB + 4 * N_TINY) / MIB:.1f} MiB for it (1 process(es)' share of the state): ")
    assert "step" not in out and not (small_text / "run").exists()  # nothing trained, nothing written


def test_training_that_cannot_fit_in_a_cpus_ram_is_refused_before_step_0(small_text, monkeypatch, capsys):
    """On a CPU, running out of RAM ends the process without a word (the kernel's OOM killer), and the
    estimate runs low there: a run whose estimate is more than the RAM stops at once, in one line. TINY's
    state alone is 25.0 MiB; the machine says it has 20 MiB. Several processes on one machine (as
    LOCAL_WORLD_SIZE says) share it: two that need a bit under half of it each fit, three do not."""
    monkeypatch.setattr(machinery.memory, "ram_bytes", lambda: 20 * MIB)
    code, out, err = run_in_process(*TINY, "--input_file", "text.txt", "--max_steps", "2", "--out_dir", "run",
                                    cwd=small_text, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert re.fullmatch(r"error: training needs about ([\d.]+) MiB of RAM, more than this machine's 20\.0 MiB: lower "
                        r"--B and keep --total_batch_size 128 \(more accumulation, the same training\) or add "
                        r"--activation_checkpointing\n", err), err
    assert float(err.split("about ")[1].split()[0]) > 16 * N_TINY / MIB  # the state and the activations
    assert "step" not in out and not (small_text / "run").exists()  # nothing trained, nothing written
    model, cfg = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)), TrainConfig(B=4, T=32)
    monkeypatch.setattr(machinery.memory, "ram_bytes", lambda: 1024 * GIB)
    alone = plan_memory(model, cfg, 1, "cpu", torch.float32)
    assert "processes of this machine" not in alone  # (one process: its need is the machine's)
    need = float(alone.split("= about ")[1].split()[0]) * MIB
    for processes, fits in ((2, True), (3, False)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
        monkeypatch.setattr(machinery.memory, "ram_bytes", lambda: 2.5 * need)
        if fits:
            plan_memory(model, cfg, processes, "cpu", torch.float32)
        else:
            with pytest.raises(ValueError, match=r"\(3 processes x [\d.]+ MiB\), more than this machine's .*, "
                                                 r"split the state with --fsdp, or start fewer processes a machine$"):
                plan_memory(model, cfg, processes, "cpu", torch.float32)
    # the line says what the machine's processes need together, and whether that is within the estimate's margin
    monkeypatch.setattr(machinery.memory, "ram_bytes", lambda: 1024 * GIB)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    each = float(plan_memory(model, cfg, 2, "cpu", torch.float32).split("= about ")[1].split()[0]) * MIB
    for ram, said in ((2.1 * each, ": may not fit (within the estimate's error)"), (2.4 * each, "")):
        monkeypatch.setattr(machinery.memory, "ram_bytes", lambda: ram)
        line = plan_memory(model, cfg, 2, "cpu", torch.float32)
        both = re.search(r"= about ([\d.]+) MiB, ([\d.]+) MiB for the 2 processes of this machine(.*?) \| ", line)
        assert both and abs(float(both[2]) - 2 * float(both[1])) <= 0.1 and both[3] == said, line
    # a resume with no step left to train (--max_steps reached: it only samples) needs only the weights: under
    # FSDP this process's share of them (each tensor's largest piece of three, counted here by hand), offloaded in RAM
    weights = 4 * sum(p.numel() for p in model.parameters())
    share = 4 * sum(-(-p.shape[0] // 3) * (p.numel() // p.shape[0]) for p in model.parameters())
    for mode, what in (({}, f"weights {weights / MIB:.1f} MiB (no training)"),
                       ({"fsdp": True}, f"weights {share / MIB:.1f} MiB (its 1/3 share) (no training)"),
                       ({"cpu_offload": True}, f"weights {weights / MIB:.1f} MiB in RAM (no training)")):
        line = plan_memory(model, dataclasses.replace(cfg, **mode), 3, "cpu", torch.float32, start_step=cfg.max_steps)
        assert line.startswith(f"memory per process: {what} | "), line




class OutOfMemoryAtStep3:
    """forward_backward that runs out of memory in step 3, with `error`."""

    def __init__(self, error):
        import train_gpt2

        self.error, self.backward = error, train_gpt2.forward_backward

    def __call__(self, model, raw_model, loader, *args):
        if loader.state_dict()["position"] >= 3 * 4 * 32:  # the batch of step 3 (B=4, T=32)
            raise self.error
        return self.backward(model, raw_model, loader, *args)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError(CPU_ALLOCATOR_FAILED)], ids=["gpu_kind", "cpu_allocator"])
def test_out_of_memory_is_one_line_that_says_what_to_change(small_text, monkeypatch, capsys, error):
    """Memory running out (as a GPU says it, or as torch's CPU allocator does) is one line: where, and what to
    change. On a CPU, not --fsdp or --cpu_offload: its processes share one RAM, which they do not shrink."""
    import train_gpt2

    monkeypatch.setattr(train_gpt2, "forward_backward", OutOfMemoryAtStep3(error))
    said_once = []  # (several processes of one shape run out alike: the line is said once a machine)
    monkeypatch.setattr(machinery.console, "say_once", lambda line: said_once.append(print(line, file=sys.stderr)))
    code, out, err = run_in_process(*TINY[:-2], "--input_file", "text.txt", "--max_steps", "6", "--num_samples", "0",
                                    "--checkpoint_interval", "2", cwd=small_text, monkeypatch=monkeypatch,
                                    capsys=capsys)
    assert code == 1 and err.count("\n") == 1 and len(said_once) == 1
    assert err.startswith("error: out of memory at step 3 (micro-batch 4 x 32 on cpu")
    assert "lower --B and keep --total_batch_size 128" in err and "--activation_checkpointing" in err
    assert "--fsdp" not in err and "--cpu_offload" not in err and "the last checkpoint is intact" in err
    assert torch.load(small_text / "out" / "ckpt.pt", weights_only=True)["steps_done"] == 2


def test_the_out_of_memory_line_counts_the_tokens_of_every_process(tmp_path, monkeypatch):
    """Each of WORLD_SIZE processes reads its own micro-batch: B=4, T=32 over 8 processes
    is 1,024 tokens a step, which a smaller --B keeps by accumulating more."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg = TrainConfig(B=4, T=32, out_dir=str(tmp_path))
    line = describe_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"), cfg, "cpu")
    assert "lower --B and keep --total_batch_size 1024 " in line


@pytest.fixture
def a_gpu(monkeypatch):
    """describe_out_of_memory's view of cuda:0, an 80 GB GPU (none is needed: only its name and memory are asked)."""
    monkeypatch.setattr(machinery.memory, "device_memory", lambda device: 80 * 10 ** 9)
    monkeypatch.setattr(machinery.memory, "device_name", lambda device: "cuda:0 (NVIDIA H100 80GB HBM3)")
    return "cuda:0"


@pytest.mark.parametrize("on, not_suggested", [("fsdp", "split the model's state with --fsdp"),
                                               ("cpu_offload", "keep it in RAM with --cpu_offload")])
def test_the_out_of_memory_line_does_not_suggest_what_is_already_on(on, not_suggested, tmp_path, a_gpu):
    everything = describe_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"),
                                        TrainConfig(out_dir=str(tmp_path)), a_gpu)
    line = describe_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"),
                                  TrainConfig(out_dir=str(tmp_path), **{on: True}), a_gpu)
    assert not_suggested in everything and not_suggested not in line and line.count("--") == everything.count("--") - 1


@pytest.mark.parametrize("mode, advice", [("none", "add --activation_checkpointing, "),
                                          ("selective", "recompute more with --activation_checkpointing full, "),
                                          ("every_other", "recompute more with --activation_checkpointing full, "),
                                          ("full", "the same training), split the model's state")])
def test_the_out_of_memory_line_suggests_checkpointing_only_where_more_is_left(mode, advice, tmp_path, a_gpu):
    cfg = TrainConfig(B=4, T=32, out_dir=str(tmp_path), activation_checkpointing=mode)
    line = describe_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"), cfg, a_gpu)
    assert advice in line and line.count("--activation_checkpointing") == (mode != "full")


def test_a_resumed_runs_out_of_memory_line_names_the_batch_it_trains_with(small_text, monkeypatch, capsys):
    """Resumed without batch flags, a run trains with the checkpoint's batch (B=2, T=16: 32 tokens a
    step), not the command line's defaults (B=4, T=32): the out-of-memory line says the former, in the
    loop and before it (the setup's settings)."""
    import train_gpt2

    common = [*TINY[:-2], "--input_file", "text.txt", "--num_samples", "0", "--out_dir", "run"]
    code, _, err = run_in_process(*common, "--B", "2", "--T", "16", "--max_steps", "2", cwd=small_text,
                                  monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_gpt2, "forward_backward", out_of_memory)
    code, _, err = run_in_process(*common, "--max_steps", "4", "--resume", cwd=small_text, monkeypatch=monkeypatch,
                                  capsys=capsys)
    assert code == 1 and err.startswith("error: out of memory at step 2 (micro-batch 2 x 16 on cpu")
    assert "keep --total_batch_size 32 (more accumulation" in err
    monkeypatch.setattr(train_gpt2, "restore_training_state", out_of_memory)  # (before the loop: train's frame)
    code, _, err = run_in_process(*common, "--max_steps", "4", "--resume", cwd=small_text, monkeypatch=monkeypatch,
                                  capsys=capsys)
    assert code == 1 and err.startswith("error: out of memory before training (micro-batch 2 x 16 on cpu"), err


def test_the_ram_processes_may_use_is_the_lowest_cgroup_limit_above_them(tmp_path):
    """A container or a scheduler's job caps RAM below the machine's with a cgroup: v2's memory.max in this
    process's cgroup or any above it ("max": none), v1's memory.limit_in_bytes (about 2**63: none)."""
    from machinery.files import cgroup_memory_limit

    root, proc = tmp_path / "cgroup", tmp_path / "proc_self_cgroup"
    for folder, limit in (("job", str(4 << 30)), ("job/step", "max"), ("memory/batch", str(2 << 30)),
                          ("memory", "9223372036854771712")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / ("memory.limit_in_bytes" if folder.startswith("memory") else "memory.max")).write_text(limit)
    proc.write_text("0::/job/step\n")  # v2: the job's 4 GiB, above the step's "max"
    assert cgroup_memory_limit(str(proc), str(root)) == 4 << 30
    proc.write_text("4:memory:/batch\n1:cpu:/batch\n")  # v1: the memory controller's tree
    assert cgroup_memory_limit(str(proc), str(root)) == 2 << 30
    proc.write_text("4:memory:/\n")  # v1's "no limit"
    assert cgroup_memory_limit(str(proc), str(root)) is None
    proc.write_text("0::/\n")  # none at the top
    assert cgroup_memory_limit(str(proc), str(root)) is None
    assert cgroup_memory_limit(str(tmp_path / "no such file"), str(root)) is None
    (root / "job" / "step" / "memory.max").write_text(str(6 << 30))  # a looser limit below a tighter one
    proc.write_text("0::/job/step\n")
    assert cgroup_memory_limit(str(proc), str(root)) == 4 << 30  # the tightest on the way up holds


def test_fits_with_the_estimates_margin_or_says_it_may_not():
    """The estimate runs up to 14% under a measured peak (FIT_MARGIN 1.15): a need within 15% of the memory
    may not fit, one above it likely does not, and one with the margin to spare fits (nothing said)."""
    from machinery.memory import FIT_MARGIN, fit

    need = 10 * 2**30
    assert fit(need, int(need * FIT_MARGIN) + 1) == "" and fit(need, None) == ""
    assert fit(need, int(need * 1.1)) == ": may not fit (within the estimate's error)"
    assert fit(need, need - 1) == ": likely does not fit"


def test_a_cpus_peak_is_linux_ru_maxrss_in_kibibytes():
    """Linux's getrusage says a process's peak resident memory in KiB (macOS in bytes): the peak in bytes is it
    times 1024, as /proc/self/status's VmHWM, counted by the kernel apart, says within 0.5% (the two are
    updated at different moments: 0.1% apart here; times 1000 would be 2.4% off)."""
    from machinery.memory import peak_memory

    with open("/proc/self/status") as f:
        hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    peak, counts = peak_memory("cpu")
    assert counts == "resident" and peak == pytest.approx(hwm_kib * 1024, rel=0.005)


def test_the_ram_processes_may_use_is_the_machines_or_a_lower_limit(monkeypatch):
    """ram_bytes: the machine's RAM (sysconf's pages), or a cgroup's limit where that is lower, never higher."""
    import machinery.files

    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit, expected in ((machine // 4, machine // 4), (machine * 4, machine), (None, machine)):
        monkeypatch.setattr(machinery.files, "cgroup_memory_limit", lambda: limit)
        assert machinery.files.ram_bytes() == expected, limit


RAM_RUNS_OUT = """import resource, sys
sys.path.insert(0, {repo!r})
import torch
from machinery.memory import out_of_memory
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))  # (`ulimit -v`)
try:
    torch.empty(8 << 30, dtype=torch.uint8)
except RuntimeError as e:
    print(type(e).__name__, out_of_memory(e))
"""


def test_torchs_cpu_allocator_running_out_is_recognised_as_out_of_memory():
    """torch's CPU allocator says memory ran out (RAM, or here a `ulimit -v` below the 8 GiB asked) as a plain
    RuntimeError; out_of_memory knows it by its words, which this real allocation checks (in a process of its
    own: the limit cannot be raised back)."""
    import subprocess

    r = subprocess.run([sys.executable, "-c", RAM_RUNS_OUT.format(repo=str(REPO))], capture_output=True, text=True,
                       timeout=300)
    assert (r.returncode, r.stdout) == (0, "RuntimeError True\n"), r


# torch's MPS allocator's words (MPSAllocator.mm) for an Apple GPU's memory running out, and for one tensor past
# Metal's largest buffer; no Mac here, so the errors are made by hand in those words
MPS_OUT_OF_MEMORY = ("MPS backend out of memory (MPS allocated: 17.50 GB, other allocations: 1.20 GB, max allowed: "
                     "18.13 GB). Tried to allocate 1.54 GB on private pool.", "Invalid buffer size: 40.00 GB")


@pytest.mark.parametrize("words", MPS_OUT_OF_MEMORY, ids=["pool", "buffer"])
def test_an_apple_gpu_running_out_is_one_line_without_advice_it_cannot_take(words, tmp_path, monkeypatch):
    """MPS says memory ran out as a plain RuntimeError (a traceback before); its line suggests neither --fsdp
    nor --cpu_offload, which a Mac's GPU cannot use (one GPU, and no FSDP on MPS), as a CUDA GPU's does."""
    monkeypatch.setattr(machinery.memory, "device_memory", lambda device: 18 * 2**30)  # (what torch.mps would say)
    error = RuntimeError(words)
    assert machinery.memory.out_of_memory(error) and not machinery.memory.out_of_memory(RuntimeError("other"))
    cfg = TrainConfig(B=4, T=32, out_dir=str(tmp_path))
    line = describe_out_of_memory(error, cfg, "mps")
    assert line.startswith("out of memory before training (micro-batch 4 x 32 on mps")
    assert "--activation_checkpointing" in line and "--fsdp" not in line and "--cpu_offload" not in line


def test_the_plan_counts_the_attention_scores_an_apple_gpu_keeps():
    """On MPS, training attention runs torch's math attention (its fused kernel serves only inference), whose
    (T, T) scores are kept as --no-sdpa's are: the plan counts them there, and not on CUDA."""
    model = gpt2_xl()
    cfg = TrainConfig(B=4, T=1024)
    activations = {device: next(b for what, b in machinery.memory.memory_needs(model, cfg, 1, torch.bfloat16, device)
                                if what.startswith("activations"))
                   for device in ("cuda:0", "mps")}
    assert activations["cuda:0"] == activation_bytes(model.config, 4, 1024, sdpa=True)
    assert activations["mps"] == activation_bytes(model.config, 4, 1024, sdpa=False) > activations["cuda:0"]
