"""The knowledge job: one text per user or item of a dataset, resumable, nothing lost.

Output: JSONL, one record per id, appended, flushed and fsynced per record. Pools live in
`<out>.pools/` (snapshots every `save_every` records; the index names how many records
they hold). On restart: a torn last line (the record in flight) is cut off, done ids are
skipped, and the texts of records newer than the pool snapshot are re-inserted, so the
pools match an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import laser
from laser.data import chat_ids, item_prompt, load_dataset, user_prompt
from laser.groups import PoolSet, Router, collaborative_groups, default_threshold, group_of


@dataclass
class JobConfig:
    dataset: str = "ml-100k"
    target: str = "users"  # users | items
    out: str = "knowledge.jsonl"
    limit: int | None = None
    pool: str = "routed"  # none | global | collaborative | attribute | routed
    mode: str = "strict"
    top_k: int = 2
    min_prob: float = 0.1
    model: str | None = None
    data_dir: str | None = None
    max_new_tokens: int = 160
    warm: str | None = None  # earlier knowledge JSONL to warm the pools with
    clusters: int = 8
    threshold: int | None = None  # router h; default: median interaction count
    seed: int = 0
    save_every: int = 10
    budget: int = 32
    batch_size: int = 1  # > 1: continuous batching (laser.batch)


def read_records(path: Path) -> list[dict]:
    """Complete records of an output file; a torn last line (killed mid-write) is cut off."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    records = []
    for lineno, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{lineno}: not a JSON record; refusing to append to a damaged output file") from None
    return records


def _warm(pools: PoolSet, path: str, tok, group_fn) -> int:
    n = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                toks = rec.get("tokens") or tok(rec["text"], add_special_tokens=False)["input_ids"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{lineno}: a warm-up record needs 'text' or 'tokens'") from None
            pool = pools.get(rec.get("group") or group_fn(str(rec.get("id", ""))))
            if pool is not None:
                pool.insert(np.asarray(toks, dtype=np.int64))
            n += 1
    return n


def run_job(cfg: JobConfig, progress: bool = True) -> dict:
    if cfg.target not in ("users", "items"):
        raise ValueError(f"--target must be users or items, got {cfg.target!r}")
    out = Path(cfg.out)
    with open(out, "a", encoding="utf-8"):  # fail now, not after loading the model
        pass
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    keys = sorted(ds.users if cfg.target == "users" else ds.items, key=lambda k: (len(k), k))
    if cfg.limit is not None:
        keys = keys[: cfg.limit]
    records = read_records(out)
    done = {r["id"] for r in records}
    pending = [k for k in keys if k not in done]

    collab = collaborative_groups(ds, cfg.target, cfg.clusters, seed=cfg.seed) if cfg.pool in ("collaborative", "routed") else None
    h = cfg.threshold if cfg.threshold is not None else default_threshold(ds, cfg.target)
    router = Router(ds, cfg.target, collab or {}, h) if cfg.pool == "routed" else None

    def group_fn(key):
        return group_of(cfg.pool, router, key, collab, ds, cfg.target)

    model, tok = laser.load_model(cfg.model)
    pool_dir = out.with_name(out.name + ".pools")
    if (pool_dir / "index.json").exists():
        pools = PoolSet.load(pool_dir, cfg.pool)
    else:
        pools = PoolSet(cfg.pool, vocab_size=len(tok))
        if cfg.warm:
            _warm(pools, cfg.warm, tok, group_fn)
    for rec in records[pools.records :]:  # written after the last pool snapshot
        pool = pools.get(rec["group"])
        if pool is not None:
            pool.insert(np.asarray(rec["tokens"], dtype=np.int64))
    pools.records = len(records)

    prompt_of = user_prompt if cfg.target == "users" else item_prompt
    # the tree budget follows this machine's measured verification cost (at this batch size)
    ctx_len = len(chat_ids(tok, prompt_of(ds, keys[0]))) if keys else 256
    cost = laser.calibrate(model, context_len=ctx_len, sizes=(0, 1, 2, 4, 8, 16, 32), repeats=2, batch=cfg.batch_size)
    draft = laser.DraftConfig(budget=cfg.budget, max_depth=10, cost=cost)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(keys), initial=len(keys) - len(pending), unit="rec", dynamic_ncols=True)
    n_tokens, n_time, accepted, written = 0, 0.0, [], 0
    t_start = time.perf_counter()
    f = open(out, "a", encoding="utf-8")

    def write(key, group, new, steps, mean_acc, dt):
        nonlocal n_tokens, n_time, written
        rec = {"id": key, "group": group, "text": tok.decode(new, skip_special_tokens=True), "tokens": new,
               "steps": steps, "time": round(dt, 4)}
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
        pools.records += 1
        written += 1
        n_tokens, n_time = n_tokens + len(new), time.perf_counter() - t_start
        accepted.append(mean_acc)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(tok_s=f"{n_tokens / n_time:.1f}", acc=f"{np.mean(accepted):.2f}")
        if written % cfg.save_every == 0:
            pools.save(pool_dir)

    try:
        if cfg.batch_size > 1:
            from laser.batch import Request, generate_batch

            reqs = [Request(chat_ids(tok, prompt_of(ds, key)), pools.get(group_fn(key)), key) for key in pending]
            generate_batch(model, reqs, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, mode=cfg.mode,
                           top_k=cfg.top_k, min_prob=cfg.min_prob, draft=draft,
                           on_result=lambda r: write(r.tag, group_fn(r.tag), r.tokens.tolist(), r.stats.steps,
                                                     r.stats.mean_accepted, r.stats.total_time))
        else:
            for key in pending:
                ids, group = chat_ids(tok, prompt_of(ds, key)), group_fn(key)
                t0 = time.perf_counter()
                res = laser.generate(model, ids, pool=pools.get(group), max_new_tokens=cfg.max_new_tokens,
                                     mode=cfg.mode, top_k=cfg.top_k, min_prob=cfg.min_prob, draft=draft)
                write(key, group, res.sequences[0, len(ids):].tolist(), res.stats.steps,
                      res.stats.mean_accepted, time.perf_counter() - t0)
    finally:
        f.close()
        if bar is not None:
            bar.close()
        pools.save(pool_dir)
    return {"written": written, "skipped": len(keys) - len(pending), "tokens": n_tokens,
            "tokens_per_s": n_tokens / n_time if n_time else 0.0,
            "mean_accepted": float(np.mean(accepted)) if accepted else 0.0, "pools": len(pools.pools)}
