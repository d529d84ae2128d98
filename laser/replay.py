"""Exact strict-mode replay of LASER's drafting over a corpus of greedy texts (no model forward).

A strict `laser generate` output is replayed step by step with the job's drafting (its
groups and pools, the shared pool at weight 1 and the request's own prompt/output pool at
DraftConfig.prompt_weight, the job's max_depth and DraftConfig's match lengths) at a hard
node budget (no cost cut). In strict mode a step commits the longest drafted path that
equals the greedy continuation plus the bonus token, exactly what decoding commits, so
tokens/step here is the decoder's (tests/test_replay.py checks it against laser.generate).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

import laser
from laser.data import chat_ids
from laser.groups import PoolSet
from laser.job import JOB_DRAFT, JobConfig, make_plan, read_records


def corpus_plan(corpus: Path, dataset: str, target: str):
    man = corpus.with_name(corpus.name + ".manifest.json")
    m = json.loads(man.read_text()) if man.exists() else {}
    cfg = JobConfig(dataset=dataset, target=target, pool=m.get("pool", "routed"), clusters=m.get("clusters", 8),
                    seed=m.get("seed", 0), threshold=m.get("threshold"), history_until=m.get("history_until"),
                    max_depth=m.get("max_depth", 10))
    if m.get("mode", "strict") != "strict":
        raise ValueError(f"{corpus}: a replay needs a strict corpus (greedy texts), this one is {m['mode']}")
    return make_plan(cfg)


def replay(records: list[dict], prompts: dict, plan, budget: int, warm: int, n_eval: int, block: int = 1,
           draft: laser.DraftConfig | None = None) -> dict:
    """Replay records[-n_eval:] after warming with records[:warm]; returns the totals."""
    cfg = draft or laser.DraftConfig(budget=budget, max_depth=plan.cfg.max_depth, **JOB_DRAFT)
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


def load_corpus(corpus: str | Path, dataset: str = "ml-100k", target: str = "users"):
    """(records, prompts by id, plan) of a strict corpus; prompts rebuilt as the job builds them."""
    from transformers import AutoTokenizer

    from laser.model import default_model_dir

    corpus = Path(corpus)
    records = read_records(corpus)
    plan = corpus_plan(corpus, dataset, target)
    tok = AutoTokenizer.from_pretrained(str(default_model_dir()), local_files_only=True)
    prompts = {r["id"]: chat_ids(tok, plan.template.render(plan.ds, target, r["id"])) for r in records}
    return records, prompts, plan


def pool_size_curve(records, prompts, plan, budget: int = 32, n_eval: int = 40, warms=None) -> list[dict]:
    """tokens/step of the last n_eval records against the number of warm texts (16 ... all others)."""
    most = len(records) - n_eval
    if warms is None:
        warms = sorted({w for w in (4, 16, 32, 64, 128, 256, 512, 1024, 2048) if w < most} | {most})
    return [{"warm": w, **replay(records, prompts, plan, budget, w, n_eval)} for w in warms]
