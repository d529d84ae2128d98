"""Exact strict-mode replay of LASER's drafting over a corpus of greedy texts (no model forward).

A strict `laser generate` output is replayed step by step with the job's drafting (its
groups and pools, the shared pool at weight 1 and the request's own prompt/output pool at
DraftConfig.prompt_weight, the job's max_depth and DraftConfig's match lengths) at a hard
node budget (no cost cut). In strict mode a step commits the longest drafted path that
equals the greedy continuation plus the bonus token, exactly what decoding commits, so
tokens/step here is the decoder's (tests/test_replay.py checks it against laser.generate).
"""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import numpy as np

import laser
from laser.data import chat_ids
from laser.engine import draft_sources
from laser.errors import InputError
from laser.groups import PoolSet
from laser.job import JobConfig, job_draft, make_plan, read_records


def corpus_plan(corpus: Path, dataset: str, target: str):
    name = corpus.name[: -len(".gz")] if corpus.name.endswith(".gz") else corpus.name
    man = corpus.with_name(name + ".manifest.json")
    m = json.loads(man.read_text()) if man.exists() else {}
    kept = ("pool", "clusters", "seed", "threshold", "history_until", "max_depth", "pool_depth", "global_pool",
            "max_match", "acceptance")  # the manifest's settings that decide prompts and drafting
    cfg = JobConfig(dataset=dataset, target=target, **{k: m[k] for k in kept if k in m})
    if m.get("mode", "strict") != "strict":
        raise InputError(f"{corpus}: a replay needs a strict corpus (greedy texts), this one is {m['mode']}")
    return make_plan(cfg)


def replay(records: list[dict], prompts: dict, plan, budget: int, warm: int, n_eval: int, block: int = 1,
           draft: laser.DraftConfig | None = None, acceptance: laser.AcceptanceModel | None = None,
           with_global: bool | None = None, pool_depth: int | None = None, learn_warm: bool = False) -> dict:
    """Replay records[-n_eval:] after warming with records[:warm]; returns the totals.

    acceptance: draft with this model (source slots SHARED, OWN, GLOBAL) and teach it every
    verified tree, as the engine does; learn_warm: the warm
    records are replayed too (uncounted), as the job would have decoded them, so the model
    has learned from them. with_global: one more pool holding every text (weight 1), as the
    job's --global-pool; pool_depth: the pools' max_depth (both default to the plan's job)."""
    job = plan.cfg
    cfg = draft or laser.DraftConfig(budget=budget, max_depth=job.max_depth, **job_draft(job))
    pools = PoolSet(job.pool, max_depth=job.pool_depth if pool_depth is None else pool_depth, vocab_size=0,
                    with_global=job.global_pool if with_global is None else with_global)
    depth = pools.max_depth

    def add(rec):
        pools.insert(rec["group"], rec["tokens"])

    taught = records[:warm] if learn_warm and acceptance is not None else []
    if not taught:
        for rec in records[:warm]:
            add(rec)
    steps = tokens = nodes = 0
    t_draft, pending, expected = 0.0, [], 0.0
    for k, rec in enumerate(taught + records[-n_eval:]):
        if k == len(taught):  # the counted part starts
            steps = tokens = nodes = 0
            t_draft, expected = 0.0, 0.0
        prompt = np.asarray(prompts[rec["id"]], dtype=np.int32)
        text = np.asarray(rec["tokens"], dtype=np.int32)
        seq = np.concatenate([prompt, text])
        local = laser.RetrievalPool(max_depth=depth)
        local.insert(prompt)
        srcs = draft_sources(pools.draft_pools(rec["group"]), local, cfg.prompt_weight)  # as the engine's rows
        kw = {"sources": [s for *_, s in srcs], **cfg.acceptance_args(acceptance)}  # as the engine drafts
        n, end = prompt.size, seq.size
        while n < end:
            t0 = time.perf_counter()
            tree = laser.draft_union([p for p, *_ in srcs], [w for _, w, _ in srcs], seq[:n], budget=cfg.budget,
                                     max_depth=cfg.max_depth, min_match=cfg.min_match, max_match=cfg.max_match, **kw)
            t_draft += time.perf_counter() - t0
            # node i (depth d) proposes seq[n - 1 + d]; its whole root path must match
            depth_of = tree.depth.astype(np.int64)
            ok = np.zeros(len(tree), dtype=bool)
            for i in range(len(tree)):  # parents precede children (DFS order)
                p = tree.parents[i]
                at = n - 1 + depth_of[i]
                ok[i] = at < end and tree.tokens[i] == seq[at] and (p < 0 or ok[p])
            if acceptance is not None:
                expected += float(tree.counts.sum())  # the model's expected accepted tokens (before it learns)
                acceptance.observe(tree, np.flatnonzero(ok))  # the accepted path (one node per depth)
            a = int(depth_of[ok].max()) if ok.any() else 0
            out = seq[n : min(n + a + 1, end)]  # accepted path + the bonus token
            local.extend(seq[:n], out)
            n += out.size
            steps, tokens, nodes = steps + 1, tokens + out.size, nodes + len(tree)
        pending.append(rec)
        if len(pending) == block:
            for r in pending:
                add(r)
            pending = []
    return {**_totals(steps, tokens, nodes, t_draft),
            **({} if acceptance is None else {"expected_accepted_per_step": expected / steps})}


def _totals(steps: int, tokens: int, nodes: int, t_draft: float) -> dict:
    return {"tokens_per_step": tokens / steps, "nodes_per_step": nodes / steps,
            "accepted_per_node": (tokens - steps) / nodes if nodes else 0.0, "steps": steps, "tokens": tokens,
            "draft_us_per_step": 1e6 * t_draft / steps}


def suffix_cache_class():
    """SuffixDecodingCache (ArcticInference), built by benchmarks/suffix_baseline.sh into $LASER_CACHE/arctic."""
    import sys

    from laser.model import cache_dir

    try:
        from arctic_inference.suffix_decoding import SuffixDecodingCache
    except ImportError:
        home = cache_dir() / "arctic"
        if not (home / "arctic_inference").is_dir():
            raise RuntimeError(f"SuffixDecoding is not built in {home}: run bash benchmarks/suffix_baseline.sh") from None
        sys.path.insert(0, str(home))
        from arctic_inference.suffix_decoding import SuffixDecodingCache
    return SuffixDecodingCache


def replay_suffix(records: list[dict], prompts: dict, budget: int, warm: int, n_eval: int, max_spec_factor: float = 4.0,
                  min_token_prob: float = 0.0, tree: bool = True, max_depth: int = 64) -> dict:
    """The same replay with SuffixDecoding drafting (its global tree of all responses, the
    request's prompt tree, max_spec_tokens = budget). Its native updates: a request's
    output enters the global tree as it is written."""
    cache = suffix_cache_class()(max_tree_depth=max_depth)
    for k, rec in enumerate(records[:warm]):
        cache.start_request(("warm", k), np.asarray(prompts[rec["id"]], dtype=np.int32))
        cache.add_active_response(("warm", k), np.asarray(rec["tokens"], dtype=np.int32))
        cache.stop_request(("warm", k))
    steps = tokens = nodes = 0
    t_draft = 0.0
    for k, rec in enumerate(records[-n_eval:]):
        prompt = np.asarray(prompts[rec["id"]], dtype=np.int32)
        seq = np.concatenate([prompt, np.asarray(rec["tokens"], dtype=np.int32)])
        cache.start_request(("eval", k), prompt)
        n, end = prompt.size, seq.size
        while n < end:
            t0 = time.perf_counter()
            d = cache.speculate(("eval", k), seq[:n], max_spec_tokens=budget, max_spec_factor=max_spec_factor,
                                min_token_prob=min_token_prob, use_tree_spec=tree)
            t_draft += time.perf_counter() - t0
            a, node = 0, -1  # walk the drafted tree along the true continuation
            while n + a < end:
                nxt = [i for i, p in enumerate(d.parents) if p == node and d.token_ids[i] == seq[n + a]]
                if not nxt:
                    break
                node, a = nxt[0], a + 1
            out = seq[n : min(n + a + 1, end)]
            cache.add_active_response(("eval", k), out)
            n += out.size
            steps, tokens, nodes = steps + 1, tokens + out.size, nodes + len(d.token_ids)
        cache.stop_request(("eval", k))
    return _totals(steps, tokens, nodes, t_draft)


def corpus_records(corpus: str | Path) -> list[dict]:
    """The records of a `laser generate` output in file order: its .jsonl, or packed .jsonl.gz
    (benchmarks/knowledge)."""
    corpus = Path(corpus)
    if corpus.suffix == ".gz":
        return [json.loads(line) for line in gzip.decompress(corpus.read_bytes()).splitlines() if line.strip()]
    return read_records(corpus)


def load_corpus(corpus: str | Path, dataset: str = "ml-100k", target: str = "users"):
    """(records, prompts by id, plan) of a strict corpus; prompts rebuilt as the job builds them."""
    from transformers import AutoTokenizer

    from laser.model import default_model_dir

    corpus = Path(corpus)
    records = corpus_records(corpus)
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
