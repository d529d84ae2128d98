"""Exact strict replay of LASER's drafting over a corpus of greedy texts (laser.replay), from the shell.

    python benchmarks/replay.py --corpus K.jsonl[.gz] --dataset ml-100k --target users \
        --warm 46 --eval 40 --budget 32 [--block 1] [--json]
    # the acceptance model, a global pool beside the group's, deep matches:
    python benchmarks/replay.py --corpus K --warm 46 --eval 40 --budget 12 --acceptance --learn-warm \
        --global --pool-depth 64 --max-depth 60 --min-match 1 --max-match 30 --match-levels 3
    # SuffixDecoding on the same replay (bash benchmarks/suffix_baseline.sh builds it):
    python benchmarks/replay.py --corpus K --warm 46 --eval 40 --budget 32 --method suffix
    # the comparison table (Markdown): SuffixDecoding at budgets 8/16/32/64 against LASER's
    # drafting (as given by the flags) at equal nodes per step, interpolated on its budget curve
    python benchmarks/replay.py --corpus K --table --warms 46,903 --eval 40 [drafting flags]

K is a strict `laser generate` output (records in file order; its manifest, if beside it,
gives the prompts' settings, e.g. --history-until). The first `--warm` records warm their
groups' shared pools; the last `--eval` are replayed; each replayed record then enters its
group's pool (every `--block` records, in order, as the job's blocks do). Without drafting
flags LASER drafts exactly as `laser generate` does (with --acceptance: as `laser generate
--acceptance`; --global, --pool-depth, --max-depth, --max-match: as the job's --global-pool,
--pool-depth, --max-depth, --max-match). --pool global drafts from one pool of every text
instead of the groups' (the job's --pool global), --pool none from the request's own text only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import laser
from laser.job import JobConfig, job_draft
from laser.replay import load_corpus, replay, replay_suffix


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--target", default="users", choices=("users", "items"))
    ap.add_argument("--warm", type=int, default=0)
    ap.add_argument("--table", action="store_true", help="the comparison table with SuffixDecoding (Markdown)")
    ap.add_argument("--warms", default="46,903", help="--table: warm sizes")
    ap.add_argument("--eval", type=int, default=40)
    ap.add_argument("--budget", type=int, default=32)
    ap.add_argument("--block", type=int, default=1, help="replayed records enter the pools every BLOCK records")
    ap.add_argument("--method", default="laser", choices=("laser", "suffix"),
                    help="suffix: SuffixDecoding's drafting (build it with bash benchmarks/suffix_baseline.sh)")
    ap.add_argument("--spec-factor", type=float, default=4.0, help="suffix: max_spec_factor")
    ap.add_argument("--min-prob", type=float, default=0.0, help="suffix: min_token_prob")
    g = ap.add_argument_group("LASER drafting (default: the job's)")
    g.add_argument("--acceptance", action="store_true", help="draft with an AcceptanceModel learned online")
    g.add_argument("--prior", type=float, default=4.0, help="the AcceptanceModel's prior strength")
    g.add_argument("--learn-warm", action="store_true", help="the model also learns from replaying the warm records")
    g.add_argument("--global", dest="with_global", action="store_true", help="a pool of every text beside the group's")
    g.add_argument("--pool", choices=("global", "none"),
                   help="instead of the corpus's group pools: one pool of every text (global), or none (the "
                        "request's own text only)")
    g.add_argument("--pool-depth", type=int, help="the pools' max_depth (the job's: 12)")
    g.add_argument("--max-depth", type=int, help="draft depth (the job's: 10)")
    g.add_argument("--min-match", type=int)
    g.add_argument("--max-match", type=int)
    g.add_argument("--match-levels", type=int)
    g.add_argument("--min-chance", type=float, default=0.0,
                   help="with --acceptance: past --min-nodes, draft only nodes of at least this chance")
    g.add_argument("--min-nodes", type=int, default=0, help="the floor of nodes per step that --min-chance spares")
    g.add_argument("--floors", action="store_true",
                   help="--table: LASER's curve over --min-nodes (0 ... 64) at budget 64 instead of over budgets")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    records, prompts, plan = load_corpus(args.corpus, args.dataset, args.target)
    if args.pool:
        if args.with_global:
            raise SystemExit("--global needs the group pools (not --pool)")
        plan = dataclasses.replace(plan, cfg=dataclasses.replace(plan.cfg, pool=args.pool, global_pool=False))
    if args.table:
        return table(args, records, prompts, plan)
    if args.warm + args.eval > len(records) or args.warm < 0 or args.eval < 1:
        raise SystemExit(f"{args.corpus}: {len(records)} records; need --warm + --eval <= that and --eval >= 1")
    t0 = time.perf_counter()
    if args.method == "suffix":
        res = replay_suffix(records, prompts, args.budget, args.warm, args.eval, args.spec_factor, args.min_prob)
    else:
        res = run_laser(args, records, prompts, plan, args.budget, args.warm)
    res["seconds"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.method}, budget {args.budget}, warm {args.warm}, eval {args.eval}: "
              f"{res['tokens_per_step']:.2f} tokens/step, {res['nodes_per_step']:.1f} nodes/step, "
              f"{res['accepted_per_node']:.3f} accepted tokens per node, draft {res['draft_us_per_step']:.0f} us/step "
              f"({res['seconds']:.1f} s)")


def run_laser(args, records, prompts, plan, budget: int, warm: int, min_nodes: int | None = None) -> dict:
    job = dict(job_draft(JobConfig(acceptance=args.acceptance)), max_depth=plan.cfg.max_depth)
    given = {"max_depth": args.max_depth, "min_match": args.min_match, "max_match": args.max_match,
             "match_levels": args.match_levels}
    draft = laser.DraftConfig(budget=budget, min_chance=args.min_chance,
                              min_nodes=args.min_nodes if min_nodes is None else min_nodes,
                              **{**job, **{k: v for k, v in given.items() if v is not None}})
    model = laser.AcceptanceModel(args.prior) if args.acceptance else None
    return replay(records, prompts, plan, budget, warm, args.eval, args.block, draft=draft, acceptance=model,
                  with_global=args.with_global or None, pool_depth=args.pool_depth, learn_warm=args.learn_warm)


def table(args, records, prompts, plan) -> None:
    """SuffixDecoding (tree, max_spec_factor 4, min_token_prob 0; and its speculate() defaults)
    at budgets 8/16/32/64 against LASER's tokens/step at the same nodes/step, read off LASER's
    own curve (linear between the two nearest points, LASER's largest tree beyond its end, none
    below its start): over budgets, or with --floors over min_nodes at budget 64 (every step drafts
    its best min_nodes nodes, and more up to 64 while their chance is >= --min-chance)."""
    import numpy as np

    budgets = (8, 16, 32, 64)
    curve_budgets = (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 64)
    if args.floors:
        if not (args.acceptance and args.min_chance > 0):
            raise SystemExit("--floors needs --acceptance and --min-chance > 0")
        curve_budgets = (0,) + curve_budgets  # min_nodes (64: budget 64 without min_chance)
    print("| warm | budget | SuffixDecoding tokens/step @ nodes/step | LASER @ equal nodes | ratio | "
          "LASER at this budget | SuffixDecoding defaults |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for warm in (int(w) for w in args.warms.split(",")):
        curve = [run_laser(args, records, prompts, plan, 64, warm, b) if args.floors else
                 run_laser(args, records, prompts, plan, b, warm) for b in curve_budgets]
        nodes = np.array([c["nodes_per_step"] for c in curve])
        toks = np.array([c["tokens_per_step"] for c in curve])
        order = np.argsort(nodes)
        for b in budgets:
            sd = replay_suffix(records, prompts, b, warm, args.eval, 4.0, 0.0)
            plain = replay_suffix(records, prompts, b, warm, args.eval, 1.0, 0.1, tree=False)
            inside = sd["nodes_per_step"] >= nodes.min()  # above the curve's end: LASER's largest tree
            at = float(np.interp(sd["nodes_per_step"], nodes[order], toks[order]))
            own = curve[curve_budgets.index(b)]
            print(f"| {warm} | {b} | {sd['tokens_per_step']:.2f} @ {sd['nodes_per_step']:.1f} | "
                  + (f"{at:.2f} | {at / sd['tokens_per_step']:.3f}" if inside else "below the curve | -")
                  + f" | {own['tokens_per_step']:.2f} @ {own['nodes_per_step']:.1f} | "
                  f"{plain['tokens_per_step']:.2f} @ {plain['nodes_per_step']:.1f} |", flush=True)
        best_sd = max(replay_suffix(records, prompts, b, warm, args.eval, 4.0, 0.0)["tokens_per_step"] for b in budgets)
        print(f"| {warm} | best tree | {best_sd:.2f} | best LASER (budget <= 64): {toks.max():.2f} | "
              f"{toks.max() / best_sd:.3f} | | |", flush=True)


if __name__ == "__main__":
    main()
