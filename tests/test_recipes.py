"""Recipes are files of flags in configs/, read with @configs/NAME.args: each one runs here for a step or
two on stand-in data (a tiny shape where the real one would take minutes), so none goes stale."""

import json
import os
import re

import pytest

import prepare
from conftest import CONTEXTS, REPO, official, make_documents, run_in_process
from machinery.command_line import parse_args
from train_gpt2 import TrainConfig

RECIPES = sorted((REPO / "configs").glob("*.args"))
TINY_SHAPE = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "64"]


def recipe(name):
    return f"@{REPO / 'configs' / name}"


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """A working directory laid out as a reproducer's: data/fineweb-edu holds shards prepared from
    generated documents (in place of FineWeb-Edu), cache/ a cached HellaSwag split (for --hellaswag
    auto), and a random-weight GPT-2 directory stands in for OpenAI's weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    work = tmp_path_factory.mktemp("recipes")
    (work / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(300, seed=3)))
    prepare.prepare(str(work / "docs.jsonl"), str(work / "data" / "fineweb-edu"), shard_size=3000,
                    show_progress=False)
    cache = work / "cache" / "train_gpt2"
    cache.mkdir(parents=True)
    (cache / "hellaswag_val.jsonl").write_text(
        "".join(json.dumps(official(c, e, l, i)) + "\n" for i, (c, e, l) in enumerate(CONTEXTS)))
    (work / "input.txt").write_text((REPO / "input.txt").read_text()[:60_000])
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)).save_pretrained(work / "gpt2-local")
    return work


def comments(path):
    return " ".join(line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")).lower()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_says_what_it_is_for_where_how_long_and_what_good_looks_like(path):
    said = comments(path)
    assert f"@configs/{path.name}" in said  # the command that runs it
    for topic in ("hardware:", "time:", "a good result"):
        assert topic in said, f"{path.name} does not say {topic!r}"
    flags = [line.split()[0] for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert flags and all(f.startswith("--") for f in flags)  # one flag a line


def test_the_reproduction_recipe_has_the_classic_numbers():
    cfg, given = parse_args(TrainConfig, [recipe("gpt2_124m.args")])
    assert (cfg.total_batch_size, cfg.max_steps, cfg.warmup_steps) == (2**19, 19073, 715)
    assert (cfg.lr, cfg.min_lr, cfg.weight_decay, cfg.vocab_size) == (6e-4, 6e-5, 0.1, 50304)
    assert (cfg.B, cfg.T, cfg.data_dir, cfg.hellaswag) == (64, 1024, "data/fineweb-edu", "auto")
    assert cfg.total_batch_size * cfg.max_steps == pytest.approx(10e9, rel=1e-4)  # one pass over the 10B tokens
    assert {"lr", "max_steps", "total_batch_size"} <= given  # a recipe's flags count as given


def test_flags_after_a_recipe_override_it_and_comments_and_spaces_are_read(tmp_path):
    path = tmp_path / "mine.args"
    path.write_text("# a comment line\n\n--lr 1e-3\n--prompt Once upon a time\n--no-shuffle\n--max_steps=7\n")
    cfg, given = parse_args(TrainConfig, [f"@{path}", "--lr", "2e-3"])
    assert (cfg.lr, cfg.prompt, cfg.shuffle, cfg.max_steps) == (2e-3, "Once upon a time", False, 7)
    assert given == {"lr", "prompt", "shuffle", "max_steps"}
    # a byte-order mark (some Windows editors write one) is not part of the first flag
    path.write_bytes("--max_steps 9\n--min_lr 1e-5\n".encode("utf-8-sig"))
    assert parse_args(TrainConfig, [f"@{path}"])[0].max_steps == 9
    # --min_lr None gives a recipe's min_lr back its default meaning (None: a constant rate)
    assert parse_args(TrainConfig, [f"@{path}"])[0].min_lr == 1e-5
    assert parse_args(TrainConfig, [f"@{path}", "--min_lr", "None"])[0].min_lr is None
    assert parse_args(TrainConfig, [f"@{path}", "--min_lr", "none"])[0].min_lr is None  # (as typed, lower case)


def test_a_flags_value_that_starts_with_an_at_sign_is_text_not_a_recipe(tmp_path):
    """@FILE stands for a recipe where a flag could stand, not as a flag's value: a prompt that begins with a
    handle, typed or on a recipe's line, is that text. A recipe may still name another on a line of its own."""
    (tmp_path / "inner.args").write_text("--lr 1e-3\n")
    (tmp_path / "mine.args").write_text(f"--prompt @someone says\n@{tmp_path / 'inner.args'}\n")
    cfg, _ = parse_args(TrainConfig, [f"@{tmp_path / 'mine.args'}", "--input_file", "@corpus.txt"])
    assert (cfg.prompt, cfg.lr, cfg.input_file) == ("@someone says", 1e-3, "@corpus.txt")
    cfg, _ = parse_args(TrainConfig, ["--compile", f"@{tmp_path / 'inner.args'}"])  # (--compile takes no value)
    assert cfg.compile and cfg.lr == 1e-3
    read, write = os.pipe()  # a recipe from a pipe, as bash's @<(printf ...) or @/dev/stdin give one
    os.write(write, b"--max_steps 9\n")
    os.close(write)
    try:
        cfg, given = parse_args(TrainConfig, [f"@/dev/fd/{read}"])  # (read once: given is the recipe's flags too)
        assert cfg.max_steps == 9 and given == {"max_steps"}
    finally:
        os.close(read)


def test_a_tilde_in_a_path_setting_is_the_home_folder_as_in_the_shell(tmp_path, monkeypatch):
    """The shell expands ~ in `--out_dir ~/run`, not in `--out_dir=~/run` or in a recipe: the script does,
    for the settings that name files and folders (and nowhere else: a prompt may start with ~)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mine.args").write_text("--input_file ~/corpus.txt\n--prompt ~ a wave\n")
    cfg, _ = parse_args(TrainConfig, [f"@{tmp_path / 'mine.args'}", "--out_dir=~/run", "--init_from", "~/ckpt.pt"])
    assert (cfg.input_file, cfg.out_dir, cfg.init_from) == (str(tmp_path / "corpus.txt"), str(tmp_path / "run"),
                                                            str(tmp_path / "ckpt.pt"))
    assert cfg.prompt == "~ a wave"


def test_a_missing_recipe_or_a_bad_line_in_one_is_one_line(tmp_path, monkeypatch, capsys):
    code, out, err = run_in_process("@configs/no-such.args", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "no-such.args" in err
    (tmp_path / "bad.args").write_text("--max_step 5\n")
    code, out, err = run_in_process("@bad.args", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.strip() == ("error: unrecognized arguments: --max_step 5 (in recipe bad.args); did you "
                                         "mean --max_steps? (see --help)")
    (tmp_path / "word.args").write_text("--max_steps 1\nhello\n")  # a line that is no flag at all: named too
    code, out, err = run_in_process("@word.args", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.strip() == "error: unrecognized arguments: hello (in recipe word.args) (see --help)"
    code, out, err = run_in_process("hello", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.strip() == "error: unrecognized arguments: hello (see --help)"  # typed: no recipe
    (tmp_path / "two.args").write_text("--B two\n")  # the line that is wrong is in the recipe, which is named
    code, out, err = run_in_process("@two.args", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2
    assert err.strip() == "error: argument --B: invalid int value: 'two' (in recipe two.args) (see --help)"
    code, out, err = run_in_process("--B", "two", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.strip() == "error: argument --B: invalid int value: 'two' (see --help)"  # typed: no recipe
    (tmp_path / "latin1.args").write_bytes(b"--prompt Caf\xe9\n")
    code, out, err = run_in_process("@latin1.args", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.strip() == "error: recipe 'latin1.args' is not UTF-8 text (see --help)"
    (tmp_path / "a.args").write_text("--lr 1e-3\n@b.args\n")  # a names b, b names a
    (tmp_path / "b.args").write_text("@a.args\n")
    code, out, err = run_in_process("@a.args", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.strip() == "error: recipe 'a.args' includes itself (see --help)"
    # a recipe with no flags (empty, comments only: cut short, or not the file meant) would run the defaults
    (tmp_path / "empty.args").write_text("# the reproduction\n\n")
    code, out, err = run_in_process("@empty.args", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.strip() == "error: recipe 'empty.args' holds no flags (see --help)"
    code, out, err = run_in_process("@/dev/zero", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)  # (no end)
    assert code == 2 and err.strip() == "error: recipe '/dev/zero' is not a file (nor a pipe) (see --help)"
    # a line is a flag and its value: one left without its value does not take the next line's recipe as it
    (tmp_path / "inner.args").write_text("--lr 1e-3\n")
    (tmp_path / "no_value.args").write_text("--prompt\n@inner.args\n")
    code, out, err = run_in_process("@no_value.args", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.strip() == "error: argument --prompt: expected one argument (in recipe no_value.args) " \
        "(see --help)"
    (tmp_path / "two_on_a_line.args").write_text("--no-shuffle --max_steps 2\n")  # one flag a line: the rest is a value
    code, out, err = run_in_process("@two_on_a_line.args", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.strip() == ("error: unrecognized arguments: --max_steps 2 (in recipe two_on_a_line.args); "
                                         "a recipe line holds one flag and its value: put each flag on a line of its "
                                         "own (see --help)")
    (tmp_path / "after_a_boolean.args").write_text("--sdpa false --max_steps 2\n")  # (a boolean's value: the rest)
    code, out, err = run_in_process("@after_a_boolean.args", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.strip() == ("error: argument --sdpa: invalid true/false value: 'false --max_steps 2'; a "
                                         "recipe line holds one flag and its value: put each flag on a line of its own "
                                         "(in recipe after_a_boolean.args) (see --help)")


def test_learner_recipe(stand_in, tmp_path, monkeypatch, capsys):
    code, out, err = run_in_process(recipe("learner.args"), "--B", "4", "--max_steps", "2", "--eval_iters", "1",
                                     "--num_samples", "1", "--input_file", stand_in / "input.txt",
                                     "--out_dir", tmp_path / "verse", cwd=stand_in, monkeypatch=monkeypatch,
                                     capsys=capsys)
    assert code == 0, err
    assert "4 layers, 4 heads, 256 channels" in out and "> ROMEO:" in out
    assert re.search(r"step     0 \| val loss 1[01]\.\d{4}", out)  # an untrained model: about ln(50257)
    # and the README's next command: sampling from it needs no shape flags
    code, out, err = run_in_process("--init_from", tmp_path / "verse" / "ckpt.pt", "--max_steps", "0",
                                    "--num_samples", "1", "--max_new_tokens", "4", "--prompt", "JULIET:",
                                    cwd=stand_in, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert "4 layers, 4 heads, 256 channels" in out and "> JULIET:" in out


def test_reproduction_recipe(stand_in, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(stand_in / "cache"))  # --hellaswag auto: the cached split
    code, out, err = run_in_process(recipe("gpt2_124m.args"), *TINY_SHAPE, "--B", "2", "--T", "32",
                                     "--total_batch_size", "128", "--max_steps", "2", "--no-compile",
                                     "--eval_iters", "1", "--num_samples", "1", "--out_dir", tmp_path / "run",
                                     cwd=stand_in, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert "data data/fineweb-edu" in out and "x 2 accumulation steps" in out and "vocab 50304" in out
    assert "step     2 | hellaswag acc_norm" in out
    records = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert records[0]["lr"] == pytest.approx(6e-4 / 715)  # the warmup's first step


def test_finetune_recipe(stand_in, tmp_path, monkeypatch, capsys):
    code, out, err = run_in_process(recipe("finetune_gpt2.args"), "--init_from", stand_in / "gpt2-local",
                                     "--T", "32", "--max_steps", "2", "--eval_iters", "1", "--num_samples", "1",
                                     "--out_dir", tmp_path / "ft", cwd=stand_in, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert f"model {stand_in / 'gpt2-local'}" in out and "lr 3.0e-05" in out and "> ROMEO:" in out


def test_eval_recipe(stand_in, tmp_path, monkeypatch, capsys):
    """OpenAI's GPT-2 evaluated on the tokens the reproduction evaluates itself on (eval_iters steps of its
    total_batch_size, on the same data), on a stand-in here; it writes nothing."""
    bar, run = (parse_args(TrainConfig, [recipe(name)])[0] for name in ("eval_gpt2.args", "gpt2_124m.args"))
    assert (bar.data_dir, bar.T, bar.total_batch_size, bar.eval_iters) == (run.data_dir, run.T, run.total_batch_size,
                                                                          run.eval_iters)
    out_dir = tmp_path / "nothing-written"
    code, out, err = run_in_process(recipe("eval_gpt2.args"), "--init_from", stand_in / "gpt2-local",
                                     "--B", "2", "--T", "32", "--total_batch_size", "64", "--out_dir", out_dir,
                                     cwd=stand_in, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert re.search(r"^step     0 \| val loss \d+\.\d{4}$", out, re.M)
    assert not out_dir.exists()


@pytest.mark.parametrize("name", ["gpt2_350m.args", "gpt2_774m.args", "gpt2_1558m.args"])
def test_bigger_gpt2_recipes(name, stand_in, tmp_path, monkeypatch, capsys):
    """Their settings as llm.c's runs of these sizes had them; a step on stand-in data at a tiny shape, in
    one process with --device cpu (so without --fsdp: tests/test_scale.py runs FSDP under torchrun)."""
    cfg, _ = parse_args(TrainConfig, [recipe(name)])
    sizes = {"gpt2_350m.args": (24, 1024, 3e-4, 524288), "gpt2_774m.args": (36, 1280, 2.5e-4, 524288),
             "gpt2_1558m.args": (48, 1600, 6e-4, 1048576)}
    assert (cfg.n_layer, cfg.n_embd, cfg.lr, cfg.total_batch_size) == sizes[name]
    monkeypatch.setenv("XDG_CACHE_HOME", str(stand_in / "cache"))
    code, out, err = run_in_process(recipe(name), *TINY_SHAPE, "--B", "2", "--T", "32", "--total_batch_size", "64",
                                     "--max_steps", "1", "--no-compile", "--no-fsdp", "--eval_iters", "1",
                                     "--num_samples", "0", "--out_dir", tmp_path / "run", cwd=stand_in,
                                     monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert "step     1 | hellaswag acc_norm" in out


def test_finetune_gpt2_xl_recipe(stand_in, tmp_path, monkeypatch, capsys):
    cfg, _ = parse_args(TrainConfig, [recipe("finetune_gpt2_xl.args")])
    assert (cfg.init_from, cfg.fsdp, cfg.activation_checkpointing) == ("gpt2-xl", True, "none")
    code, out, err = run_in_process(recipe("finetune_gpt2_xl.args"), "--init_from", stand_in / "gpt2-local",
                                     "--no-fsdp", "--T", "32", "--max_steps", "1", "--eval_iters", "1",
                                     "--num_samples", "1", "--out_dir", tmp_path / "ft", cwd=stand_in,
                                     monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert "> ROMEO:" in out


def test_finetune_gpt2_xl_on_one_24gb_gpu_recipe(stand_in, tmp_path, monkeypatch, capsys):
    """The same run with the state in RAM (--cpu_offload): here on the CPU, where the offload changes
    nothing but runs FSDP2's path in one process."""
    cfg, _ = parse_args(TrainConfig, [recipe("finetune_gpt2_xl_24gb.args")])
    assert (cfg.init_from, cfg.cpu_offload, cfg.fsdp, cfg.B, cfg.T) == ("gpt2-xl", True, False, 4, 512)
    code, out, err = run_in_process(recipe("finetune_gpt2_xl_24gb.args"), "--init_from", stand_in / "gpt2-local",
                                     "--T", "32", "--max_steps", "1", "--eval_iters", "1", "--num_samples", "1",
                                     "--out_dir", tmp_path / "ft", cwd=stand_in, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert "memory in RAM (--cpu_offload)" in out and "> ROMEO:" in out


SIZES = {"gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50257)}
MEMORY = re.compile(r"about ([\d.]+) gib a gpu, ([\d.]+) gib with its margin, on (\d+) gpus? of (\d+) gb")


@pytest.mark.parametrize("name", ["gpt2_350m.args", "gpt2_774m.args", "gpt2_1558m.args", "finetune_gpt2.args",
                                  "finetune_gpt2_xl.args", "finetune_gpt2_xl_24gb.args"])
def test_the_bigger_recipes_fit_their_hardware_by_the_fitted_formula_with_its_margin(name, monkeypatch):
    """Each recipe for the bigger GPT-2s, and each fine-tuning one, says the memory a GPU needs at its
    settings, on the hardware it names: the figure the run's own start line will print (machinery/memory.py's
    plan), which with the estimate's margin fits a GPU of that size counted as decimal GB (a card holds a
    little more), with no warning. A recipe or the formula changed without the other fails here."""
    import types

    import torch

    import machinery.memory
    from train_gpt2 import GPT, GPTConfig

    said = MEMORY.search(" ".join(comments(REPO / "configs" / name).split()))  # (comments() lowercases)
    assert said, f"{name} does not say its memory a GPU"
    about, with_margin, gpus, gb = float(said[1]), float(said[2]), int(said[3]), int(said[4])
    cfg, _ = parse_args(TrainConfig, [recipe(name)])
    shape = SIZES.get(cfg.init_from) or dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                             block_size=cfg.block_size, vocab_size=cfg.vocab_size)
    with torch.device("meta"):
        model = GPT(GPTConfig(**shape))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "a GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=gb * 1e9))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(machinery.memory, "available_ram", lambda: 2**40)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(gpus))
    lines = machinery.memory.plan_memory(model, cfg, gpus, "cuda", torch.bfloat16)
    need = sum(bytes_ for _, bytes_ in machinery.memory.memory_needs(model, cfg, gpus, torch.bfloat16)) / 2**30
    assert float(re.search(r"= about ([\d.]+) GiB \|", lines)[1]) == about == round(need, 1), lines
    assert round(need * machinery.memory.FIT_MARGIN, 1) == with_margin
    assert "fit" not in lines  # no "likely does not fit", no "may not fit"
    if cfg.cpu_offload:  # and the RAM it says
        held = re.search(r"([\d.]+) GiB with weights and gradients page-locked", lines)[1]
        assert f"in ram {held} gib" in comments(REPO / "configs" / name)
