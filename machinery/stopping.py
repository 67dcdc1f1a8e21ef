"""
Stopping: by a signal (Ctrl-C, the SIGTERM that torchrun and cluster schedulers send, or SIGHUP), in every
process at the same step, or because the loss diverged. train_gpt2.py's loop asks these after each step,
and says with them how a run stopped; a checkpoint's write holds signals until the file is whole (SignalsHeld).
"""

import contextlib
import os
import signal
import sys
import threading

import numpy as np
import torch
import torch.distributed as dist

from machinery.console import print0


class TrainingDiverged(Exception):
    """The loss became inf or nan: nothing from this point on is worth saving."""
    every_process = True  # (the loss is averaged across processes: all of them stop on it, and it is said once)


def stop_signals():
    """The signals that stop a run after its step: Ctrl-C (SIGINT); SIGTERM, what torchrun sends its workers on
    Ctrl-C and cluster schedulers send before preempting a job; SIGHUP, the terminal closed or the ssh connection
    lost, unless it is ignored (as under `nohup python`: then the run goes on, as asked; torchrun passes a
    SIGHUP on to its workers, nohup or not)."""
    hangup = getattr(signal, "SIGHUP", None)  # (Windows has none)
    ignored = hangup is None or signal.getsignal(hangup) in (signal.SIG_IGN, None)  # (None: set outside Python)
    return (signal.SIGINT, signal.SIGTERM) + (() if ignored else (hangup,))


class StopRequested:
    """Ctrl-C (SIGINT), SIGTERM or SIGHUP during training asks to stop after the current step, so the
    checkpoint written on the way out is a consistent step (stop_signals). A second signal
    interrupts at once: the handlers it found answer it (a second Ctrl-C, Python's KeyboardInterrupt; a
    second SIGTERM, interrupt_at_once, which main set through sigterm_stops_at_once). Except a SIGTERM
    after a SIGTERM under torchrun: a scheduler (Slurm) signals every process of a job, torchrun among them,
    which passes its own on, so each process gets the one request twice (torchrun ends its processes itself
    when they take longer than its --shutdown-timeout; after a Ctrl-C, its SIGINT passed on, a second Ctrl-C
    reaches them as a SIGTERM: at once). Use as `with StopRequested(log) as stop:`, then read
    stop.requested (the RunLog says whether the stop will save: not over another run's checkpoint)."""

    def __init__(self, log=None):
        self.log = log

    def __enter__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self._handle) for s in stop_signals()}
        return self

    def _handle(self, signum, frame):
        if self.requested:  # (a SIGTERM after a SIGTERM under torchrun, the one handler left in place: the same)
            return
        self.requested = True
        same_again = signal.SIGTERM if signum == signal.SIGTERM and "RANK" in os.environ else None
        for s, handler in self.previous.items():  # a second signal: main's handlers (see the docstring)
            if s != same_again:
                signal.signal(s, handler)
        other_run = self.log.out_dir if self.log is not None and self.log.other_checkpoint_kept() else None
        say_stopping(signum, other_run)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def __exit__(self, *exc):
        self.restore()


class SignalsHeld:
    """Ctrl-C, SIGTERM and SIGHUP (stop_signals) held while the block runs, then delivered to the handlers there
    were. torch.save turns an exception raised inside it (a second signal's KeyboardInterrupt) into a RuntimeError
    about the file's position, with a traceback: a signal during a checkpoint's write now acts once the file is
    whole (a second one: the run stops at once, with that checkpoint). Only the main thread may set handlers, and a
    handler set outside Python (None) could not be put back: those are left as they are."""

    def __enter__(self):
        self.held, self.previous = [], {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.getsignal(s) for s in stop_signals() if signal.getsignal(s) is not None}
            for s in self.previous:
                signal.signal(s, self._hold)
        return self

    def _hold(self, signum, frame):
        self.held.append(signum)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        for signum in self.held:
            signal.raise_signal(signum)  # (to the handler put back: StopRequested's, or main's, or the OS's)


def say_stopping(signum, other_run=None):
    """The first signal's answer, at once (the step, or an evaluation before it, may run for minutes), from
    rank 0: torchrun passes a signal on to every process. Written straight to the file descriptor: a
    handler that print()s while the interrupted code is printing to the same stream raises an error.
    other_run: the out_dir whose checkpoint is another run's, which this stop leaves as it is."""
    if int(os.environ.get("RANK", 0)) == 0:
        saving = "with a checkpoint" if other_run is None else \
            f"without saving over {os.path.join(other_run, 'ckpt.pt')}, another run's (unless a checkpoint of this " \
            "run falls due first)"
        then = "torchrun ends the processes, saved or not, after its --shutdown-timeout (30 s unless set)" \
            if signum == signal.SIGTERM and "RANK" in os.environ else \
            "a second Ctrl-C or SIGTERM stops at once, without saving"
        line = f"{signal.Signals(signum).name}: stopping after this step, {saving}; {then}\n"
        with contextlib.suppress(OSError):  # (stderr closed: nothing to tell)
            os.write(2, line.encode())


def interrupt_at_once(signum, frame):
    """SIGTERM outside the training loop, or a second one in it, as Ctrl-C there: a KeyboardInterrupt, which
    main says in one line (stopped_at_once)."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_stops_at_once():
    """Outside the training loop (the model built, a checkpoint read, the last samples, the export) SIGTERM
    stops at once as Ctrl-C does, with main's one line, where the OS would end the process without a word.
    In the loop StopRequested answers it instead, and puts this back after. A SIGTERM ignored, or handled
    by code outside Python (getsignal says None: it could not be put back), is left as it is, and so is
    every signal where main runs outside the main thread (only the main thread may set handlers)."""
    previous = signal.getsignal(signal.SIGTERM)
    if previous in (None, signal.SIG_IGN) or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.signal(signal.SIGTERM, interrupt_at_once)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_requested_anywhere(requested, device):
    """Whether any process was asked to stop. A signal reaches one process (or all, at slightly
    different steps): every process must stop after the same step, or the others wait forever in
    the next step's collectives. One tiny all-reduce a step (a fraction of a millisecond, see
    docs/performance.md)."""
    flag = torch.tensor(float(requested), device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def check_finite(loss, norm, scaled, step, out_dir):
    """Stops the run (before it saves the state) at a loss that is inf or nan, or a gradient norm that is: AdamW
    applied those gradients, so the weights are no longer finite either. Not under float16's loss scaling
    (scaled): its GradScaler skips the update of a step whose gradients overflowed, and scales down."""
    if np.isfinite(loss) and (np.isfinite(norm) or scaled):
        return
    what = f"loss is {loss}" if not np.isfinite(loss) else f"the gradient norm is {norm}"
    raise TrainingDiverged(f"{what} at step {step}; stopping. The checkpoint in {out_dir!r}, if any, is left untouched")


def stopped_before_saving(steps_done, out_dir):
    """A fresh run stopped before its first checkpoint, in an out_dir holding another run's: this run saves
    nothing, so that run stays whole (checkpoint, log and picture) and can be resumed. Returns the exit code."""
    print0(f"interrupted after {steps_done} steps, without saving: {os.path.join(out_dir, 'ckpt.pt')} is still the "
           "other run's (this run's log: log.new.jsonl; run the same command again to start this run over)")
    return 130


def stopped_after_saving(steps_done, out_dir):
    """A run stopped mid-way, its steps saved (train_gpt2.stop_mid_run). Returns the exit code."""
    print0(f"interrupted: saved step {steps_done} to {os.path.join(out_dir, 'ckpt.pt')}; continue with --resume")
    return 130


def stopped_at_once(interrupt, out_dir):
    """Ctrl-C or SIGTERM outside the training loop (building the model, the last samples, the export) or a
    second one in it stops at once, without saving: one line (from rank 0) on what is kept, or the interrupt's own
    (an --eval_only HellaSwag's: how far it got). Returns the exit code."""
    kept = os.path.join(out_dir, "ckpt.pt")
    said = str(interrupt) or \
        f"stopped at once, saving and exporting nothing more; {kept} holds the last checkpoint written, if any"
    print0(f"interrupted: {said}", file=sys.stderr)
    return 130  # (128 + SIGINT, as a shell reports a Ctrl-C: for SIGTERM too, one code for "stopped")


# what a collective says when another process of the run has gone: gloo over TCP, NCCL
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def another_process_stopped(error):
    """For main, under torchrun: a collective that failed because another process stopped first (with its
    own line saying why) is one line from this process too, and exit code 1. Any other error is raised
    again, with its traceback: it is not one of the run's expected faults."""
    if not (dist.is_initialized() and any(words in str(error) for words in PEER_GONE)):
        raise error
    print(f"error: process {dist.get_rank()} stopped: another process of the run stopped first (its line says why; "
          "none if it was killed outright: by the OOM killer, say)", file=sys.stderr, flush=True)
    return 1
