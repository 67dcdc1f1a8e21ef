"""The house: imports run one way (scripts on top, train_gpt2.py, then the package machinery/, which
imports no script), so no file runs twice in one process; each module of the package holds one topic
and says so; and the small promises of the command line and the run's first lines."""

import ast
import json
import os
import struct
import subprocess
import sys

import pytest

from conftest import REPO, SCRIPT_ENV, TINY, run_in_process
from machinery.files import first_line

SCRIPTS = ("prepare.py", "hellaswag.py", "train_gpt2.py")
PACKAGE = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "machinery").glob("*.py"))

# Runs a script as `python SCRIPT ARGS` does, counting how often each project file's module code runs:
# importing a module executes its code through exec(), and the "exec" audit event reports it.
COUNTING_RUNNER = """
import collections, json, os, runpy, sys
counts = collections.Counter()
def count(event, args):
    if event == "exec" and getattr(args[0], "co_name", None) == "<module>":
        counts[os.path.realpath(args[0].co_filename)] += 1
sys.addaudithook(count)
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
print("EXECUTED " + json.dumps({"code": code, "counts": counts}))
"""


def executed_files(script, *args, cwd):
    r = subprocess.run([sys.executable, "-c", COUNTING_RUNNER, str(REPO / script), *map(str, args)], cwd=cwd,
                       env={**os.environ, **SCRIPT_ENV}, capture_output=True, text=True, timeout=300)
    result = json.loads(r.stdout.rsplit("EXECUTED ", 1)[1])
    assert result["code"] == 0, r.stderr
    counts = {os.path.relpath(path, REPO): n for path, n in result["counts"].items()}
    return {path: n for path, n in counts.items() if path in SCRIPTS + tuple(PACKAGE)}  # the project's files


def test_training_with_hellaswag_executes_every_project_file_once(tmp_path, items_file):
    (tmp_path / "text.txt").write_text((REPO / "input.txt").read_text()[:20_000])
    counts = executed_files("train_gpt2.py", *TINY, "--input_file", "text.txt", "--max_steps", "1",
                            "--hellaswag", items_file, "--num_samples", "0", cwd=tmp_path)
    assert counts["train_gpt2.py"] == 1 and counts["machinery/hellaswag_eval.py"] == 1
    assert "hellaswag.py" not in counts  # the story never imports a script
    assert set(counts.values()) == {1}, counts


def test_the_hellaswag_command_executes_every_project_file_once(tmp_path, items_file, hf_gpt2_dir):
    path, _ = hf_gpt2_dir()
    counts = executed_files("hellaswag.py", "--init_from", path, "--data", items_file, "--device", "cpu", cwd=tmp_path)
    assert counts["hellaswag.py"] == 1 and counts["train_gpt2.py"] == 1
    assert set(counts.values()) == {1}, counts


def project_imports(path):
    """The project files `path` imports, at its top or inside functions."""
    own = {p.stem for p in REPO.glob("*.py")} | {"machinery"}
    found = set()
    for node in ast.walk(ast.parse((REPO / path).read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] + [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            if name and name.split(".")[0] in own:
                parts = name.split(".")
                module = "/".join(parts[:2]) + ".py" if parts[0] == "machinery" and len(parts) > 1 else parts[0] + ".py"
                if (REPO / module).exists():
                    found.add(module)
                elif parts[0] != "machinery":
                    found.add(parts[0] + ".py")
    return found - {path}


def test_imports_run_one_way_without_a_circle():
    files = [*SCRIPTS, *PACKAGE]
    edges = {f: project_imports(f) for f in files}
    assert not any(edges[m] & set(SCRIPTS) for m in PACKAGE), "the package imports no script"
    assert edges["train_gpt2.py"].isdisjoint({"prepare.py", "hellaswag.py"})
    assert "train_gpt2.py" in edges["hellaswag.py"]

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, seen + (n,))) for n in edges.get(start, ()))

    assert [f for f in files if reaches(f, f)] == []  # no circle, lazy imports included


# What the repository's top level holds: the three scripts, the package, and the files every project has.
TOP_LEVEL = {*SCRIPTS, "machinery", "input.txt", "requirements.txt", "README.md", "LICENSE", "tests", "configs",
             "docs", ".gitignore", ".ci"}


def test_the_top_level_holds_the_scripts_the_package_and_nothing_stray():
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    tracked = {path.split("/", 1)[0] for path in listed.stdout.splitlines()}
    assert tracked - TOP_LEVEL == set(), "a stray file at the top level: move it under tests/ or docs/, or drop it"


@pytest.mark.parametrize("module", PACKAGE)
def test_each_module_of_the_package_says_what_it_holds_and_stays_small(module):
    source = (REPO / module).read_text()
    assert ast.get_docstring(ast.parse(source)), f"{module} has no docstring"
    assert len(source.splitlines()) <= 420, f"{module} has grown past about 400 lines: split it by topic"


def test_the_story_reads_at_one_sitting_in_short_functions_without_closures():
    """train_gpt2.py stays at most 700 lines; no function of the scripts or the package is longer than 60
    lines (train() sets the run up, training_loop() steps); and none is defined inside another (a closure
    hides what a function reads)."""
    assert len((REPO / "train_gpt2.py").read_text().splitlines()) <= 700
    long, nested = [], []
    for name in (*SCRIPTS, *PACKAGE):
        functions = [node for node in ast.walk(ast.parse((REPO / name).read_text()))
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        long += [f"{name}:{f.name} ({f.end_lineno - f.lineno + 1} lines)" for f in functions
                 if f.end_lineno - f.lineno + 1 > 60]
        nested += [f"{name}:{f.name}.{inner.name}" for f in functions for inner in ast.walk(f)
                   if inner is not f and isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef))]
    assert long == [] and nested == []


def test_no_line_of_the_code_or_its_tests_is_wider_than_120_characters():
    files = [*SCRIPTS, *PACKAGE, *(p.relative_to(REPO).as_posix() for p in (REPO / "tests").glob("*.py"))]
    wide = [f"{name}:{number}" for name in files
            for number, line in enumerate((REPO / name).read_text().splitlines(), 1) if len(line) > 120]
    assert wide == []


def test_first_line_is_the_first_sentence_and_not_cut_at_an_abbreviation():
    assert first_line(ValueError("bad thing. Second sentence.\nmore")) == "bad thing"
    assert first_line(ValueError("expected a path, e.g. a file. Then more")) == "expected a path, e.g. a file"
    assert first_line(ValueError("")) == "ValueError"


def test_a_misspelled_flag_says_which_flag_was_meant(tmp_path, monkeypatch, capsys):
    code, out, err = run_in_process("--max_step", "5", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert (code, out) == (2, "")
    assert err == "error: unrecognized arguments: --max_step 5; did you mean --max_steps? (see --help)\n"
    code, out, err = run_in_process("--warmup", "5", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert err == "error: unrecognized arguments: --warmup 5; did you mean --warmup_steps? (see --help)\n"  # (a part)
    code, out, err = run_in_process("--frobnicate", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and "did you mean" not in err  # nothing close: no guess


def test_the_run_says_what_it_will_write_and_how_big_before_its_first_step(tmp_path, monkeypatch, capsys):
    (tmp_path / "text.txt").write_text((REPO / "input.txt").read_text()[:20_000])
    code, out, err = run_in_process(*TINY[:-2], "--input_file", "text.txt", "--max_steps", "1", "--num_samples", "0",
                                    cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    lines = out.splitlines()
    plan = next(i for i, l in enumerate(lines) if l.startswith("writes out/ckpt.pt at the end (about "))
    assert plan < next(i for i, l in enumerate(lines) if l.startswith("step     0 | loss"))
    said = float(lines[plan].split("about ")[1].split(" MB")[0])
    written = (tmp_path / "out" / "ckpt.pt").stat().st_size / 1e6
    assert said == pytest.approx(written, rel=0.02)  # counted from the parameters, checked against the file


def png_size(path):
    width, height = struct.unpack(">II", path.read_bytes()[16:24])  # the IHDR chunk
    return width, height


def test_a_run_without_hellaswag_draws_one_panel_and_with_it_two(tmp_path):
    from machinery.run_log import plot_log

    records = [{"step": s, "loss": 10 - s / 10, "tokens": 128 * (s + 1)} for s in range(20)]
    records[0]["val_loss"] = 10.8
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    records[0]["hellaswag_acc_norm"] = 0.25
    (tmp_path / "hs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plot_log(tmp_path / "plain.jsonl", str(tmp_path / "plain.png"))
    plot_log(tmp_path / "hs.jsonl", str(tmp_path / "hs.png"))
    (plain_w, plain_h), (hs_w, hs_h) = png_size(tmp_path / "plain.png"), png_size(tmp_path / "hs.png")
    assert plain_h == hs_h and plain_w < 0.7 * hs_w  # no half-empty HellaSwag panel


def test_init_from_a_checkpoint_takes_its_shape_and_names_every_contradiction(tmp_path, monkeypatch, capsys):
    (tmp_path / "text.txt").write_text((REPO / "input.txt").read_text()[:20_000])
    code, out, err = run_in_process(*TINY[:-2], "--input_file", "text.txt", "--max_steps", "1", "--num_samples", "0",
                                    cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    code, out, err = run_in_process("--init_from", "out/ckpt.pt", "--input_file", "text.txt", "--max_steps", "1",
                                    "--num_samples", "0", "--out_dir", "tuned", cwd=tmp_path, monkeypatch=monkeypatch,
                                    capsys=capsys)
    assert code == 0, err
    assert "model out/ckpt.pt | 2 layers, 2 heads, 32 channels, vocab 50257, block 64" in out
    # fine-tuning into the folder it starts from (--out_dir forgotten) would write over the weights it was given
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()
    code, out, err = run_in_process("--init_from", "./out/ckpt.pt", "--input_file", "text.txt", "--max_steps", "1",
                                    cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err == ("error: --init_from ./out/ckpt.pt is the checkpoint this run would write over in "
                                 "--out_dir 'out': give this run another --out_dir (or continue that run with "
                                 "--resume)\n")
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == before
    # evaluating it writes nothing: the same command with --eval_only is not refused
    code, out, err = run_in_process("--init_from", "./out/ckpt.pt", "--input_file", "text.txt", "--eval_only",
                                    cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "val loss" in out and (tmp_path / "out" / "ckpt.pt").read_bytes() == before, err
    # a scratch model that trains nothing is random weights: said, not refused
    code, out, err = run_in_process(*TINY[:-2], "--max_steps", "0", "--num_samples", "0", cwd=tmp_path,
                                    monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "note: a scratch model's weights are random, and this run trains none: name a trained " \
        "model with --init_from, or --resume a run's" in out, err
    code, out, err = run_in_process("--init_from", "out/ckpt.pt", "--max_steps", "0", "--n_layer", "3", "--n_embd",
                                    "48", "--n_head", "2", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1
    assert err == ("error: checkpoint 'out/ckpt.pt' has n_layer=2, n_embd=32; the command line says n_layer=3, "
                   "n_embd=48 (leave these flags out: the checkpoint decides them)\n")
    # (40 channels do not split into the default flag's 12 heads, but the checkpoint decides the heads too)
    code, out, err = run_in_process("--init_from", "out/ckpt.pt", "--max_steps", "0", "--n_embd", "40", cwd=tmp_path,
                                    monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err == ("error: checkpoint 'out/ckpt.pt' has n_embd=32; the command line says n_embd=40 "
                                 "(leave these flags out: the checkpoint decides them)\n")
    # the same flags from a recipe (the user typed none of them): the line names the recipe, as argparse's do
    (tmp_path / "shape.args").write_text("--n_layer 3\n--n_embd 48\n--n_head 2\n")
    code, out, err = run_in_process("--init_from", "out/ckpt.pt", "--max_steps", "0", "@shape.args", "--n_embd", "32",
                                    cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err == ("error: checkpoint 'out/ckpt.pt' has n_layer=2; the command line says n_layer=3 (in "
                                 "recipe shape.args) (leave these flags out: the checkpoint decides them)\n")


def test_a_stop_at_the_last_step_still_evaluates_and_saves_the_trained_model(tmp_path, monkeypatch, capsys):
    import train_gpt2

    (tmp_path / "text.txt").write_text((REPO / "input.txt").read_text()[:20_000])
    calls = []
    monkeypatch.setattr(train_gpt2, "stop_requested_anywhere",
                        lambda requested, device: calls.append(1) or len(calls) == 3)
    code, out, err = run_in_process(*TINY[:-2], "--input_file", "text.txt", "--max_steps", "3", "--num_samples", "0",
                                    cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err  # the signal came after the last step: the run ends as planned
    records = [json.loads(l) for l in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3 and "val_loss" in records[-1]
    assert "wrote out/ckpt.pt" in out


def test_a_checkpoint_written_before_steps_done_and_named_optimizer_state_still_resumes(tmp_path, monkeypatch,
                                                                                          capsys):
    """Files from before this version said "step" and numbered AdamW's parameters (optimizer.state_dict())."""
    import torch

    (tmp_path / "text.txt").write_text((REPO / "input.txt").read_text()[:20_000])
    args = [*TINY[:-2], "--input_file", "text.txt", "--num_samples", "0", "--dtype", "float32"]
    code, out, err = run_in_process(*args, "--max_steps", "3", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    reference = [json.loads(l) for l in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    code, out, err = run_in_process(*args, "--max_steps", "2", "--out_dir", "old", cwd=tmp_path,
                                    monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    ckpt = torch.load(tmp_path / "old" / "ckpt.pt", weights_only=True)
    names = ckpt["optimizer"]["param_groups"][0]["params"] + ckpt["optimizer"]["param_groups"][1]["params"]
    number = {name: i for i, name in enumerate(names)}  # the order torch numbers them in: the groups'
    ckpt["optimizer"]["state"] = {number[n]: v for n, v in ckpt["optimizer"]["state"].items()}
    for group in ckpt["optimizer"]["param_groups"]:
        group["params"] = [number[n] for n in group["params"]]
    ckpt["step"] = ckpt.pop("steps_done")
    torch.save(ckpt, tmp_path / "old" / "ckpt.pt")
    code, out, err = run_in_process(*args, "--max_steps", "3", "--resume", "--out_dir", "old", cwd=tmp_path,
                                    monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    resumed = [json.loads(l) for l in (tmp_path / "old" / "log.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in resumed] == [r.get("loss") for r in reference]
    # the trained model's val_loss: step 2's update used the old moments (step 2's own val_loss is the
    # evaluation that ended the 2-step run, which the resumed log keeps)
    assert [r.get("val_loss") for r in resumed if r["step"] != 2] == \
        [r.get("val_loss") for r in reference if r["step"] != 2]


def test_an_eval_interval_of_zero_is_one_line(tmp_path, monkeypatch, capsys):
    code, out, err = run_in_process("--eval_interval", "0", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert (code, out, err) == (1, "", "error: --eval_interval must be positive, got 0\n")
