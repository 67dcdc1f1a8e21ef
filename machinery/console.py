"""
The lines a run prints: print0 (rank 0 speaks), say_error (the line that ends a run), one line per
step, and the lines that describe the model, the data, what the run will write, an evaluation and what
the run wrote. train_gpt2.py prints them (and its optimizer's two lines itself, in configure_optimizers).
"""

import os
import sys

import numpy as np

from machinery.files import free_bytes, in_units, print_line, say_once
from machinery.memory import ADAM_BYTES, WEIGHT_BYTES
from machinery.tokens import read_manifest


def print0(line, file=None):
    """print(line), from one process only: torchrun gives each process it starts a RANK, and rank 0 speaks.
    (A console gone mid-run, a `| tee` stopped with it, does not stop the run: print_line.)"""
    if int(os.environ.get("RANK", 0)) == 0:
        print_line(line, file or sys.stdout)


def say_error(error, every_process=False):
    """`error: ...` on stderr for an error that ends a run (an exception, or its description): once on each
    machine for one that every process meets alike (every_process, or its class says so: a SettingError, a
    diverged loss), with say_once; from every process that meets it otherwise. Returns the exit code, 1."""
    if every_process or getattr(error, "every_process", False):
        say_once(f"error: {error}")
    else:
        print_line(f"error: {error}", sys.stderr)
    return 1


def format_seconds(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def step_line(record, step_times, max_steps):
    """The line printed for each step, with the time left estimated from the typical step."""
    typical = np.median(step_times[1:] if len(step_times) > 1 else step_times)  # (this run's first step warms up)
    eta = format_seconds(typical * (max_steps - record["step"] - 1))
    return (f"step {record['step']:5d} | loss {record['loss']:.6f} | lr {record['lr']:.1e} | "
            f"norm {record['norm']:.2f} | {record['ms']:.1f} ms | {record['tok_per_s']:.0f} tok/s | "
            f"{record['tflops']:.{1 if record['tflops'] >= 10 else 3}f} TFLOP/s" +
            (f" | MFU {record['mfu']:.1f}%" if "mfu" in record else "") +
            f" | eta {eta}")


def describe_model(model, cfg, start_step, ckpt):
    """The model's line: where it comes from, its shape. Under it, for a resume, what differs from the
    run (describe_resume); for a fresh run into another run's out_dir, that its checkpoint will be replaced."""
    n_params = sum(p.numel() for p in model.parameters())  # the tied matrix counts once
    c = model.config
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    source = f"resumed from {ckpt_path} at step {start_step}" if cfg.resume else cfg.init_from
    lines = [f"model {source} | {c.n_layer} layers, {c.n_head} heads, {c.n_embd} channels, "
             f"vocab {c.vocab_size}, block {c.block_size} | {n_params:,} parameters"]
    if cfg.resume:
        lines += describe_resume(cfg, start_step, ckpt["train_config"])
    elif cfg.init_from == "scratch" and (cfg.eval_only or not cfg.max_steps):
        lines.append("note: a scratch model's weights are random, and this run trains none: name a trained model "
                     "with --init_from, or --resume a run's")
    elif os.path.exists(ckpt_path) and cfg.max_steps and not cfg.eval_only:
        lines.append(f"note: {ckpt_path} exists; this fresh run (no --resume) replaces it when it saves its own, "
                     "and its log.jsonl then (until then this run logs to log.new.jsonl; stopped before, it saves "
                     "nothing)")
    elif os.path.exists(os.path.join(cfg.out_dir, "log.jsonl")) and cfg.max_steps and not cfg.eval_only:
        lines.append(f"note: {os.path.join(cfg.out_dir, 'log.jsonl')} exists (a run's that saved no checkpoint); this "
                     "fresh run replaces it when it saves its first checkpoint (until then it logs to log.new.jsonl)")
    return "\n".join(lines + evaluation_rounded(cfg))


def evaluation_rounded(cfg):
    """--eval_only where B*T*processes does not divide the tokens an evaluation reads (eval_iters steps of
    total_batch_size; a training run's always divides them): the line saying how many it reads instead."""
    tokens, batch = cfg.eval_iters * cfg.total_batch_size, cfg.B * cfg.T * int(os.environ.get("WORLD_SIZE", 1))
    if not cfg.eval_only or tokens % batch == 0:
        return []
    return [f"note: validation reads {max(1, tokens // batch) * batch:,} tokens, not eval_iters x total_batch_size = "
            f"{tokens:,}, which B*T*processes = {batch:,} does not divide: its loss compares only roughly with a "
            "run's (a --B that divides them reads the same tokens)"]


def describe_resume(cfg, start_step, saved):
    """The lines under a resumed model's: another --B than the run's (what that changes), nothing left to
    train, or optimisation settings other than the run's (changed_optimisation)."""
    lines = []
    if saved["B"] != cfg.B:
        size = "smaller" if cfg.B < saved["B"] else "bigger"  # (more or fewer of them: accumulation, or processes)
        lines.append(f"--B {cfg.B} instead of the run's {saved['B']}: the same {cfg.total_batch_size:,} tokens per "
                     f"step in {size} micro-batches")
    if cfg.eval_only:
        return lines
    if start_step >= cfg.max_steps:  # (it only samples)
        return lines + [f"nothing to train: the run has done {start_step} steps, --max_steps is {cfg.max_steps} "
                        "(a higher one trains on)"]
    return lines + changed_optimisation(cfg, saved, start_step)


# the settings a resume takes from its command, not the checkpoint, that change the steps it trains
OPTIMISATION = ("max_steps", "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip")


def changed_optimisation(cfg, saved, start_step):
    """A resume is the run's command with --resume. Where its optimisation settings differ from the run's
    (a higher --max_steps to train on, or a flag left out), one line says so: the learning-rate schedule is
    get_lr's for the new settings, so from start_step the rate is not what the run's would have been. So
    does a --seed or --shuffle typed other than the run's, where they order the shards it reads."""
    order = ("shuffle", "seed") if cfg.data_dir and cfg.shuffle else ("shuffle",) if cfg.data_dir else ()
    changes = [f"--{name} {getattr(cfg, name)} (the run's: {saved[name]})" for name in OPTIMISATION + order
               if name in saved and saved[name] != getattr(cfg, name)]
    if not changes:
        return []
    return [f"note: resumed with {', '.join(changes)}: from step {start_step} on, training follows these "
            "settings, not the run's"]


def checkpoint_bytes(model):
    """A checkpoint's size, from the parameter count: float32 weights and AdamW's two moments (the tied
    matrix once; the rest of a checkpoint is a few kB)."""
    return (WEIGHT_BYTES + ADAM_BYTES) * sum(p.numel() for p in model.parameters())


def checkpoint_room(cfg, size, start_step):
    """The free space a run's checkpoints of `size` bytes need. A save writes the new one whole before it
    replaces the last one: one checkpoint's room, and for a run that saves more than once, room for its
    second while its first is there, less what the first frees by replacing a ckpt.pt out_dir holds now."""
    next_due = (start_step // cfg.checkpoint_interval + 1) * cfg.checkpoint_interval if cfg.checkpoint_interval else 0
    if not 0 < next_due < cfg.max_steps:  # saves once: at the end (a periodic save, then the last step's: twice)
        return size
    there = os.path.join(cfg.out_dir, "ckpt.pt")
    return max(size, 2 * size - (os.path.getsize(there) if os.path.isfile(there) else 0))


def describe_plan(cfg, model, start_step):
    """Said before the first step: a warmup longer than the run, what the run will write, and how big the
    checkpoint will be. Where the disk has less room than the checkpoints need, the run stops here, not at
    a save (rank 0 saves)."""
    size, free = checkpoint_bytes(model), free_bytes(cfg.out_dir)
    need = checkpoint_room(cfg, size, start_step)
    if int(os.environ.get("RANK", 0)) == 0 and free < need:
        held = ", two at once: the last one is replaced only once the next is whole" if need > size else ""
        raise ValueError(f"--out_dir {cfg.out_dir!r} has {in_units(free)} free, less than the run's checkpoints "
                         f"need (about {in_units(need)}{held}): free some space, or choose another --out_dir")
    if cfg.export_dir and int(os.environ.get("RANK", 0)) == 0:
        export_need, free = WEIGHT_BYTES * sum(p.numel() for p in model.parameters()), free_bytes(cfg.export_dir)
        if free < export_need:  # (float32 weights)
            raise ValueError(f"--export_dir {cfg.export_dir!r} has {in_units(free)} free, less than the export needs "
                             f"(about {in_units(export_need)}): free some space, or choose another folder")
    when = f"every {cfg.checkpoint_interval} steps and at the end" if cfg.checkpoint_interval else "at the end"
    export = ""
    if cfg.export_dir:  # (a model already there is replaced, file by file, only once the new one is made)
        holds_a_model = os.path.exists(os.path.join(cfg.export_dir, "model.safetensors"))
        export = f"; exports to {cfg.export_dir} at the end{' (replacing the model there)' if holds_a_model else ''}"
    return warmup_note(cfg) + (f"writes {os.path.join(cfg.out_dir, 'ckpt.pt')} {when} (about {in_units(size)}: "
            f"weights and AdamW moments), {os.path.join(cfg.out_dir, 'log.jsonl')} and "
            f"{os.path.join(cfg.out_dir, 'progress.png')}{export}")


def describe_data(cfg, train_loader, val_loader, world_size, grad_accum_steps):
    """The line that says what a run trains on, and how many tokens make one optimizer step (cfg's total_batch_size,
    filled in by train_gpt2.batch_arithmetic)."""
    batch = (f"{cfg.total_batch_size:,} tokens per step = {cfg.B} x {cfg.T} x {world_size} processes "
             f"x {grad_accum_steps} accumulation steps")
    if not cfg.data_dir:
        return f"data {cfg.input_file} | {train_loader.n_tokens:,} train tokens | {batch}"
    listed = read_manifest(cfg.data_dir)["shards"]
    shuffle = "on" if train_loader.shuffle else "off"
    return (f"data {cfg.data_dir} | {describe_split('train', train_loader, listed)} | "
            f"{describe_split('val', val_loader, listed)} | shuffle {shuffle} | {batch}")


def describe_split(split, loader, listed):
    """"3 train shards (1 shorter than a batch, passed over), 1,450 tokens": the shards the loader reads (None:
    no validation, none), and the split's tokens, all its shards' (listed: the manifest's shards)."""
    shards = [shard for shard in listed if shard["split"] == split]
    read = len(loader.shards) if loader else 0  # (the loader reads none shorter than one batch)
    short = f" ({len(shards) - read} shorter than a batch, passed over)" if len(shards) > read else ""
    return f"{read} {split} shards{short}, {sum(shard['tokens'] for shard in shards):,} tokens"


def describe_evaluation(step, results):
    lines = []
    if "val_loss" in results:
        lines.append(f"step {step:5d} | val loss {results['val_loss']:.4f}")
    if "hellaswag_acc_norm" in results:
        lines.append(f"step {step:5d} | hellaswag acc_norm {results['hellaswag_acc_norm']:.4f}")
    return "\n".join(lines)


def warmup_note(cfg):
    """A line (with its newline) for a warmup as long as the run or longer, whose learning rate never reaches
    --lr or reaches it in the last step only (a recipe's warmup in a shortened run, say); else nothing."""
    if cfg.warmup_steps < cfg.max_steps:
        return ""
    more = cfg.warmup_steps > cfg.max_steps
    return (f"note: --warmup_steps {cfg.warmup_steps} is {'more than' if more else 'equal to'} --max_steps "
            f"{cfg.max_steps}: the learning rate rises for the whole run and "
            + (f"never reaches --lr {cfg.lr}" if more else f"reaches --lr {cfg.lr} in its last step only") + "\n")


def describe_outputs(out_dir, peak):
    """The run's last line: what it left in out_dir, and the memory it used (peak: describe_peak's words)."""
    ckpt, log, picture = (os.path.join(out_dir, name) for name in ("ckpt.pt", "log.jsonl", "progress.png"))
    wrote = f"wrote {ckpt} ({in_units(os.path.getsize(ckpt))}), {log}" if os.path.isfile(ckpt) else f"wrote {log}"
    return wrote + (f" and {picture}" if os.path.isfile(ckpt) and os.path.isfile(picture) else "") + f" | {peak}"
