"""
Samples: the text a run prints at its end and every --sample_interval steps, the model's own
continuations of --prompt through GPT.generate (in train_gpt2.py). Every process calls it: under FSDP
each forward pass needs them all; rank 0 prints.
"""

import torch

from machinery.console import print0
from machinery.tokens import get_tokenizer


def print_samples(model, cfg, device, autocast, generator):
    """Print num_samples continuations of cfg.prompt."""
    if cfg.num_samples == 0:
        return
    enc = get_tokenizer()
    prompt_ids = enc.encode_ordinary(cfg.prompt) or [enc.eot_token]  # an empty prompt starts a document
    idx = torch.tensor(prompt_ids, dtype=torch.long, device=device).repeat(cfg.num_samples, 1)
    model.eval()
    with autocast:
        out = model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                             generator=generator)
    model.train()
    for row in out:
        print0(f"> {enc.decode(row.tolist())}")
