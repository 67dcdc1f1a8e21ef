"""
Samples and the end of a run. print_samples: the model's own continuations of --prompt through
GPT.generate (in train_gpt2.py), every --sample_interval steps and at the end. finish_run: what a run
that trained to the end (or had nothing to train) ends with: samples, the export, what it wrote, unless a
stop was asked for in its last step. Every process calls both: under FSDP each forward pass needs them all;
rank 0 prints.
"""

import os

import torch

from machinery.console import describe_outputs, print0
from machinery.memory import describe_peak, largest_peak_memory
from machinery.sharding import full_model_state
from machinery.stopping import stop_requested_anywhere
from machinery.tokens import get_tokenizer


def print_samples(model, cfg, device, autocast, generator):
    """Print num_samples continuations of cfg.prompt, in batches of at most B (a big --num_samples takes
    longer, never more memory)."""
    if cfg.num_samples == 0:
        return
    enc = get_tokenizer()
    prompt_ids = enc.encode_ordinary(cfg.prompt) or [enc.eot_token]  # an empty prompt starts a document
    shown_from = 0 if cfg.prompt else 1  # (a document's start, the end-of-text token, is not printed)
    model.eval()
    for start in range(0, cfg.num_samples, cfg.B):  # B rows at a time: memory grows with B, not --num_samples
        rows = min(cfg.B, cfg.num_samples - start)
        idx = torch.tensor(prompt_ids, dtype=torch.long, device=device).repeat(rows, 1)
        with autocast:
            out = model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                 generator=generator)
        for row in out:
            print0(f"> {enc.decode(row.tolist()[shown_from:])}")
    model.train()


def finish_run(model, cfg, device, autocast, generator, master, trained, stopped=False):
    """The end of a run that did not stop early: a few samples (--num_samples, 0 for none; every process
    takes part: under FSDP each forward needs all), the export if --export_dir asks for one, and what it
    wrote and the memory it used at most. (--eval_only, and a run stopped before its last step, return before
    this.) A stop asked for in the last step (`stopped`, on any process) saved the run's last checkpoint,
    and skips all that: 130."""
    if stop_requested_anywhere(stopped, device):
        skipped = [name for name, asked in (("samples", cfg.num_samples), ("export", cfg.export_dir)) if asked]
        then = f"; its {' and '.join(skipped)} skipped: the same command with --resume makes them" if skipped else ""
        print0(f"interrupted: saved step {cfg.max_steps}, the run's last, to {cfg.out_dir}/ckpt.pt{then}")
        return 130
    print_samples(model, cfg, device, autocast, generator)
    state = full_model_state(model) if cfg.export_dir else None  # (under FSDP: gathered from every process)
    if master and cfg.export_dir:
        replaced = os.path.exists(os.path.join(cfg.export_dir, "model.safetensors"))  # (said: it was asked for)
        model.save_pretrained(cfg.export_dir, state)
        print0(f"exported to {cfg.export_dir}{' (the model that was there replaced)' if replaced else ''}")
    if trained:
        peak = largest_peak_memory(device)  # (every process: the largest is said)
        print0(describe_outputs(cfg.out_dir, describe_peak(peak, device)))
    return 0
