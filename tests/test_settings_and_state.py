"""Each setting reaches what it sets, and each piece of saved state comes back: --min_lr 0 and --min_lr equal
to --lr, --grad_clip, --seed for the shard order, --sdpa over a checkpoint's; atomic writes on disk before
their name, every random stream restored, a resumed window moved on when its last target is past its shard,
and the first stop signal's answer. (Each was found missing by a mutation pass: its mutant passed the rest.)"""

import os
import random

import numpy as np
import pytest
import torch

import machinery.files
from machinery.random_streams import get_rng_state, set_rng_state
from test_shards import write_shards
from test_training import run_main
from train_gpt2 import get_lr


def test_write_atomically_has_every_byte_on_disk_before_the_name_points_at_it(tmp_path, monkeypatch):
    """The temporary file is flushed and fsynced (all of its bytes in the file, not in Python's buffer) before
    os.replace gives it the checkpoint's name: a power cut after the rename leaves a whole file."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(str(dst))))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    machinery.files.write_atomically(str(tmp_path / "ckpt.pt"), lambda f: f.write(b"x" * 1000))
    assert events == [("fsync", 1000), ("replace", "ckpt.pt")]
    assert (tmp_path / "ckpt.pt").read_bytes() == b"x" * 1000


def test_set_rng_state_puts_back_every_stream_get_rng_state_saved():
    """Python's, NumPy's, torch's and the sampling generator's streams each draw after set_rng_state what
    they drew after get_rng_state (a resume with dropout, or any other draw, continues the run's)."""
    generator = torch.Generator().manual_seed(3)

    def draws():
        return (random.random(), float(np.random.rand()), torch.rand(3).tolist(),
                torch.rand(3, generator=generator).tolist())

    state = get_rng_state(generator)
    first = draws()
    draws()  # the streams move on
    set_rng_state(state, generator)
    again = draws()
    for name, a, b in zip(("python", "numpy", "torch", "sample"), first, again):
        assert a == b, name


def test_a_min_lr_of_zero_decays_the_rate_to_zero(tmp_path, text_file):
    """--min_lr 0 is a cosine decay to zero (GPT-3's shape), not "no --min_lr" (a constant rate): the rate of
    each step is get_lr's with min_lr 0."""
    code, log = run_main(tmp_path, text_file, "--max_steps", "4", "--lr", "1e-3", "--min_lr", "0")
    assert code == 0
    assert [r["lr"] for r in log if "lr" in r] == pytest.approx([get_lr(s, 1e-3, 0.0, 0, 4) for s in range(4)])
    assert log[3]["lr"] < 0.5e-3


def test_the_gradients_are_clipped_to_grad_clip(tmp_path, text_file, monkeypatch):
    """Every step clips the global gradient norm to --grad_clip, not to the default 1.0."""
    asked, clip = [], torch.nn.utils.clip_grad_norm_

    def recording(parameters, max_norm, *args, **kwargs):
        asked.append(max_norm)
        return clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    code, _ = run_main(tmp_path, text_file, "--max_steps", "3", "--grad_clip", "0.25")
    assert code == 0 and asked == [0.25, 0.25, 0.25]


def test_a_min_lr_equal_to_lr_is_a_constant_rate_and_accepted():
    """--min_lr may equal --lr (a constant rate, as without --min_lr): check_config takes it."""
    from machinery.command_line import check_config, parse_args
    from train_gpt2 import TrainConfig

    cfg, _ = parse_args(TrainConfig, ["--lr", "1e-3", "--min_lr", "1e-3", "--max_steps", "0"])
    check_config(cfg)  # no SettingError


def test_a_resumed_window_whose_last_target_is_past_the_shard_moves_on(tmp_path):
    """A window of W tokens needs W + 1 (its last target): a run of B=2 saved at token 640 of a 704-token shard
    (room for its 33, not for B=4's 65, one short) resumes with B=4 at the next shard's start, and serves it."""
    from machinery.checkpoints import restore_data_position
    from train_gpt2 import DataLoaderLite

    data = write_shards(tmp_path / "d", [704, 704])
    small = DataLoaderLite(2, 16, data_dir=str(data), split="train", shuffle=False)
    big = DataLoaderLite(4, 16, data_dir=str(data), split="train", shuffle=False)
    small.load_state_dict({"epoch": 0, "shard": 0, "position": 608})
    small.next_batch()
    assert (small.file, small.position) == ("train_000000.npy", 640)  # (the B=2 run's place: 640 + 33 <= 704)
    restore_data_position(big, small.state_dict())
    assert (big.epoch, big.file, big.position) == (0, "train_000001.npy", 0)
    x, y = big.next_batch()
    assert x[0, 0].item() == 1000 and y[-1, -1].item() == 1064


class StandInLog:
    """What StopRequested asks of the run's RunLog: whether out_dir's checkpoint is still another run's."""

    def __init__(self, kept):
        self.out_dir, self.kept = "run", kept

    def other_checkpoint_kept(self):
        return self.kept


@pytest.mark.parametrize("kept", [True, False])
def test_a_stop_signals_answer_asks_the_log_whether_the_stop_will_save(kept, capfd, monkeypatch):
    """The first Ctrl-C in the loop is answered with what the stop will do, as the run's log says: in a fresh
    run beside another run's checkpoint, that it will not save over it; else, that it saves a checkpoint."""
    import signal

    from machinery.stopping import StopRequested

    monkeypatch.delenv("RANK", raising=False)
    with StopRequested(StandInLog(kept)) as stop:
        signal.raise_signal(signal.SIGINT)
    assert stop.requested
    err = capfd.readouterr().err
    said = f"without saving over {os.path.join('run', 'ckpt.pt')}, another run's" if kept else "with a checkpoint;"
    assert f"SIGINT: stopping after this step, {said}" in err


def test_the_training_loader_shuffles_its_shards_by_the_runs_seed(tmp_path):
    """make_loader hands --seed to the loader: the shards of each epoch come in the order of the run's seed (a run
    with --seed 7 reads another order than one with the default 1337)."""
    from dataclasses import replace

    from train_gpt2 import DataLoaderLite, TrainConfig, make_loader

    data = str(write_shards(tmp_path / "d", [200] * 8))
    orders = {seed: DataLoaderLite(2, 16, data_dir=data, split="train", seed=seed).order for seed in (7, 1337)}
    assert orders[7] != orders[1337]  # (the premise: the two seeds order these shards differently)
    cfg = replace(TrainConfig(), data_dir=data, B=2, T=16)
    for seed in (7, 1337):
        assert make_loader(replace(cfg, seed=seed), "train", 0, 1).order == orders[seed]


def test_sdpa_typed_for_a_checkpoints_model_is_the_one_it_runs_with(tmp_path, text_file):
    """--sdpa is how this run computes attention, not part of the model's shape: --no-sdpa with --init_from a
    checkpoint saved with fused attention builds the checkpoint's model with the explicit attention."""
    from machinery.checkpoints import load_checkpoint
    from train_gpt2 import TrainConfig, make_model

    code, _ = run_main(tmp_path, text_file, "--max_steps", "1", "--num_samples", "0")
    ckpt_path = str(tmp_path / "out" / "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path)
    assert code == 0 and ckpt["model_config"]["sdpa"] is True
    for sdpa in (False, True):
        cfg = TrainConfig(init_from=ckpt_path, T=16, max_steps=0, **{**ckpt["model_config"], "sdpa": sdpa})
        model = make_model(cfg, ckpt, ckpt_path, False, "cpu")
        assert model.config.sdpa is sdpa and all(block.attn.sdpa is sdpa for block in model.transformer.h)
