"""
The folder of shards a preparation writes, for prepare.py: continuing one a killed run left (its
manifest and shards checked against each other and the source: start_manifest), a finished one
checked as training checks it (check_finished), the lock on it, what a killed write left, and the disk
and memory it needs. prepare.py tokenizes and writes the shards (its ShardWriter); this module checks
the folder before and after.
"""

import glob
import json
import os
import re
import sys

import numpy as np

from machinery.corpus import documents_in, unchanged_files
from machinery.files import PrepareError, SettingError, free_bytes, in_units, lock_folder, ram_bytes, sha256_of
from machinery.tokens import MANIFEST, manifest_problem, read_manifest

DISK_SLACK = 0.9  # refuse to start below 90% of the estimated space: it is an estimate, and a full disk is survivable


# -----------------------------------------------------------------------------
# Continuing a folder: its manifest checked against its shards and the source


def start_manifest(out_dir, source_name, shard_size, fingerprint=None, files=()):
    """The manifest to continue: the one in out_dir (its shards checked, and for a local source its
    fingerprint: source_fingerprint, of `files`), or a new one."""
    path = os.path.join(out_dir, MANIFEST)
    fresh = dict(tokenizer="gpt2", dtype="uint16", source=source_name, shard_size=shard_size)
    if fingerprint is not None:  # (FineWeb-Edu's files are pinned to a commit instead: source_files)
        fresh["source_fingerprint"] = fingerprint
    fresh.update(shards=[], documents=0, tokens=0, complete=False)
    if not os.path.exists(path):
        if glob.glob(os.path.join(glob.escape(out_dir), "*.npy")):
            raise PrepareError(f"{out_dir!r} holds .npy files but no {MANIFEST}: use an empty or new --out_dir")
        return fresh
    try:
        with open(path) as f:
            manifest = json.load(f)
        recorded = {k: manifest[k] for k in ("tokenizer", "source", "shard_size")}
    except (ValueError, KeyError, TypeError):
        raise PrepareError(f"{path!r} is not a manifest written by prepare.py; use another --out_dir") from None
    problem = manifest_problem(manifest)
    if problem:
        raise PrepareError(f"{path!r} is not a manifest as prepare.py writes it: {problem}; use another --out_dir")
    if recorded["source"] != source_name or recorded["shard_size"] != shard_size:
        raise PrepareError(f"{out_dir!r} holds shards of {manifest['source']} (shard size {manifest['shard_size']:,}), "
                           f"not of {source_name} (shard size {shard_size:,}): use another --out_dir")
    for name in ("tokenizer", "dtype"):  # (no dtype: uint16, as train_gpt2.py reads it)
        if manifest.get(name, "uint16") != fresh[name]:
            raise PrepareError(f"{out_dir!r} holds shards whose {name} is {manifest[name]!r}, not {fresh[name]!r} as "
                               "prepare.py writes them: use another --out_dir")
    change = fingerprint_change(manifest.get("source_fingerprint"), fingerprint, path)
    if change and (manifest["complete"] or not changed_after_its_shards(manifest, fingerprint, files)):
        raise PrepareError(f"{source_name} has changed since {out_dir!r} was prepared from it ({change}): delete "
                           f"{out_dir!r} to prepare it again, or choose another --out_dir")
    if change:  # (a bad line mended, say, that the killed run stopped at): its shards are the new source's too
        print(f"{source_name}: {change}, after the documents of the shards so far: continuing", file=sys.stderr)
        manifest["source_fingerprint"] = fingerprint
    manifest = {**fresh, **manifest}  # an older prepare.py's manifest has no fingerprint: from now on, this one
    for i, shard in enumerate(manifest["shards"]):  # keep the shards that are intact, redo from the first that is not
        damage = shard_damage(os.path.join(out_dir, shard["file"]), shard)
        if damage:
            # (a corpus within one shard is written as a pair, train then val, from one buffer: redone as a pair)
            i = 0 if manifest["shards"][0]["split"] == "train" else i
            print(f"{shard['file']} {damage}: continuing from {manifest['shards'][i]['file']}", file=sys.stderr)
            manifest["shards"], manifest["complete"] = manifest["shards"][:i], False
            break
    return manifest


def shard_damage(path, shard):
    """How a shard's file is not the one its manifest entry lists, or None: its SHA-256, then (an entry
    edited by hand may say another) its token count, which a resumed run and train_gpt2.py go by."""
    if not os.path.isfile(path) or sha256_of(path) != shard["sha256"]:
        return "is missing or damaged"
    tokens = len(np.load(path, mmap_mode="r"))  # (its SHA-256 says it is the .npy file prepare.py wrote)
    if tokens != shard["tokens"]:
        return f"holds {tokens:,} tokens, not the {shard['tokens']:,} {MANIFEST} lists"
    return None


def fingerprint_change(recorded, now, path):
    """What differs between a manifest's fingerprint (at `path`) and the source's now, in a few words (the
    first file that differs), or None: the same, or nothing to compare (an older prepare.py's manifest,
    without one, or FineWeb-Edu)."""
    if recorded is None or now is None or recorded == now:
        return None
    if type(recorded) is not list or not all(is_fingerprint_entry(entry) for entry in recorded):
        raise PrepareError(f"{path!r} is not a manifest as prepare.py writes it: its source_fingerprint is not a "
                           "list of [file, size, mtime_ns]; use another --out_dir")
    before, after = {name: rest for name, *rest in recorded}, {name: rest for name, *rest in now}
    for name in sorted(before.keys() | after.keys()):
        if name not in after:
            return f"{name} removed"
        if name not in before:
            return f"{name} added"
        if before[name] != after[name]:
            return f"{name} has another size or modification time"
    return "its files are in another order"


def changed_after_its_shards(manifest, now, files):
    """Whether the files of an unfinished folder's source that changed (edited, added, removed) all come after
    every document its shards hold: then the shards are those a fresh run over the source as it is now makes,
    and the run can go on with it (the unchanged files are read to count their documents)."""
    last = manifest["shards"][-1] if manifest["shards"] else dict(next_document=0, next_offset=0)
    begun = last["next_document"] + (last["next_offset"] > 0)  # documents in the shards, whole or begun
    return begun <= documents_in(files[:unchanged_files(manifest["source_fingerprint"], now)])


def is_fingerprint_entry(entry):
    return (type(entry) is list and len(entry) == 3 and isinstance(entry[0], str)
            and all(type(number) is int for number in entry[1:]))


# -----------------------------------------------------------------------------
# A finished folder


def finished_problem(manifest):
    """What in a finished manifest disagrees with its shards, or None: a split without a shard (prepare.py
    writes a val shard then train ones, or for a corpus within one shard a train shard then a val one),
    or totals other than its shards'."""
    shards = manifest["shards"]
    for split in ("train", "val"):
        if split not in {shard["split"] for shard in shards}:
            return f"it lists no {split} shard"
    last = shards[-1]
    counts = dict(tokens=sum(shard["tokens"] for shard in shards),
                  documents=last["next_document"] + (last["next_offset"] > 0))
    for name, count in counts.items():
        if manifest[name] != count:
            return f"its {name} is {manifest[name]:,}, where its shards hold {count:,}"
    return None


def check_finished(out_dir, manifest):
    """A folder whose manifest says it is complete is checked as train_gpt2.py checks it (tokens.read_manifest)
    and by finished_problem: prepare.py never reports a folder that training would refuse."""
    try:
        read_manifest(out_dir)
        problem = finished_problem(manifest)
    except SettingError as e:
        problem = str(e)
    if problem:
        raise PrepareError(f"{os.path.join(out_dir, MANIFEST)!r} says its shards are complete, but {problem}: undo "
                           f"the edit, or delete {out_dir!r} to prepare it again")


# -----------------------------------------------------------------------------
# Disk space


def check_disk_space(out_dir, needed):
    """Refuse to start when the disk out_dir is on clearly lacks the space the shards need."""
    free = free_bytes(out_dir)  # (out_dir is made later: the disk it will be on)
    if free < DISK_SLACK * needed:
        raise PrepareError(f"not enough disk space: {out_dir!r} has {in_units(free)} free and the shards need about "
                           f"{in_units(needed)} (2 bytes a token); free some space or choose another --out_dir")


# -----------------------------------------------------------------------------
# Memory: one shard is held in memory while it fills


def check_memory(shard_size):
    """Refuse a shard that the machine's RAM cannot hold, before anything is written."""
    ram = ram_bytes()
    if ram is not None and 2 * shard_size > ram:
        raise PrepareError(f"--shard_size {shard_size:,} needs {in_units(2 * shard_size, binary=True)} of memory "
                           f"for the shard being filled (2 bytes a token), more than this machine's "
                           f"{in_units(ram, binary=True)}; choose a smaller --shard_size")


# -----------------------------------------------------------------------------
# The folder: one prepare.py at a time, and what a killed one left


def lock_out_dir(out_dir):
    """files.lock_folder's handle on out_dir, its refusal as prepare.py's one line."""
    try:
        return lock_folder(out_dir)
    except ValueError as e:
        raise PrepareError(str(e)) from None


# the names of the files prepare.py writes in out_dir: shards and the manifest, and theirs + ".tmp" while written
# (write_atomically: what a killed run leaves of a write it did not finish)
WRITTEN = re.compile(rf"((train|val)_\d{{6,}}\.npy|{re.escape(MANIFEST)})(\.tmp)?")


def refuse_folders_under_its_names(out_dir):
    """A folder under a name prepare.py writes (a shard's, say, made by hand) would end the run at that
    write, after the manifest was rewritten: one line before anything is read or written."""
    for entry in os.scandir(out_dir):
        if WRITTEN.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
            raise PrepareError(f"{entry.path!r} is a folder, where prepare.py writes a file of that name: move it "
                               f"out of {out_dir!r} and run the command again")


def remove_unfinished_writes(out_dir):
    """Remove the temporary files of writes a killed run left unfinished, and no other file: out_dir may
    hold the user's own (a draft.tmp)."""
    for name in os.listdir(out_dir):
        if WRITTEN.fullmatch(name) and name.endswith(".tmp"):
            os.remove(os.path.join(out_dir, name))
