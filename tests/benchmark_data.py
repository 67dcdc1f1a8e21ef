"""
Data-path benchmark: prepare.py's throughput and memory, and DataLoaderLite's time per batch on shards.

    python tests/benchmark_data.py              # a ~300 MB corpus generated here (takes a few minutes)
    python tests/benchmark_data.py --mb 50      # a smaller one

Not a test: it prints figures, side by side from one run. The corpus is Shakespeare from input.txt cut
into ~5 kB documents and repeated to size, as jsonl. Contestants, each on the same corpus:
- one thread of tiktoken's encode_ordinary over the documents, in this process (the floor to beat);
- `python prepare.py` with --num_proc 1 and with --num_proc N (N = CPU count), as a user runs it, with
  the default 100M-token shards: its whole wall time, and its sustained rate (the extra tokens over the
  extra time between the corpus and a third of it: start-up excluded, as it is on a 10B-token run).
  Peak memory is the largest sum of the resident memory of prepare.py and its worker processes,
  sampled every 50 ms (forked workers share pages with their parent, so the sum overstates it).
Then the loader: B=64, T=1024 batches (what one GPU of the reproduction reads per micro-step) from the
shards just written, a window at a time.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from machinery.tokens import get_tokenizer  # noqa: E402
from train_gpt2 import DataLoaderLite  # noqa: E402


def make_corpus(path, megabytes, doc_chars=5000):
    with open(os.path.join(REPO, "input.txt"), encoding="utf-8") as f:
        text = f.read()
    docs = [text[i: i + doc_chars] for i in range(0, len(text), doc_chars)]
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < megabytes * 1e6:
            for d in docs:
                line = json.dumps({"text": d}) + "\n"
                f.write(line)
                written += len(line)
    return docs


def tree_rss(pid):
    """Resident bytes of a process and all its descendants (Linux /proc)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            pass
    return total


def run_prepare(corpus, out_dir, num_proc):
    cmd = [sys.executable, os.path.join(REPO, "prepare.py"), corpus, "--out_dir", out_dir, "--num_proc", str(num_proc)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.05)
    elapsed = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed")
    with open(os.path.join(out_dir, "manifest.json")) as f:
        tokens = json.load(f)["tokens"]
    return elapsed, tokens, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=300, help="corpus size in MB")
    args = parser.parse_args()
    n_cpu = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        corpus, small = os.path.join(tmp, "corpus.jsonl"), os.path.join(tmp, "small.jsonl")
        make_corpus(corpus, args.mb)
        make_corpus(small, args.mb / 3)
        print(f"corpus {os.path.getsize(corpus) / 1e6:,.0f} MB of jsonl (and one of a third of it) | {n_cpu} CPUs")

        enc = get_tokenizer()
        t0 = time.perf_counter()
        tokens = 0
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                tokens += 1 + len(enc.encode_ordinary(json.loads(line)["text"]))
        one_thread = tokens / (time.perf_counter() - t0)

        print("\nwhole command: its wall time on the corpus. sustained: the extra tokens over the extra time between "
              "the corpus and its third (start-up excluded, as on a 10B-token run)")
        print(f"\n{'preparation':<30}{'s':>7}{'tokens/s':>12}{'ratio':>7}{'sustained':>12}{'ratio':>7}"
              f"{'peak RSS MB':>13}")
        print(f"{'encode_ordinary, one thread':<30}{tokens / one_thread:>7.1f}{one_thread:>12,.0f}{1:>6.2f}x"
              f"{'':>12}{'':>7}{'-':>13}")
        for num_proc in sorted({1, n_cpu}):
            out_dir = os.path.join(tmp, f"out{num_proc}")
            elapsed, n, peak = run_prepare(corpus, out_dir, num_proc)
            assert n == tokens, (n, tokens)  # the same corpus, counted the same
            small_elapsed, small_n, _ = run_prepare(small, os.path.join(tmp, f"small{num_proc}"), num_proc)
            sustained = (n - small_n) / (elapsed - small_elapsed)
            print(f"{f'prepare.py --num_proc {num_proc}':<30}{elapsed:>7.1f}{n / elapsed:>12,.0f}"
                  f"{n / elapsed / one_thread:>6.2f}x{sustained:>12,.0f}{sustained / one_thread:>6.2f}x"
                  f"{peak / 2**20:>13,.0f}", flush=True)
            shutil.rmtree(os.path.join(tmp, f"small{num_proc}"))
            if num_proc != n_cpu:
                shutil.rmtree(out_dir)

        B, T = 64, 1024
        loader = DataLoaderLite(B, T, data_dir=os.path.join(tmp, f"out{n_cpu}"), split="train")
        times = []
        for _ in range(300):
            t0 = time.perf_counter()
            loader.next_batch()
            times.append(time.perf_counter() - t0)
        print(f"\nloader: B={B} T={T} batch from the shards: "
              f"median {statistics.median(times) * 1e6:,.0f} us, "
              f"max {max(times) * 1e6:,.0f} us over {len(times)} batches")


if __name__ == "__main__":
    main()
