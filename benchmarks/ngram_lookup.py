"""Host time of prompt lookup's drafter per iteration: the n-gram index against a scan.

The drafter runs between the host's read of one iteration and the launch of the next
verification, while the device idles, so its host time adds to every iteration. This
times one iteration's drafter work (a lookup of up to ``gamma`` tokens, then the commit
of the tokens that iteration accepted), and the indexing of the prompt that the index
pays once per generation, for ``decoders.prompt_lookup.NgramProposer``
against a numpy scan of the whole history (what the proposer did before the index),
side by side in one process, on histories of several lengths that repeat themselves
the way code does (copied spans among random tokens).

    python benchmarks/ngram_lookup.py [--lengths 256,1024,4096] [--out FILE]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from markdown_result import print_table, write_result  # noqa: E402

from decoders.prompt_lookup import NgramProposer  # noqa: E402

VOCAB = 49152


def scan(history: np.ndarray, budget: int, max_ngram: int, min_ngram: int) -> list[int]:
    """The latest earlier match of the longest suffix, by a numpy scan of the whole history."""
    for n in range(min(max_ngram, len(history) - 1), min_ngram - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(history[:-1], n)
        hits = np.flatnonzero((windows == history[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return history[start : start + budget].tolist()
    return []


def code_like(length: int, rng: random.Random) -> list[int]:
    """Random tokens with a third of the sequence copied from earlier spans."""
    tokens: list[int] = []
    while len(tokens) < length:
        if tokens and rng.random() < 0.33:
            start = rng.randrange(len(tokens))
            tokens += tokens[start : start + rng.randint(2, 12)]
        else:
            tokens += [rng.randrange(VOCAB) for _ in range(rng.randint(1, 8))]
    return tokens[:length]


def time_iterations(length: int, iterations: int, gamma: int, max_ngram: int, min_ngram: int) -> dict:
    rng = random.Random(length)
    prompt = code_like(length, rng)
    # What each iteration commits: 1-4 tokens continuing the same kind of text.
    commits = [code_like(rng.randint(1, 4), rng) for _ in range(iterations)]
    t0 = time.perf_counter()
    proposer = NgramProposer(prompt, max_ngram, min_ngram, torch.device("cpu"))
    t1 = time.perf_counter()
    history = np.asarray(prompt, dtype=np.int64)
    t2 = time.perf_counter()
    build_index, build_scan = t1 - t0, t2 - t1
    agree = True
    t_index = t_scan = 0.0
    for new in commits:
        t0 = time.perf_counter()
        mine = proposer.lookup(gamma)
        proposer.commit(new, kept=0)
        t1 = time.perf_counter()
        theirs = scan(history, gamma, max_ngram, min_ngram)
        history = np.concatenate([history, np.asarray(new, dtype=np.int64)])
        t2 = time.perf_counter()
        agree &= mine == theirs
        t_index += t1 - t0
        t_scan += t2 - t1
    return {"history": length, "iterations": iterations, "index_build_us": build_index * 1e6,
            "scan_build_us": build_scan * 1e6, "index_us": t_index / iterations * 1e6,
            "scan_us": t_scan / iterations * 1e6, "scan_x_index": t_scan / t_index, "same_drafts": agree}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="256,1024,4096", help="prompt lengths in tokens")
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--gamma", type=int, default=8)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = [time_iterations(int(n), args.iterations, args.gamma, 3, 1) for n in args.lengths.split(",")]
    print_table(["prompt (tokens)", "index, us per iteration", "scan, us per iteration", "scan / index",
                 "same drafts", "indexing the prompt, us (once)", "iterations to repay it"],
                [[f"{r['history']:,}", f"{r['index_us']:.1f}", f"{r['scan_us']:.1f}", f"{r['scan_x_index']:.0f}x",
                  r["same_drafts"], f"{r['index_build_us']:.0f}",
                  f"{(r['index_build_us'] - r['scan_build_us']) / (r['scan_us'] - r['index_us']):.1f}"]
                 for r in rows])
    write_result(args.out, rows)


if __name__ == "__main__":
    main()
