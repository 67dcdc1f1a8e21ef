"""
HellaSwag, the benchmark a GPT-2 reproduction is judged by: which of four endings continues a context.
This script scores a model from the command line: OpenAI's GPT-2, a save_pretrained directory, or the
checkpoint a run of train_gpt2.py wrote. The items and their scoring live in machinery/hellaswag_eval.py,
which train_gpt2.py also uses during training (--hellaswag). Imports: this script stands on top; it
takes the model from train_gpt2.py, which never imports it.

    python hellaswag.py --init_from gpt2                 # OpenAI's GPT-2 124M
    python hellaswag.py --init_from my-gpt2-dir --data hellaswag_val.jsonl
    python hellaswag.py --out_dir out                    # the checkpoint a run wrote (or --init_from out/ckpt.pt)
    python hellaswag.py --out_dir out --limit 200        # a quick look

Without --data, the validation split (10,042 items) is fetched once through the `datasets` library
(Rowan/hellaswag; the classic download URL on GitHub is gone) and cached as jsonl ($XDG_CACHE_HOME, else
~/.cache: train_gpt2/hellaswag_val.jsonl). For OpenAI's gpt2 and gpt2-xl on all of it, the published
reference accuracies are printed under the result.

Interrupted (Ctrl-C, or a scheduler's SIGTERM) or killed, the same command continues from the counts
saved so far, kept beside the cached items until the pass ends (machinery/hellaswag_eval.py:
count_correct_resumably).
"""

import argparse
import os
import sys

from machinery.checkpoints import load_checkpoint, load_weights, names_a_checkpoint
from machinery.command_line import ArgumentParser
from machinery.files import print_line
from machinery.hardware import DTYPES
from machinery.hellaswag_eval import (N_VALIDATION, REFERENCE, Interrupted, check_items_fit, count_correct_resumably,
                                      load_items, progress_path)
from machinery.memory import out_of_memory
from machinery.pretrained import refuse_small_vocabulary
from machinery.stopping import sigterm_stops_at_once
from train_gpt2 import GPT, GPTConfig, make_precision, resolve_device


def load_model(args):
    """The model of a run's checkpoint (--out_dir, or --init_from a file as train_gpt2.py takes it),
    or a GPT-2 name or save_pretrained directory."""
    if args.out_dir:
        path = os.path.join(args.out_dir, "ckpt.pt")
        if not os.path.isfile(path):
            raise ValueError(f"no checkpoint in {args.out_dir!r} (looked for {path}); or evaluate --init_from")
        return model_of_checkpoint(path), args.out_dir
    if names_a_checkpoint(args.init_from):  # (a .pt name, or any file)
        return model_of_checkpoint(args.init_from), args.init_from
    refuse_small_vocabulary(args.init_from, "it cannot score HellaSwag's GPT-2 tokens")  # (items are GPT-2 tokens)
    return GPT.from_pretrained(args.init_from), args.init_from


def model_of_checkpoint(path):
    """The model a train_gpt2.py checkpoint holds."""
    ckpt = load_checkpoint(path, missing="--init_from: no checkpoint")  # (a vocabulary below GPT-2's: refused)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    load_weights(model, ckpt, path)
    return model


def score(args):
    """(correct, correct_norm, items scored, the model's name): the model on the items, resumably."""
    for name, least in (("limit", 0), ("batch_size", 1)):
        if getattr(args, name) < least:
            raise ValueError(f"--{name} must be at least {least}, got {getattr(args, name)}")
    device, device_type = resolve_device(args.device)
    dtype, autocast, _ = make_precision(args.dtype, device_type)
    model, name = load_model(args)  # (first: a model that is not there is said before any download)
    items = load_items(args.data)[: args.limit or None]
    check_items_fit(items, model.config.block_size)
    path = progress_path(model, items, args.batch_size, dtype, device_type)
    model.to(device)
    try:
        correct, correct_norm, n = count_correct_resumably(model, items, device, autocast, args.batch_size, path)
    except RuntimeError as e:  # (any other error: raised again, with its traceback)
        if not out_of_memory(e):
            raise
        raise ValueError(f"out of memory on {device} scoring {args.batch_size} items a batch: a smaller --batch_size "
                         "needs less (and scores from the first item: the counts kept are for this one)") from None
    return correct, correct_norm, n, name


def main(argv=None):
    parser = ArgumentParser(description="HellaSwag accuracy of a GPT-2 model.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_mutually_exclusive_group()  # (both given: one line, not one of them ignored)
    model.add_argument("--init_from", default="gpt2",
                       help="a GPT-2 name (gpt2 ... gpt2-xl), a save_pretrained directory or a run's ckpt.pt")
    model.add_argument("--out_dir", default="", help="evaluate the checkpoint a training run left here instead")
    parser.add_argument("--data", default="auto",
                        help="a local HellaSwag jsonl file; auto: the cached validation split")
    parser.add_argument("--limit", type=int, default=0, help="only the first N items (0: all)")
    parser.add_argument("--batch_size", type=int, default=8, help="items per forward pass (4 endings each)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES), help="autocast precision")
    args = parser.parse_args(argv)
    try:
        with sigterm_stops_at_once():  # a scheduler's SIGTERM, as Ctrl-C: one line (while scoring: counts saved)
            correct, correct_norm, n, name = score(args)
    except (ValueError, OSError) as e:
        print_line(f"error: {e}", sys.stderr)
        return 1
    except RuntimeError as e:  # out of memory before scoring: one line (any other error: raised, with its traceback)
        if not out_of_memory(e):
            raise
        print_line(f"error: out of memory before scoring: the model does not fit (--device {args.device})", sys.stderr)
        return 1
    except Interrupted as e:  # (the progress bar has ended its line)
        print_line(f"interrupted: {e}", sys.stderr)
        return 130
    except KeyboardInterrupt:
        print_line("interrupted: before scoring began", sys.stderr)
        return 130
    # (stdout gone, a pipe's reader stopped: the score is said on stderr, not lost)
    print_line(f"hellaswag acc {correct / n:.4f} acc_norm {correct_norm / n:.4f} ({n} items) | {name}", sys.stdout)
    if name in REFERENCE and n == N_VALIDATION:
        acc, acc_norm = REFERENCE[name]
        print_line(f"reference for {name}: acc {acc:.4f} acc_norm {acc_norm:.4f}", sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
