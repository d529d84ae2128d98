"""Exact strict replay of LASER's drafting over a corpus of greedy texts (laser.replay), from the shell.

    python benchmarks/replay.py --corpus K.jsonl --dataset ml-100k --target users \
        --warm 46 --eval 40 --budget 32 [--block 1] [--json]

K is a strict `laser generate` output (records in file order; its manifest, if beside it,
gives the prompts' settings, e.g. --history-until). The first `--warm` records warm their
groups' shared pools; the last `--eval` are replayed; each replayed record then enters its
group's pool (every `--block` records, in order, as the job's blocks do).
"""

from __future__ import annotations

import argparse
import json
import time

from laser.replay import load_corpus, replay


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--target", default="users", choices=("users", "items"))
    ap.add_argument("--warm", type=int, required=True)
    ap.add_argument("--eval", type=int, required=True)
    ap.add_argument("--budget", type=int, default=32)
    ap.add_argument("--block", type=int, default=1, help="replayed records enter the pools every BLOCK records")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    records, prompts, plan = load_corpus(args.corpus, args.dataset, args.target)
    if args.warm + args.eval > len(records) or args.warm < 0 or args.eval < 1:
        raise SystemExit(f"{args.corpus}: {len(records)} records; need --warm + --eval <= that and --eval >= 1")
    t0 = time.perf_counter()
    res = replay(records, prompts, plan, args.budget, args.warm, args.eval, args.block)
    res["seconds"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(res))
    else:
        print(f"budget {args.budget}, warm {args.warm}, eval {args.eval}: {res['tokens_per_step']:.2f} tokens/step, "
              f"{res['nodes_per_step']:.1f} nodes/step, {res['accepted_per_node']:.3f} accepted tokens per node, "
              f"draft {res['draft_us_per_step']:.0f} us/step ({res['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
