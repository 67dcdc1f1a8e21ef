"""
HellaSwag, the benchmark a GPT-2 reproduction is judged by: which of four endings continues a context.
The items (a local jsonl file, or the validation split fetched once and cached), their scoring, and
the reference accuracies. It needs only a model that maps (B, T) tokens to (B, T, V) logits (alone, or
first of a tuple) and has config.block_size: train_gpt2.py scores its model during training
(--hellaswag), hellaswag.py any GPT-2 from its command line.

Data: the official jsonl format, one item per line with `ctx`, `endings` (four strings) and `label`
(0-3); the validation split has 10,042 items. Scoring, completion style (the one the classic GPT-2
reproduction reports): each ending is scored by the model's cross-entropy on the ending's tokens given
the context, where the context is encode_ordinary(ctx) and the ending encode_ordinary(" " + ending).
`acc` picks the ending with the lowest total loss; `acc_norm` the lowest mean loss per token, which
does not favour short endings. Under torchrun, rank r scores items r, r + world_size, ... and the
counts are added up.
"""

import contextlib
import hashlib
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn import functional as F

from machinery.console import print0
from machinery.files import BarStream, SettingError, first_line, is_whole_number, write_atomically
from machinery.hub import hub_or_cache
from machinery.tokens import get_tokenizer

DATASET = ("Rowan/hellaswag", "validation")  # on the Hugging Face hub; its labels are strings
N_VALIDATION = 10_042  # items in the validation split: a download with fewer is incomplete
# (acc, acc_norm) of OpenAI's checkpoints with this scoring, as published with the classic GPT-2
# reproduction (build-nanogpt); hellaswag.py prints them beside a full evaluation
REFERENCE = {"gpt2": (0.2859, 0.2955), "gpt2-xl": (0.3842, 0.4893)}
GPT3_SMALL_HELLASWAG = 0.337  # GPT-3 Small (GPT-2 124M's size), zero-shot HellaSwag in the GPT-3 paper


def cache_path():
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "train_gpt2", "hellaswag_val.jsonl")


# -----------------------------------------------------------------------------
# Items


def check_item(item, where):
    """An item in the official format, with label an int, or a ValueError naming where it came from. (A blank
    ctx leaves the endings' first tokens nothing to be predicted from: one-token endings would all tie.)"""
    ok = (isinstance(item, dict) and isinstance(item.get("ctx"), str) and item["ctx"].strip()
          and isinstance(item.get("endings"), list)
          and len(item["endings"]) == 4 and all(isinstance(e, str) for e in item["endings"])
          and str(item.get("label")).strip() in ("0", "1", "2", "3"))
    if not ok:
        raise SettingError(f"{where} is not a HellaSwag item (a ctx that is not blank, four endings, label 0-3)")
    return {"ctx": item["ctx"], "endings": item["endings"], "label": int(str(item["label"]).strip())}


def read_items(path):
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "is not a regular file" if os.path.exists(path) else \
            "not found"
        raise SettingError(f"HellaSwag file {path!r} {what}")
    items = []
    with open(path, "rb") as f:  # bytes, decoded line by line: a line that is not UTF-8 is named
        for line_number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")  # (a BOM some editors write first)
            except UnicodeDecodeError as e:
                raise SettingError(f"{path}:{line_number} is not UTF-8 text (byte {e.start}: {e.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise SettingError(f"{path}:{line_number} is not JSON: HellaSwag files are jsonl") from None
            items.append(check_item(record, f"{path}:{line_number}"))
    if not items:
        raise SettingError(f"HellaSwag file {path!r} is empty")
    return items


def download_items(path, flag="--data"):
    """The validation split through `datasets`, written to `path` only once it is complete. `flag`: the
    command's flag that names a local file instead."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise ValueError("downloading HellaSwag needs the datasets library: pip install -r requirements.txt") from None
    try:
        with hub_or_cache() as online:  # no network: at once, not after half a minute of retries
            rows = load_dataset(DATASET[0], split=DATASET[1])
        items = [check_item(row, f"{DATASET[0]} row {i}") for i, row in enumerate(rows)]
    except ValueError:
        raise
    except Exception as e:  # the hub's errors come from several libraries
        why = first_line(e) if online else "the Hugging Face hub cannot be reached (no network?)"
        raise ValueError(f"downloading HellaSwag ({DATASET[0]}) failed: {why}; pass a local file with {flag}") from None
    if len(items) != N_VALIDATION:
        raise ValueError(f"downloaded {len(items)} HellaSwag items, expected {N_VALIDATION}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    text = "".join(json.dumps(item) + "\n" for item in items)
    # a partial download never looks like data; (shared: the first process of each machine may fetch it at once)
    write_atomically(path, lambda f: f.write(text.encode("utf-8")), shared=True)


def load_items(data="auto", flag="--data"):
    """The items of a local jsonl file, or with "auto" the cached validation split (fetched if missing;
    `flag` names a local file instead: hellaswag.py's --data, train_gpt2.py's --hellaswag)."""
    if data != "auto":
        return read_items(data)
    if not os.path.isfile(cache_path()):
        download_items(cache_path(), flag)
    try:
        return read_items(cache_path())
    except ValueError as e:  # (written whole, so damaged since: by hand, or by the disk)
        raise SettingError(f"{e}; it is the cached download: delete it, and the next run fetches it again") from None


def load_items_across_ranks(source, block_size):
    """load_items for a training run: under torchrun, the first process of each machine (LOCAL_RANK 0) fetches
    the split where that machine's cache lacks it, while the others wait. Each item is checked to fit the
    model's block_size now, not at an evaluation steps later."""
    if source == "auto" and dist.is_initialized():
        if os.environ.get("LOCAL_RANK", "0") == "0" and not os.path.isfile(cache_path()):
            load_items("auto", "--hellaswag")
        dist.barrier()
    items = load_items(source, "--hellaswag")
    check_items_fit(items, block_size)
    print0(f"hellaswag {source} | {len(items):,} items at every evaluation")
    return items


# -----------------------------------------------------------------------------
# Scoring


def render(item, enc):
    """Four rows of tokens (context then ending) and where each ending starts."""
    ctx = enc.encode_ordinary(item["ctx"])
    endings = [enc.encode_ordinary(" " + ending) for ending in item["endings"]]
    return [ctx + e for e in endings], len(ctx)


def check_items_fit(items, block_size):
    """Each item's rows (context and ending) within the model's block_size: said before scoring begins,
    naming the item, not partway through."""
    enc = get_tokenizer()
    for number, item in enumerate(items, 1):
        longest = max(map(len, render(item, enc)[0]))
        if longest > block_size:
            raise SettingError(f"HellaSwag item {number} has {longest} tokens (context and ending), more than the "
                               f"model's block_size of {block_size}")


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
        # (a ValueError: under torchrun each process scores its own share of the items, and only some may hold it)
        raise ValueError(f"a HellaSwag item has {longest} tokens, more than block_size={model.config.block_size}")
    tokens = torch.zeros((len(rows), longest), dtype=torch.long)  # (4N, L)
    mask = torch.zeros((len(rows), longest), dtype=torch.bool)  # True where a token of the ending is
    for i, (row, start) in enumerate(zip(rows, starts)):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, start:len(row)] = True
    tokens, mask = tokens.to(device), mask.to(device)
    with autocast:
        logits = model(tokens)  # (4N, L, V): alone, or first of a tuple, as GPT's forward gives (logits, None)
    logits = logits[0] if isinstance(logits, tuple) else logits
    # position t predicts token t+1: losses of tokens 1..L-1, in float32
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none")  # (4N, L-1)
    losses = losses * mask[:, 1:]
    total = losses.sum(dim=1)
    mean = total / mask[:, 1:].sum(dim=1)
    return total.view(-1, 4), mean.view(-1, 4)


def predict(model, items, device, autocast, batch_size=8):
    """Per item, the ending chosen by total loss and by mean loss: two lists of ints."""
    was_training = model.training
    model.eval()
    by_total, by_mean = [], []
    for i in range(0, len(items), batch_size):
        total, mean = ending_losses(model, items[i: i + batch_size], device, autocast)
        by_total += total.argmin(dim=1).tolist()
        by_mean += mean.argmin(dim=1).tolist()
    model.train(was_training)
    return by_total, by_mean


def count_correct(model, items, device, autocast, batch_size=8):
    """(correct by acc, correct by acc_norm, items): counts, so ranks can add theirs up."""
    by_total, by_mean = predict(model, items, device, autocast, batch_size)
    labels = [item["label"] for item in items]
    return (sum(p == y for p, y in zip(by_total, labels)), sum(p == y for p, y in zip(by_mean, labels)), len(items))


def accuracy_across_ranks(model, items, device, autocast, resumable=False):
    """{"hellaswag_acc": ..., "hellaswag_acc_norm": ...} over all items: rank r scores items r,
    r + world_size, ..., and the counts add up to the whole set. Every rank must call it. resumable (an
    evaluation that is the whole job, --eval_only) in one process: as hellaswag.py scores, with a progress
    bar and counts that a Ctrl-C or a kill leaves for the same command to continue from."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine, batch_size = items[rank::world_size], 8
    if resumable and not dist.is_initialized():  # (not under torchrun, nor --cpu_offload's group of one)
        dtype = autocast.fast_dtype if isinstance(autocast, torch.autocast) else torch.float32
        path = progress_path(model, items, batch_size, dtype, torch.device(device).type)
        correct, correct_norm, n = count_correct_resumably(model, items, device, autocast, batch_size, path)
        return {"hellaswag_acc": correct / n, "hellaswag_acc_norm": correct_norm / n}
    counts = torch.tensor(count_correct(model, mine, device, autocast, batch_size), dtype=torch.long, device=device)
    # Under FSDP every forward pass needs every process: one with a batch less scores one more, uncounted,
    # so that all make the same number of passes
    if math.ceil(len(mine) / batch_size) < math.ceil(len(items[0::world_size]) / batch_size):  # (rank 0: most)
        count_correct(model, items[:1], device, autocast, batch_size)
    if dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    correct, correct_norm, n = counts.tolist()
    return {"hellaswag_acc": correct / n, "hellaswag_acc_norm": correct_norm / n}


# -----------------------------------------------------------------------------
# hellaswag.py's evaluation, which survives being interrupted or killed

SAVE_EVERY_S = 10.0  # the counts so far are saved at most this often: a killed run loses at most this much


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while scoring: says how far it got (the counts are saved, the same command continues)."""


def progress_path(model, items, batch_size, dtype, device_type):
    """Where the counts of this evaluation in progress are kept, named by a hash of all that decides them."""
    digest = hashlib.sha256(json.dumps([items, batch_size, str(dtype), device_type, repr(model.config)]).encode())
    for name, tensor in model.state_dict().items():  # (every weight: a fraction of a second for GPT-2 124M)
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return os.path.join(os.path.dirname(cache_path()), f"hellaswag_progress_{digest.hexdigest()[:16]}.json")


def read_progress(path, n_items):
    """(items scored, correct, correct_norm) that an earlier run of the same evaluation saved, or zeros:
    where there are none, or they cannot be read, or they are not counts of n_items items (a file damaged
    since: it would print another accuracy, or stop on a count that is not a number), scoring starts over."""
    try:
        with open(path) as f:
            saved = json.load(f)
        counts = (saved["scored"], saved["correct"], saved["correct_norm"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0, 0, 0
    scored, correct, correct_norm = counts
    fits = all(is_whole_number(c) for c in counts) and max(correct, correct_norm) <= scored <= n_items
    return counts if fits else (0, 0, 0)


def save_progress(path, counts):
    """Save the counts so far: None, or why they could not be (a read-only home, a full disk), which
    only costs the resume: scoring goes on."""
    text = json.dumps(dict(zip(("scored", "correct", "correct_norm"), counts)))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomically(path, lambda f: f.write(text.encode()))
    except OSError as e:
        return first_line(e)
    return None


def count_correct_resumably(model, items, device, autocast, batch_size, path):
    """count_correct's (correct, correct_norm, items), counted batch by batch from the counts an interrupted
    or killed run saved in `path`: saved there every SAVE_EVERY_S seconds, on Ctrl-C (which then raises
    Interrupted) and on an error (out of memory), removed at the end. Where they cannot be saved, that is
    said once, and scoring goes on."""
    from tqdm import tqdm

    counts = read_progress(path, len(items))  # (items scored, correct, correct_norm)
    saved_at, failure = time.monotonic(), None
    try:
        with tqdm(total=len(items), initial=counts[0], unit="item", file=BarStream(),
                  desc="resuming hellaswag" if counts[0] else "hellaswag") as bar:
            for i in range(counts[0], len(items), batch_size):
                correct, correct_norm, n = count_correct(model, items[i: i + batch_size], device, autocast, batch_size)
                counts = (counts[0] + n, counts[1] + correct, counts[2] + correct_norm)
                bar.update(n)
                if failure is None and time.monotonic() - saved_at >= SAVE_EVERY_S:
                    failure, saved_at = save_progress(path, counts), time.monotonic()
                    if failure:
                        bar.write(f"cannot save the counts so far ({failure}): an interrupted run starts again",
                                  file=sys.stderr)
    except KeyboardInterrupt:
        failure = save_progress(path, counts)
        then = f"the counts could not be saved ({failure})" if failure else "run the same command to continue"
        raise Interrupted(f"scored {counts[0]:,} of {len(items):,} items; {then}") from None
    except Exception:  # (out of memory, say: the same command, once there is room, continues from here)
        save_progress(path, counts)
        raise
    with contextlib.suppress(OSError):  # none saved, or a cache that cannot be written: the counts are whole
        os.remove(path)
    scored, correct, correct_norm = counts
    return correct, correct_norm, scored
