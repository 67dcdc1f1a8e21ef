"""
The run's log and its picture: out_dir/log.jsonl (one JSON object per step), out_dir/progress.png
drawn from it with OpenAI's marks, and, when asked for, the same records sent to Weights & Biases.
train_gpt2.py writes through RunLog; plot_log redraws any run's picture from its log.
"""

import contextlib
import functools
import json
import os
from dataclasses import asdict

import numpy as np

from machinery.console import print0
from machinery.files import DISK_FULL, DiskFull, first_line, is_whole_number, lock_folder, write_atomically
from machinery.hellaswag_eval import GPT3_SMALL_HELLASWAG, REFERENCE
from machinery.tokens import FINEWEB_EDU, MANIFEST, SHARD_SIZE


def parse_log_line(line):
    """One log record, or None for a line a killed run left half-written (or one damaged otherwise: not
    JSON, bytes that are not UTF-8, no whole-number step)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and is_whole_number(record.get("step")) else None


def file_identity(path):
    """(inode, modification time) of a file, or None where there is none: a checkpoint written since has
    another (it is written under a temporary name and renamed over the old one)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def disk_full_hint(out_dir, resumed):
    """What to do after a full disk stopped a run writing to out_dir: continue from its checkpoint, or,
    where it has none yet, run the same command again. A fresh run beside another run's files has none
    of its own until its log, log.new.jsonl until then, takes log.jsonl's name (RunLog.checkpointed)."""
    saved = os.path.isfile(os.path.join(out_dir, "ckpt.pt")) and \
        (resumed or not os.path.exists(os.path.join(out_dir, "log.new.jsonl")))
    if saved:
        return "the last checkpoint is intact: free some space and continue with --resume"
    return "no checkpoint of this run was saved yet: free some space and run the same command again"


# The marks a GPT-2 (124M) reproduction is measured against, for the picture:
# OpenAI's GPT-2 124M on the first 100M tokens of FineWeb-Edu sample-10BT in GPT-2 tokens (prepare.py's
# val_000000.npy), as published with the classic reproduction (build-nanogpt), which used that same shard
GPT2_FINEWEB_EDU_VAL_LOSS = 3.2924


# the parts of a log record that evaluate the model (the rest describe the step that trained it)
EVALUATION = ("val_loss", "hellaswag_acc", "hellaswag_acc_norm")


def gpt2_val_loss_on(data_dir):
    """GPT-2 124M's published validation loss on data_dir's first shard, where it is known: FineWeb-Edu
    sample-10BT prepared by prepare.py in shards of its default size (another size makes another first
    shard), its first shard the val split (a part of it that fits in one shard is split 90/10 instead).
    None for other data (get it with --init_from gpt2 --eval_only)."""
    if not data_dir:
        return None
    with open(os.path.join(data_dir, MANIFEST)) as f:
        manifest = json.load(f)
    first = (manifest.get("shards") or [{}])[0]
    fineweb = manifest.get("source") == ":".join(FINEWEB_EDU) and manifest.get("tokenizer") == "gpt2" and \
        manifest.get("shard_size") == SHARD_SIZE and first.get("split") == "val"
    return GPT2_FINEWEB_EDU_VAL_LOSS if fineweb else None


def start_wandb(cfg):
    """A Weights & Biases run that receives the run's config and every log record. wandb is imported
    only here: it is optional. WANDB_MODE=offline records it locally (wandb sync uploads it later)."""
    import wandb

    try:
        return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=asdict(cfg))
    except Exception as e:  # no login, no network in online mode, ...: wandb's own errors
        raise ValueError(f"could not start wandb: {first_line(e)} "
                         "(WANDB_MODE=offline logs without a network)") from None


class RunLog:
    """out_dir/log.jsonl, one JSON object per step (pandas.read_json(path, lines=True) reads it back),
    out_dir/progress.png drawn from it, and with --wandb_project the same records sent to Weights &
    Biases. Only rank 0 writes; on the other ranks this does nothing. A resume keeps the records before
    its checkpoint (sent to W&B again, so its run is whole) and redoes the rest; the record of the
    checkpoint's own step (the end of the run it continues, with its evaluation) stays until the resume's
    first record, which carries that evaluation on, takes its place (a resume killed before then loses none).

    A fresh run into an out_dir that holds another run's checkpoint (or log) leaves that run's log and
    picture as they are until this run's own checkpoint replaces it: until then it writes log.new.jsonl
    and progress.new.png, which take the names log.jsonl and progress.png when the training loop says, through
    checkpointed(), that its checkpoint is written. A run stopped before that leaves the other run whole:
    a stop signal then saves nothing (keeps_other_checkpoint), and the other run can still be resumed."""

    def __init__(self, cfg, start_step):
        self.out_dir, self.resumed, self.file, self.tracker = cfg.out_dir, cfg.resume, None, None
        self.start_step, self.ended, self.lock = start_step, None, None
        self.ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        self.other_checkpoint = file_identity(self.ckpt_path)  # (changed since: this run's)
        # (every process: a fresh run's stop before its first checkpoint saves none, stop_mid_run asks)
        self.keeps_other_checkpoint = not cfg.resume and self.other_checkpoint is not None
        if int(os.environ.get("RANK", 0)) != 0:
            return
        if cfg.wandb_project:  # (first: a W&B that cannot start leaves out_dir untouched)
            self.tracker = start_wandb(cfg)
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.lock = lock_folder(cfg.out_dir)  # (held until close: a second run into this folder is refused)
        if cfg.resume:
            self.settle_new_log()
        names = [os.path.join(cfg.out_dir, name) for name in ("ckpt.pt", "log.jsonl")]
        self.beside_another_run = not cfg.resume and any(map(os.path.exists, names))  # (whose files stay for now)
        suffix = ".new" if self.beside_another_run else ""
        self.path = os.path.join(cfg.out_dir, f"log{suffix}.jsonl")
        self.picture = os.path.join(cfg.out_dir, f"progress{suffix}.png")
        self.gpt2_val_loss = gpt2_val_loss_on(cfg.data_dir)
        kept, self.kept_text = [], ""
        if cfg.resume and os.path.exists(self.path):
            with open(self.path, errors="replace") as f:  # (a damaged line's bytes: then not JSON, skipped)
                records = [r for r in map(parse_log_line, f) if r is not None]
            kept = [r for r in records if r["step"] < start_step]
            # the last record of a run that ended there (the evaluation of the checkpoint's own model): kept
            # until the resumed run's first record replaces it (replace_ended)
            self.ended = next((r for r in records if r["step"] == start_step), None)
        self.kept_text = "".join(json.dumps(r) + "\n" for r in kept)
        text = self.kept_text + (json.dumps(self.ended) + "\n" if self.ended is not None else "")
        try:
            write_atomically(self.path, lambda f: f.write(text.encode()))  # a full disk loses no record
        except DiskFull as e:
            raise DiskFull(f"{e}; {disk_full_hint(self.out_dir, self.resumed)}") from None
        self.file = open(self.path, "a")
        for record in kept if self.tracker is not None else ():
            self.tracker.log(record, step=record["step"])

    def settle_new_log(self):
        """What a resume makes of a log.new.jsonl (and progress.new.png) left by a fresh run beside this run's
        files. Killed between writing its first checkpoint and giving its log the name log.jsonl, that run left
        a checkpoint newer than its log: the log is the checkpoint's, and takes the names. Stopped before it
        saved one, it left a log newer than the checkpoint, which is not its: that log is removed."""
        new_log, new_picture = (os.path.join(self.out_dir, name) for name in ("log.new.jsonl", "progress.new.png"))
        if not os.path.exists(new_log):
            return
        checkpoint_written, log_written = os.stat(self.ckpt_path).st_mtime_ns, os.stat(new_log).st_mtime_ns
        if checkpoint_written == log_written:  # (a file system that keeps whole seconds: which came first is unknown)
            return
        the_checkpoints = checkpoint_written > log_written
        for new, name in ((new_log, "log.jsonl"), (new_picture, "progress.png")):
            if os.path.exists(new):
                os.replace(new, os.path.join(self.out_dir, name)) if the_checkpoints else os.remove(new)
        print0(f"note: {new_log} is the log of {self.ckpt_path} (its run was killed before it took the name): "
               "now log.jsonl" if the_checkpoints else f"note: removed {new_log}, left by a fresh run stopped here "
               "before it saved a checkpoint (the checkpoint resumed is another run's)")

    def write(self, record, picture=False):
        """Append one record; with picture=True also redraw progress.png."""
        if self.file is None:
            return
        try:
            if self.ended is not None and record["step"] == self.start_step:
                record = self.replace_ended(record)
            else:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
        except OSError as e:  # a full disk, say: one line, and the checkpoint from before is intact
            with contextlib.suppress(OSError):  # closing flushes the unwritten bytes, and fails again:
                self.file.close()  # close now, so close() on the way out does not replace this error
            self.file = None
            if isinstance(e, DiskFull):  # (replace_ended's whole log, written again: its line names the file)
                raise DiskFull(f"{e}; {disk_full_hint(self.out_dir, self.resumed)}") from None
            if e.errno in DISK_FULL:
                raise DiskFull(f"disk full: writing {self.path} failed ({e.strerror}); "
                               f"{disk_full_hint(self.out_dir, self.resumed)}") from None
            raise OSError(f"writing {self.path} failed ({e.strerror})") from None
        if self.tracker is not None:
            self.tracker.log(record, step=record["step"])
        if picture:
            self.draw()

    def replace_ended(self, record):
        """Write a resume's first record in place of the last one of the run it continues (the log's last
        line until now), with that one's evaluation where this step has none of its own; return it."""
        carried = {k: v for k, v in self.ended.items() if k in EVALUATION and k not in record}
        record, self.ended = {**record, **carried}, None
        text = self.kept_text + json.dumps(record) + "\n"
        self.file.close()  # (the whole log written again, atomically: a kill leaves the old one or the new one)
        write_atomically(self.path, lambda f: f.write(text.encode()))
        self.file, self.kept_text = open(self.path, "a"), None
        return record

    def draw(self):
        """out_dir/progress.png from the log; a failure to draw never stops training."""
        if self.file is None:
            return
        try:
            plot_log(self.path, self.picture, self.gpt2_val_loss)
        except Exception as e:  # no matplotlib, a full disk, ...: say so, train on
            print0(f"could not draw progress.png: {first_line(e)}")

    def checkpointed(self):
        """Called once the run's checkpoint is written: a fresh run's log and picture, kept apart until
        now, take the names of the other run's (whose checkpoint is gone)."""
        self.keeps_other_checkpoint = False
        if self.file is None or not self.beside_another_run:
            return
        log, picture = os.path.join(self.out_dir, "log.jsonl"), os.path.join(self.out_dir, "progress.png")
        os.replace(self.path, log)  # (the open file moves with its name: appends go on into log.jsonl)
        if os.path.exists(self.picture):
            os.replace(self.picture, picture)
        else:  # (none drawn yet: no picture of the other run beside this run's log either)
            with contextlib.suppress(FileNotFoundError):
                os.remove(picture)
        self.path, self.picture, self.beside_another_run = log, picture, False

    def other_checkpoint_kept(self):
        """Whether out_dir's checkpoint is still the other run's now (for what a stop signal's answer says:
        one that comes while this run's first checkpoint is written is answered once the file is whole)."""
        return self.keeps_other_checkpoint and file_identity(self.ckpt_path) == self.other_checkpoint

    def close(self):
        if self.file is not None:
            if self.beside_another_run and file_identity(self.ckpt_path) != self.other_checkpoint:
                self.checkpointed()  # (this run's checkpoint was written, and the run stopped before it said so)
            self.file.close()
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None
        if self.tracker is not None:
            self.tracker.finish()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def plot_log(log_path, png_path, gpt2_val_loss=None):
    """Draw a run from its log.jsonl (a finished run, or one still going): training loss per step, raw
    and smoothed, and validation loss; a second panel with HellaSwag acc_norm when the run evaluated
    it. OpenAI's marks are dashed lines: GPT-2 124M's HellaSwag and GPT-3 Small's as the next one, and
    GPT-2's validation loss on this data where it is known (gpt2_val_loss: 3.2924 on FineWeb-Edu shards
    from prepare.py; RunLog passes it)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    with open(log_path, errors="replace") as f:
        records = [r for r in map(parse_log_line, f) if r is not None]  # a half-written last line is skipped
    hellaswag = [(r["step"], r["hellaswag_acc_norm"]) for r in records if "hellaswag_acc_norm" in r]
    fig, axes = plt.subplots(1, 2 if hellaswag else 1, figsize=(12, 4.5) if hellaswag else (7, 4.5), squeeze=False)
    draw_losses(axes[0][0], records, gpt2_val_loss)
    if hellaswag:
        draw_hellaswag(axes[0][1], hellaswag, xlim=axes[0][0].get_xlim())
    trained = [r for r in records if "tokens" in r]
    if trained:  # tokens seen, on a second axis above each panel
        per_step = trained[-1]["tokens"] / (trained[-1]["step"] + 1)
        for ax in axes[0]:
            top = ax.secondary_xaxis("top", functions=(functools.partial(np.multiply, per_step),  # steps -> tokens
                                                       functools.partial(np.multiply, 1 / per_step)))  # and back
            top.set_xlabel("tokens")
    fig.tight_layout()
    try:
        write_atomically(png_path, functools.partial(fig.savefig, format="png", dpi=100))  # never half a picture
    finally:
        plt.close(fig)


def draw_losses(ax, records, gpt2_val_loss):
    trained = [r for r in records if "loss" in r]  # (the last record of a run may hold an evaluation only)
    steps, losses = [r["step"] for r in trained], [r["loss"] for r in trained]
    # the trend under the batch-to-batch noise: a centred moving average (no lag behind the raw curve)
    half = len(losses) // 50
    smoothed = [np.mean(losses[max(0, i - half): i + half + 1]) for i in range(len(losses))]
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss")
    ax.plot(steps, smoothed, color="tab:blue", label="train loss (smoothed)")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", label="val loss")
    if gpt2_val_loss is not None:
        ax.axhline(gpt2_val_loss, color="gray", linestyle="--", label="GPT-2 124M val loss (OpenAI)")
    ax.set(xlabel="step", ylabel="loss")
    ax.legend()


def draw_hellaswag(ax, points, xlim):
    ax.plot(*zip(*points), "o-", color="tab:green", label="this run")
    ax.axhline(REFERENCE["gpt2"][1], color="gray", linestyle="--", label="GPT-2 124M (OpenAI)")
    ax.axhline(GPT3_SMALL_HELLASWAG, color="black", linestyle="--", label="GPT-3 Small (paper)")
    ax.axhline(0.25, color="lightgray", linestyle=":", label="chance")
    ax.set(xlabel="step", ylabel="HellaSwag acc_norm", xlim=xlim)
    ax.legend()
