"""
HellaSwag, the benchmark a GPT-2 reproduction is judged by: which of four endings continues a context.
A sibling of train_gpt2.py: it imports the model from there and the rest from machinery.py, and
train_gpt2.py imports it only in runs with --hellaswag.

    python hellaswag.py --init_from gpt2                 # OpenAI's GPT-2 124M
    python hellaswag.py --init_from my-gpt2-dir --data hellaswag_val.jsonl
    python hellaswag.py --out_dir out                    # the checkpoint a run wrote
    python hellaswag.py --out_dir out --limit 200        # a quick look

Data: the official jsonl format, one item per line with `ctx`, `endings` (four strings) and `label`
(0-3); the validation split has 10,042 items. Without --data the split is fetched once through the
`datasets` library (Rowan/hellaswag; the classic download URL on GitHub is gone) and cached as jsonl.

Scoring, completion style (the one the classic GPT-2 reproduction reports): each ending is scored by
the model's cross-entropy on the ending's tokens given the context, where the context is
encode_ordinary(ctx) and the ending encode_ordinary(" " + ending). `acc` picks the ending with the
lowest total loss; `acc_norm` the lowest mean loss per token, which does not favour short endings.
train_gpt2.py --hellaswag calls load_items_across_ranks() and evaluate_across_ranks() below during
training: under torchrun, rank r scores items r, r + world_size, ... and the counts are added up.
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn import functional as F

from machinery import (DTYPES, HELLASWAG_REFERENCE, ArgumentParser, first_line, get_tokenizer, load_checkpoint,
                       load_weights, print0, write_atomically)
from train_gpt2 import GPT, GPTConfig, make_precision, resolve_device

DATASET = ("Rowan/hellaswag", "validation")  # on the Hugging Face hub; its labels are strings
N_VALIDATION = 10_042  # items in the validation split: a download with fewer is incomplete
# (acc, acc_norm) of OpenAI's checkpoints with this scoring, as published with the classic reproduction
REFERENCE = HELLASWAG_REFERENCE


def cache_path():
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "train_gpt2", "hellaswag_val.jsonl")


# -----------------------------------------------------------------------------
# Items


def check_item(item, where):
    """An item in the official format, with label an int, or a ValueError naming where it came from."""
    ok = (isinstance(item, dict) and isinstance(item.get("ctx"), str) and isinstance(item.get("endings"), list)
          and len(item["endings"]) == 4 and all(isinstance(e, str) for e in item["endings"])
          and str(item.get("label")).strip() in ("0", "1", "2", "3"))
    if not ok:
        raise ValueError(f"{where} is not a HellaSwag item (ctx, four endings, label 0-3)")
    return {"ctx": item["ctx"], "endings": item["endings"], "label": int(str(item["label"]).strip())}


def read_items(path):
    if not os.path.isfile(path):
        raise ValueError(f"HellaSwag file {path!r} not found")
    items = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}:{line_number} is not JSON: HellaSwag files are jsonl") from None
            items.append(check_item(record, f"{path}:{line_number}"))
    if not items:
        raise ValueError(f"HellaSwag file {path!r} is empty")
    return items


def download_items(path):
    """The validation split through `datasets`, written to `path` only once it is complete."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise ValueError("downloading HellaSwag needs the datasets library: pip install -r requirements.txt") from None
    try:
        rows = load_dataset(DATASET[0], split=DATASET[1])
        items = [check_item(row, f"{DATASET[0]} row {i}") for i, row in enumerate(rows)]
    except ValueError:
        raise
    except Exception as e:  # the hub's errors come from several libraries
        raise ValueError(f"downloading HellaSwag ({DATASET[0]}) failed: {first_line(e)}; "
                         "or pass a local file with --data") from None
    if len(items) != N_VALIDATION:
        raise ValueError(f"downloaded {len(items)} HellaSwag items, expected {N_VALIDATION}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    text = "".join(json.dumps(item) + "\n" for item in items)
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))  # a partial download never looks like data


def load_items(data="auto"):
    """The items of a local jsonl file, or with "auto" the cached validation split (fetched if missing)."""
    if data == "auto":
        data = cache_path()
        if not os.path.isfile(data):
            download_items(data)
    return read_items(data)


def load_items_across_ranks(source):
    """load_items for a training run: under torchrun, rank 0 fetches the split while the others wait."""
    if source == "auto" and dist.is_initialized():
        if dist.get_rank() == 0 and not os.path.isfile(cache_path()):
            load_items("auto")
        dist.barrier()
    items = load_items(source)
    print0(f"hellaswag {source} | {len(items):,} items at every evaluation")
    return items


# -----------------------------------------------------------------------------
# Scoring


def render(item, enc):
    """Four rows of tokens (context then ending) and where each ending starts."""
    ctx = enc.encode_ordinary(item["ctx"])
    endings = [enc.encode_ordinary(" " + ending) for ending in item["endings"]]
    return [ctx + e for e in endings], len(ctx)


@torch.no_grad()
def ending_losses(model, items, device, autocast):
    """(sum, mean) of each ending's token losses: two (len(items), 4) float32 tensors, from one forward
    pass over all the items' endings, right-padded (causal attention never looks at the padding, and
    the padding is masked out of the loss)."""
    enc = get_tokenizer()
    rows, starts = [], []
    for item in items:
        item_rows, n_ctx = render(item, enc)
        rows += item_rows
        starts += [n_ctx] * 4
    longest = max(len(r) for r in rows)
    if longest > model.config.block_size:
        raise ValueError(f"a HellaSwag item has {longest} tokens, more than block_size={model.config.block_size}")
    tokens = torch.zeros((len(rows), longest), dtype=torch.long)  # (4N, L)
    mask = torch.zeros((len(rows), longest), dtype=torch.bool)  # True where a token of the ending is
    for i, (row, start) in enumerate(zip(rows, starts)):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, start:len(row)] = True
    tokens, mask = tokens.to(device), mask.to(device)
    with autocast:
        logits, _ = model(tokens)  # (4N, L, V)
    # position t predicts token t+1: losses of tokens 1..L-1, in float32
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none")  # (4N, L-1)
    losses = losses * mask[:, 1:]
    total = losses.sum(dim=1)
    mean = total / mask[:, 1:].sum(dim=1)
    return total.view(-1, 4), mean.view(-1, 4)


def predict(model, items, device, autocast, batch_size=8, progress=False):
    """Per item, the ending chosen by total loss and by mean loss: two lists of ints."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    by_total, by_mean = [], []
    with tqdm(total=len(items), unit="item", disable=not progress, desc="hellaswag") as bar:
        for i in range(0, len(items), batch_size):
            total, mean = ending_losses(model, items[i: i + batch_size], device, autocast)
            by_total += total.argmin(dim=1).tolist()
            by_mean += mean.argmin(dim=1).tolist()
            bar.update(len(items[i: i + batch_size]))
    model.train(was_training)
    return by_total, by_mean


def evaluate(model, items, device, autocast, batch_size=8, progress=False):
    """(correct by acc, correct by acc_norm, items): counts, so ranks can add theirs up."""
    by_total, by_mean = predict(model, items, device, autocast, batch_size, progress)
    labels = [item["label"] for item in items]
    return (sum(p == y for p, y in zip(by_total, labels)), sum(p == y for p, y in zip(by_mean, labels)), len(items))


def evaluate_across_ranks(model, items, device, autocast):
    """{"hellaswag_acc": ..., "hellaswag_acc_norm": ...} over all items: rank r scores items r,
    r + world_size, ..., and the counts add up to the whole set. Every rank must call it."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    counts = torch.tensor(evaluate(model, items[rank::world_size], device, autocast), dtype=torch.long, device=device)
    if dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    correct, correct_norm, n = counts.tolist()
    return {"hellaswag_acc": correct / n, "hellaswag_acc_norm": correct_norm / n}


# -----------------------------------------------------------------------------
# The command line: a model, the items, and the score


def load_model(args):
    """The model of a run's checkpoint (--out_dir), or a GPT-2 name or save_pretrained directory."""
    if args.out_dir:
        path = os.path.join(args.out_dir, "ckpt.pt")
        if not os.path.isfile(path):
            raise ValueError(f"no checkpoint in {args.out_dir!r} (looked for {path}); or evaluate --init_from")
        ckpt = load_checkpoint(path)
        model = GPT(GPTConfig(**ckpt["model_config"]))
        load_weights(model, ckpt, path)
        return model, args.out_dir
    return GPT.from_pretrained(args.init_from), args.init_from


def main(argv=None):
    parser = ArgumentParser(description="HellaSwag accuracy of a GPT-2 model.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--init_from", default="gpt2",
                        help="a GPT-2 name (gpt2 ... gpt2-xl) or a save_pretrained directory")
    parser.add_argument("--out_dir", default="", help="evaluate the checkpoint a training run left here instead")
    parser.add_argument("--data", default="auto",
                        help="a local HellaSwag jsonl file; auto: the cached validation split")
    parser.add_argument("--limit", type=int, default=0, help="only the first N items (0: all)")
    parser.add_argument("--batch_size", type=int, default=8, help="items per forward pass (4 endings each)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES), help="autocast precision")
    args = parser.parse_args(argv)
    try:
        if args.limit < 0 or args.batch_size < 1:
            raise ValueError("--limit must not be negative and --batch_size must be positive")
        device, device_type = resolve_device(args.device)
        _, autocast, _ = make_precision(args.dtype, device_type)
        items = load_items(args.data)[: args.limit or None]
        model, name = load_model(args)
        correct, correct_norm, n = evaluate(model.to(device), items, device, autocast, args.batch_size,
                                            progress=True)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    print(f"hellaswag acc {correct / n:.4f} acc_norm {correct_norm / n:.4f} ({n} items) | {name}")
    if name in REFERENCE and n == N_VALIDATION:
        acc, acc_norm = REFERENCE[name]
        print(f"reference for {name}: acc {acc:.4f} acc_norm {acc_norm:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
