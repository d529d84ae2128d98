"""Exact strict-mode replay of LASER's drafting over a corpus of greedy texts (no model forward).

    python benchmarks/replay.py --corpus K.jsonl --dataset ml-100k --target users \
        --warm 46 --eval 40 --budget 32 [--block 1] [--json]

K is a strict `laser generate` output (records in file order; its manifest, if beside it,
gives the prompts' settings, e.g. --history-until). The first `--warm` records warm their
groups' shared pools; the last `--eval` are replayed step by step with the job's drafting
(routed groups, the shared pool at weight 1 and the request's own prompt/output pool at
DraftConfig.prompt_weight, the job's max_depth 10 and DraftConfig's match lengths) at a
hard node budget (no cost cut). In strict mode a step commits the longest drafted path
that equals the greedy continuation plus the bonus token, which is exactly what decoding
commits, so tokens/step here is the decoder's. Each replayed record then enters its
group's pool (every `--block` records, in order, as the job's blocks do).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import laser
from laser.data import chat_ids
from laser.groups import PoolSet
from laser.job import JobConfig, make_plan, read_records


def _plan(corpus: Path, dataset: str, target: str):
    man = corpus.with_name(corpus.name + ".manifest.json")
    m = json.loads(man.read_text()) if man.exists() else {}
    cfg = JobConfig(dataset=dataset, target=target, pool=m.get("pool", "routed"), clusters=m.get("clusters", 8),
                    seed=m.get("seed", 0), threshold=m.get("threshold"), history_until=m.get("history_until"),
                    max_depth=m.get("max_depth", 10))
    if m.get("mode", "strict") != "strict":
        raise SystemExit(f"{corpus}: a replay needs a strict corpus (greedy texts), this one is {m['mode']}")
    return make_plan(cfg)


def replay(records: list[dict], prompts: dict, plan, budget: int, warm: int, n_eval: int, block: int = 1,
           draft: laser.DraftConfig | None = None) -> dict:
    """Replay records[-n_eval:] after warming with records[:warm]; returns the totals."""
    cfg = draft or laser.DraftConfig(budget=budget, max_depth=plan.cfg.max_depth)
    pools = PoolSet(plan.cfg.pool, vocab_size=0)
    for rec in records[:warm]:
        pool = pools.get(rec["group"])
        if pool is not None:
            pool.insert(np.asarray(rec["tokens"], dtype=np.int64))
    steps = tokens = nodes = 0
    t_draft, pending = 0.0, []
    for rec in records[-n_eval:]:
        prompt = np.asarray(prompts[rec["id"]], dtype=np.int32)
        text = np.asarray(rec["tokens"], dtype=np.int32)
        seq = np.concatenate([prompt, text])
        shared = pools.get(rec["group"])
        local = laser.RetrievalPool(max_depth=shared.max_depth if shared is not None else 12)
        local.insert(prompt)
        srcs = [(p, w) for p, w in ((shared, 1.0), (local, cfg.prompt_weight)) if p is not None and w > 0]
        n, end = prompt.size, seq.size
        while n < end:
            t0 = time.perf_counter()
            tree = laser.draft_union([p for p, _ in srcs], [w for _, w in srcs], seq[:n], budget=cfg.budget,
                                     max_depth=cfg.max_depth, min_match=cfg.min_match, max_match=cfg.max_match)
            t_draft += time.perf_counter() - t0
            # node i (depth d) proposes seq[n - 1 + d]; its whole root path must match
            depth = tree.depth.astype(np.int64)
            ok = np.zeros(len(tree), dtype=bool)
            for i in range(len(tree)):  # parents precede children (DFS order)
                p = tree.parents[i]
                at = n - 1 + depth[i]
                ok[i] = at < end and tree.tokens[i] == seq[at] and (p < 0 or ok[p])
            a = int(depth[ok].max()) if ok.any() else 0
            out = seq[n : min(n + a + 1, end)]  # accepted path + the bonus token
            local.extend(seq[:n], out)
            n += out.size
            steps, tokens, nodes = steps + 1, tokens + out.size, nodes + len(tree)
        pending.append(rec)
        if len(pending) == block:
            for r in pending:
                pool = pools.get(r["group"])
                if pool is not None:
                    pool.insert(np.asarray(r["tokens"], dtype=np.int64))
            pending = []
    return {"tokens_per_step": tokens / steps, "nodes_per_step": nodes / steps,
            "accepted_per_node": (tokens - steps) / nodes if nodes else 0.0, "steps": steps, "tokens": tokens,
            "draft_us_per_step": 1e6 * t_draft / steps}


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
    corpus = Path(args.corpus)
    records = read_records(corpus)
    if args.warm + args.eval > len(records) or args.warm < 0 or args.eval < 1:
        raise SystemExit(f"{corpus}: {len(records)} records; need --warm + --eval <= that and --eval >= 1")
    plan = _plan(corpus, args.dataset, args.target)
    from transformers import AutoTokenizer

    from laser.model import default_model_dir

    tok = AutoTokenizer.from_pretrained(str(default_model_dir()), local_files_only=True)
    used = records[: args.warm] + records[-args.eval :]
    prompts = {r["id"]: chat_ids(tok, plan.template.render(plan.ds, args.target, r["id"])) for r in used}
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
