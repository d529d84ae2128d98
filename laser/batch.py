"""Batched LASER decoding with continuous batching: B rows verified in one forward.

State (nothing survives a call):
  cache   the model's DynamicCache, [B, H, W, D] per layer. Row r's valid positions are
          columns [0, lens[r]); columns past that are garbage, hidden by the mask.
  seqs    per row: prompt + committed tokens (int32 numpy); the last token is pending
          (not in the cache), so lens[r] == len(seqs[r]) - 1.
Each step: every live row drafts its own tree from its own pools; with a cost curve the
trees are cut to one best-first budget chosen for the whole batch, then padded to one
node count q - 1; one forward over [B, q] with per-row positions and a per-row 4-D
mask; per-row acceptance; then row r's pending + accepted path move to columns
[lens[r], lens[r] + a_r) (a gather, not a recompute). A finished row is refilled with the
next queued prompt (its prompt is prefilled alone and copied into the row).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from laser import RetrievalPool, draft_union
from laser.accept import accept_trees, chance
from laser.decode import DecodeStats, DraftConfig, _check_args, min_match
from laser.hf import _layers, cache_kwarg, new_cache


@dataclass
class _Tree:
    """A draft tree (or its best-first prefix) in DFS order, as numpy arrays."""

    tokens: np.ndarray  # [m]
    parents: np.ndarray  # [m], -1 = child of the context
    depth: np.ndarray  # [m]
    mask: np.ndarray  # [m, m] ancestor-or-self
    counts: np.ndarray  # [m]
    root_count: float

    def __len__(self) -> int:
        return len(self.tokens)


def _common_budget(trees, cost: np.ndarray, confidence: float) -> list:
    """Cut every row's tree to its first b best-first nodes, one b for the whole batch.

    Rows are padded to the largest tree, so the batch pays cost[b] for its widest row:
    b maximises sum over rows of (1 + expected accepted in the first b nodes) / cost[b].
    """
    live = [t for t in trees if t is not None]
    top = min(max((len(t) for t in live), default=0), len(cost) - 1)
    total = np.zeros(top + 1)
    for t in live:
        by_rank = np.zeros(len(t))
        by_rank[t.rank] = confidence * chance(t)
        gain = np.concatenate([[0.0], np.cumsum(by_rank)])
        total += 1.0 + gain[np.minimum(np.arange(top + 1), len(t))]
    b = int(np.argmax(total / cost[: top + 1]))
    out = []
    for t in trees:
        if t is None:
            out.append(None)
            continue
        keep = np.flatnonzero(t.rank < b)  # a subtree, still in DFS order
        new = np.full(len(t), -1, dtype=np.int64)
        new[keep] = np.arange(keep.size)
        parents = t.parents[keep]
        out.append(_Tree(t.tokens[keep], np.where(parents >= 0, new[np.maximum(parents, 0)], -1).astype(np.int32),
                         t.depth[keep], t.mask[np.ix_(keep, keep)], t.counts[keep], t.root_count))
    return out


@dataclass
class Request:
    input_ids: list[int] | np.ndarray
    pool: RetrievalPool | None = None
    tag: object = None  # returned with the result (e.g. the record id)


@dataclass
class Result:
    tag: object
    tokens: np.ndarray  # generated tokens (prompt excluded)
    stats: DecodeStats = field(default_factory=DecodeStats)


def _set_row(cache, r: int, B: int, keys_vals) -> None:
    """Copy one sequence's KV (list of ([1, H, L, D], [1, H, L, D]) per layer) into row r, columns [0, L)."""
    if cache.get_seq_length() == 0:  # first fill: let the cache create its [B, H, 0, D] layers
        for idx, (nk, nv) in enumerate(keys_vals):
            shape = (B, nk.shape[1], 0, nk.shape[3])
            cache.update(nk.new_zeros(shape), nv.new_zeros(shape), idx)
    for (k, v, put), (nk, nv) in zip(_layers(cache), keys_vals):
        L = nk.shape[2]
        if k.shape[2] < L:
            pad = L - k.shape[2]
            k = torch.cat([k, k.new_zeros(k.shape[0], k.shape[1], pad, k.shape[3])], dim=2)
            v = torch.cat([v, v.new_zeros(v.shape[0], v.shape[1], pad, v.shape[3])], dim=2)
        k[r, :, :L] = nk[0]
        v[r, :, :L] = nv[0]
        put(k, v)


@torch.no_grad()
def generate_batch(model, requests: list[Request], batch_size: int = 8, max_new_tokens: int = 128,
                   mode: str = "strict", top_k: int = 2, min_prob: float = 0.1, eos_token_id="auto",
                   update_pool: bool = True, draft: DraftConfig | None = None, on_result=None) -> list[Result]:
    """Decode all requests, `batch_size` rows at a time, refilling rows as they finish.

    Strict mode gives each request exactly its own greedy output. Results come back in
    request order; `on_result(result)` is also called as each one finishes.
    """
    cfg = draft or DraftConfig()
    for req in requests:
        _check_args(model, torch.as_tensor(np.asarray(req.input_ids)), max_new_tokens, mode, top_k, min_prob, cfg)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if eos_token_id == "auto":
        eos_token_id = model.generation_config.eos_token_id
    eos = np.asarray([] if eos_token_id is None else np.atleast_1d(eos_token_id), dtype=np.int64)
    device, kv = model.device, cache_kwarg(model)
    dtype = next(model.parameters()).dtype
    B = min(batch_size, len(requests))
    queue = list(range(len(requests)))[::-1]
    results: list[Result | None] = [None] * len(requests)

    cache = new_cache(model)
    rows: list[dict | None] = [None] * B  # live row state: req index, seq, n, new, local pool, stats
    lens = np.zeros(B, dtype=np.int64)

    def start(r: int) -> None:
        i = queue.pop()
        ids = np.asarray(requests[i].input_ids, dtype=np.int32)
        L = ids.size
        t0 = time.perf_counter()
        one = new_cache(model)
        if L > 1:
            model(input_ids=torch.from_numpy(ids[None, :-1].astype(np.int64)).to(device), **{kv: one}, use_cache=True)
            _set_row(cache, r, B, [(k, v) for k, v, _ in _layers(one)])
        seq = np.zeros(L + max_new_tokens + 1, dtype=np.int32)
        seq[:L] = ids
        local = RetrievalPool(max_depth=12)
        local.insert(ids)
        pools, weights = [local], [cfg.prompt_weight if cfg.prompt_weight > 0 else 1.0]
        if requests[i].pool is not None:
            pools, weights = [requests[i].pool, local], [1.0, weights[0]]
        budget = cfg.budget if (cfg.prompt_weight > 0 or requests[i].pool is not None) else 0
        st = DecodeStats(time_prefill=time.perf_counter() - t0)
        rows[r] = dict(i=i, seq=seq, L=L, n=L, new=0, pools=pools, weights=weights, budget=budget, stats=st)
        lens[r] = L - 1

    for r in range(B):
        start(r)
    while any(row is not None for row in rows):
        t0 = time.perf_counter()
        trees = []
        for r, row in enumerate(rows):  # 1. draft per row
            if row is None:
                trees.append(None)
                continue
            trees.append(draft_union(row["pools"], row["weights"], row["seq"][: row["n"]], budget=row["budget"],
                                     max_depth=cfg.max_depth, min_match=min_match(cfg, mode), max_match=cfg.max_match,
                                     cost=cfg.cost, confidence=cfg.confidence))
        if cfg.cost is not None:
            trees = _common_budget(trees, cfg.cost, cfg.confidence)
        q = 1 + max(len(t) for t in trees if t is not None)
        W = int(lens.max())
        ids = np.zeros((B, q), dtype=np.int64)
        pos = np.zeros((B, q), dtype=np.int64)
        visible = np.zeros((B, q, W + q), dtype=bool)
        for r, (row, t) in enumerate(zip(rows, trees)):
            visible[r, :, W] = True  # everyone sees column W (pending); padding rows too, to stay finite
            if row is None:
                continue
            m = len(t)
            ids[r, 0], ids[r, 1 : m + 1] = row["seq"][row["n"] - 1], t.tokens
            pos[r, :] = lens[r]
            pos[r, 1 : m + 1] += t.depth
            visible[r, :, : lens[r]] = True
            visible[r, 1 : m + 1, W + 1 : W + 1 + m] = t.mask
            visible[r, m + 1 :, W + 1 + m :] = np.eye(q - 1 - m, dtype=bool)  # padded nodes: themselves
        mask = torch.zeros(B, 1, q, W + q, dtype=dtype, device=device)
        mask.masked_fill_(~torch.from_numpy(visible).to(device)[:, None], torch.finfo(dtype).min)
        # the block is appended at column W for every row: crop each layer to W first
        for k, v, put in _layers(cache):
            put(k[:, :, :W], v[:, :, :W])
        t1 = time.perf_counter()
        logits = model(input_ids=torch.from_numpy(ids).to(device), position_ids=torch.from_numpy(pos).to(device),
                       attention_mask=mask, **{kv: cache}, use_cache=True).logits.float()  # [B, q, V]
        t2 = time.perf_counter()
        src, dst, new_lens = [], [], lens.copy()
        judged = accept_trees(logits, trees, mode, top_k, min_prob, eos,  # 3. accept, all rows at once
                              [max_new_tokens - row["new"] if row else 0 for row in rows])
        for r, (row, t) in enumerate(zip(rows, trees)):
            if row is None:
                continue
            m = len(t)
            path, out, stop = judged[r]
            keep = np.concatenate([[0], path[: out.size - 1] + 1])  # pending + committed path, block offsets
            src += [(r, W + j) for j in keep]
            dst += [(r, lens[r] + j) for j in range(keep.size)]
            new_lens[r] = lens[r] + keep.size
            seq, n = row["seq"], row["n"]
            seq[n : n + out.size] = out
            row["pools"][-1].extend(seq[:n], out)  # the request's own prompt/output pool
            if update_pool and requests[row["i"]].pool is not None:
                requests[row["i"]].pool.extend(seq[row["L"] : n], out)
            row["n"], row["new"] = n + out.size, row["new"] + out.size
            st = row["stats"]
            st.steps += 1
            st.accepted.append(out.size - 1)
            st.tree_sizes.append(m)
            if stop or row["new"] >= max_new_tokens:
                st.new_tokens = row["new"]
                res = Result(requests[row["i"]].tag, seq[row["L"] : row["n"]].copy(), st)
                results[row["i"]] = res
                if on_result is not None:
                    on_result(res)
                rows[r] = None
        t3 = time.perf_counter()
        # 4. commit: move each row's kept block columns next to its past (gather), then refill
        if src:
            rs_, sc = torch.tensor(src, device=device).T
            _, dc = torch.tensor(dst, device=device).T
            for k, v, put in _layers(cache):
                k[rs_, :, dc] = k[rs_, :, sc]
                v[rs_, :, dc] = v[rs_, :, sc]
        lens[:] = new_lens
        for r in range(B):
            if rows[r] is None and queue:
                start(r)
            elif rows[r] is None:
                lens[r] = 0
        for row in rows:
            if row is not None:
                st = row["stats"]
                st.time_draft += t1 - t0
                st.time_verify += t2 - t1
                st.time_accept += t3 - t2
                st.time_cache += time.perf_counter() - t3
    return results
