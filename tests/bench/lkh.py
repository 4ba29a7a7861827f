"""Benchmark: LKH rekey cost of leaves, measured on `gcks.proto.keytree.KeyTree`.

1. One leave from a group of n = 2^4 .. 2^20 members: the number of wrapped
   keys the rekey message carries, its ratio to log2(n) (RFC 9838's appendix:
   2*log2(n) - 1, e.g. n = 8 -> 5; the naive scheme costs n - 1) and the time
   of the update.
2. A batch of k leaves (random members, one coalesced update, what the batch
   interval buys) against the same k members leaving one at a time, in a
   group of `--batch-n` members: total wrapped keys and time of each.

`ratio` = wrapped keys / log2(n) at the largest n (about 2, not n / log2 n).

Run: `python -m tests.bench.lkh [--max-exp 20]` from the repository root
(about a minute, mostly building the 2^20 tree). The last stdout line is the
JSON result. Pure computation: no processes, no sockets.

May import `gcks.proto`. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

from gcks.proto.keytree import KeyTree

BATCH_SIZES = (2, 8, 32, 128, 512)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def one_leave(max_exp: int) -> dict[str, dict[str, float]]:
    rng = random.Random(1)
    results = {}
    for exponent in range(4, max_exp + 1):
        n = 1 << exponent
        members = [f"m{i}" for i in range(n)]
        tree = KeyTree.build(members, seed=os.urandom(32))
        start = time.perf_counter()
        update = tree.update(joins=[], leaves=[members[rng.randrange(n)]], seed=os.urandom(32))
        elapsed = time.perf_counter() - start
        wrapped = len(update.wrapped)
        results[str(n)] = {
            "wrapped": wrapped,
            "per_log2n": round(wrapped / exponent, 3),
            "expected_2log2n_minus_1": 2 * exponent - 1,
            "update_ms": round(elapsed * 1000, 3),
        }
        log(f"n=2^{exponent}: one leave -> {wrapped} wrapped keys ({elapsed * 1000:.2f} ms)")
    return results


def batch_vs_single(n: int) -> dict[str, dict[str, float]]:
    members = [f"m{i}" for i in range(n)]
    base = KeyTree.build(members, seed=os.urandom(32)).to_state()
    rng = random.Random(2)
    results = {}
    for k in BATCH_SIZES:
        leaving = rng.sample(members, k)
        batch_tree = KeyTree.from_state(base)
        start = time.perf_counter()
        batch = len(batch_tree.update(joins=[], leaves=leaving, seed=os.urandom(32)).wrapped)
        batch_s = time.perf_counter() - start
        single_tree = KeyTree.from_state(base)
        start = time.perf_counter()
        single = sum(
            len(single_tree.update(joins=[], leaves=[m], seed=os.urandom(32)).wrapped)
            for m in leaving
        )
        single_s = time.perf_counter() - start
        results[str(k)] = {
            "batch_wrapped": batch,
            "single_wrapped_total": single,
            "saving": round(1 - batch / single, 3),
            "batch_ms": round(batch_s * 1000, 2),
            "single_ms_total": round(single_s * 1000, 2),
        }
        log(f"n={n} k={k}: batch {batch} wrapped keys vs {single} one at a time")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-exp", type=int, default=20, help="largest n is 2^MAX_EXP")
    parser.add_argument("--batch-n", type=int, default=1 << 16, help="group size for batches")
    args = parser.parse_args()
    started = time.monotonic()
    single = one_leave(args.max_exp)
    batches = batch_vs_single(args.batch_n)
    log(f"done in {time.monotonic() - started:.0f} s")
    largest = single[str(1 << args.max_exp)]
    print(
        json.dumps(
            {
                "bench": "lkh",
                "results": {
                    "one_leave": single,
                    "batch_of_k_leaves": {"n": args.batch_n, **batches},
                },
                "anchor": {
                    "what": "naive rekey (one wrap per remaining member): n - 1 wrapped keys",
                    "naive_wrapped_at_largest_n": (1 << args.max_exp) - 1,
                    "log2_n": args.max_exp,
                },
                "ratio": round(largest["wrapped"] / math.log2(1 << args.max_exp), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
