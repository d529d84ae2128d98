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
[lens[r], lens[r] + a_r) (a gather, not a recompute). Rows that finish are refilled with
the next queued prompts (one padded prefill forward for all rows freed in a step); once
the queue is empty, finished rows leave the batch (B shrinks) instead of being computed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from laser import RetrievalPool, draft_union
from laser.accept import accept_trees, chance
from laser.decode import DecodeStats, DraftConfig, _check_args, _forwards, _draft_sources, _verify_inputs
from laser.hf import _layers, cache_kwarg, fill_only, new_cache


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
    index: int = -1  # position of the request in the input list


def _prefill_rows(model, cache, kv: str, B: int, rows: list[int], prompts: list[np.ndarray]) -> None:
    """Prefill prompts[j][:-1] into cache row rows[j], columns [0, len - 1): one forward for all.

    The prompts are right-padded to one length (a 2-D attention mask hides the padding, so
    positions are 0..len-2 as in an unbatched prefill) and the padded block is copied into
    the rows as a whole: columns past a row's length are garbage, hidden by later masks.
    """
    L = max(p.size for p in prompts) - 1
    if L == 0:
        return
    ids = np.zeros((len(rows), L), dtype=np.int64)
    att = np.zeros((len(rows), L), dtype=np.int64)
    for j, p in enumerate(prompts):
        ids[j, : p.size - 1], att[j, : p.size - 1] = p[:-1], 1
    device = model.device
    one = new_cache(model)
    model(input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(att).to(device),
          **{kv: one}, use_cache=True, **fill_only(model))
    if cache.get_seq_length() == 0:  # first fill: let the cache create its [B, H, 0, D] layers
        for idx, (nk, nv, _) in enumerate(_layers(one)):
            shape = (B, nk.shape[1], 0, nk.shape[3])
            cache.update(nk.new_zeros(shape), nv.new_zeros(shape), idx)
    at = torch.tensor(rows, device=device)
    for (k, v, put), (nk, nv, _) in zip(_layers(cache), _layers(one)):
        if k.shape[2] < L:
            pad = (k.shape[0], k.shape[1], L - k.shape[2], k.shape[3])
            k, v = torch.cat([k, k.new_zeros(pad)], dim=2), torch.cat([v, v.new_zeros(pad)], dim=2)
        k[at, :, :L] = nk
        v[at, :, :L] = nv
        put(k, v)


def _move_columns(cache, rows: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
    """In every layer, copy column src[i] of row rows[i] to column dst[i] (all heads): a gather.

    Each layer's keys/values are contiguous [B, H, W, D] (the cache's own concatenation):
    seen as [B * H * W, D], a column of one row is H flat rows, so one index_select and
    one index_copy_ per tensor move them all.
    """
    flat = {}
    for k, v, _ in _layers(cache):
        Bk, H, W, D = k.shape
        if (H, W) not in flat:
            base = (rows[:, None] * H + np.arange(H)[None, :]) * W  # [n, H]
            both = np.stack([(base + src[:, None]).ravel(), (base + dst[:, None]).ravel()])
            flat[H, W] = torch.from_numpy(both).to(k.device)
        s, d = flat[H, W]
        for t in (k, v):
            tf = t.view(Bk * H * W, D)  # raises if not contiguous, rather than copying
            tf.index_copy_(0, d, tf.index_select(0, s))


@torch.no_grad()
def generate_batch(model, requests: list[Request], batch_size: int = 8, max_new_tokens: int = 128,
                   mode: str = "strict", top_k: int = 2, min_prob: float = 0.1, eos_token_id="auto",
                   update_pool: bool = True, draft: DraftConfig | None = None) -> Iterator[Result]:
    """Decode all requests, `batch_size` rows at a time, refilling rows as they finish.

    Returns an iterator that yields each Result as its request finishes (finish order;
    `Result.index` is the request's position): nothing is kept after it is yielded, so a
    long queue runs in flat memory. Arguments are checked here, before the first result.
    Strict mode gives each request exactly its own greedy output.
    """
    cfg = draft or DraftConfig()
    for req in requests:
        _check_args(model, torch.as_tensor(np.asarray(req.input_ids)), max_new_tokens, mode, top_k, min_prob, cfg)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if eos_token_id == "auto":
        eos_token_id = model.generation_config.eos_token_id
    eos = np.asarray([] if eos_token_id is None else np.atleast_1d(eos_token_id), dtype=np.int64)
    return _stream(model, requests, min(batch_size, len(requests)), max_new_tokens, mode, top_k, min_prob, eos,
                   update_pool, cfg)


@torch.no_grad()
def _stream(model, requests, B, max_new_tokens, mode, top_k, min_prob, eos, update_pool, cfg) -> Iterator[Result]:
    if not requests:
        return
    with _forwards(model, False):  # CPU: grouped-query SDPA in place, linears routed per shape
        yield from _loop(model, requests, B, max_new_tokens, mode, top_k, min_prob, eos, update_pool, cfg)


def _loop(model, requests, B, max_new_tokens, mode, top_k, min_prob, eos, update_pool, cfg) -> Iterator[Result]:
    """The batch loop itself; generate_batch() validates and sets up (see the module docstring)."""
    device, kv = model.device, cache_kwarg(model)
    dtype = next(model.parameters()).dtype
    queue = list(range(len(requests)))[::-1]

    cache = new_cache(model)
    rows: list[dict | None] = [None] * B  # live row state: req index, seq, n, new, local pool, stats
    lens = np.zeros(B, dtype=np.int64)

    def start(free: list[int]) -> None:
        """Fill the free rows with the next queued prompts (one prefill forward for all of them)."""
        take = [(r, queue.pop()) for r in free[: len(queue)]]
        if not take:
            return
        t0 = time.perf_counter()
        prompts = [np.asarray(requests[i].input_ids, dtype=np.int32) for _, i in take]
        _prefill_rows(model, cache, kv, B, [r for r, _ in take], prompts)
        prefill = (time.perf_counter() - t0) / len(take)
        for (r, i), ids in zip(take, prompts):
            L = ids.size
            seq = np.zeros(L + max_new_tokens + 1, dtype=np.int32)
            seq[:L] = ids
            local, pools, weights, budget = _draft_sources(requests[i].pool, ids, cfg)
            rows[r] = dict(i=i, seq=seq, L=L, n=L, new=0, local=local, pools=pools, weights=weights, budget=budget,
                           stats=DecodeStats(time_prefill=prefill))
            lens[r] = L - 1

    start(list(range(B)))
    while any(row is not None for row in rows):
        t0 = time.perf_counter()
        trees = [None if row is None else  # 1. draft per row, from the row's own pools
                 draft_union(row["pools"], row["weights"], row["seq"][: row["n"]], budget=row["budget"],
                             max_depth=cfg.max_depth, min_match=cfg.min_match, max_match=cfg.max_match,
                             cost=cfg.cost, confidence=cfg.confidence) for row in rows]
        if cfg.cost is not None:
            trees = _common_budget(trees, cfg.cost, cfg.confidence)
        pending = np.array([row["seq"][row["n"] - 1] if row else 0 for row in rows])
        ids, pos, mask, _ = _verify_inputs(pending, trees, lens, dtype, device)
        W = int(lens.max())
        # the block is appended at column W for every row: crop each layer to W first
        for k, v, put in _layers(cache):
            put(k[:, :, :W], v[:, :, :W])
        t1 = time.perf_counter()
        logits = model(input_ids=ids, position_ids=pos, attention_mask=mask, **{kv: cache},
                       use_cache=True).logits  # 2. verify: [B, q, V], the model's dtype (acceptance reads it as is)
        t2 = time.perf_counter()
        moves, new_lens, done = [], lens.copy(), []  # (row, block column, destination column) per kept token
        judged = accept_trees(logits, trees, mode, top_k, min_prob, eos,  # 3. accept, all rows at once
                              [max_new_tokens - row["new"] if row else 0 for row in rows])
        for r, (row, t) in enumerate(zip(rows, trees)):
            if row is None:
                continue
            m = len(t)
            path, out, stop = judged[r]
            keep = np.concatenate([[0], path[: out.size - 1] + 1])  # pending + committed path, block offsets
            moves += [(r, W + j, lens[r] + i) for i, j in enumerate(keep)]
            new_lens[r] = lens[r] + keep.size
            seq, n = row["seq"], row["n"]
            seq[n : n + out.size] = out
            row["local"].extend(seq[:n], out)  # the request's own prompt/output pool
            if update_pool and requests[row["i"]].pool is not None:
                requests[row["i"]].pool.extend(seq[row["L"] : n], out)
            row["n"], row["new"] = n + out.size, row["new"] + out.size
            st = row["stats"]
            st.steps += 1
            st.accepted.append(out.size - 1)
            st.tree_sizes.append(m)
            if stop or row["new"] >= max_new_tokens:
                st.new_tokens = row["new"]
                done.append(Result(requests[row["i"]].tag, seq[row["L"] : row["n"]].copy(), st, row["i"]))
                rows[r] = None
        t3 = time.perf_counter()
        # 4. commit: move each row's kept block columns next to its past (gather), then refill
        if moves:
            _move_columns(cache, *np.array(moves, dtype=np.int64).T)
        lens[:] = new_lens
        free = [r for r in range(B) if rows[r] is None]
        lens[free] = 0
        if queue:
            start(free)
        elif free and len(free) < B:  # nothing left to start: drop finished rows from the batch
            keep = [r for r in range(B) if rows[r] is not None]
            at = torch.tensor(keep, device=device)
            for k, v, put in _layers(cache):
                put(k.index_select(0, at), v.index_select(0, at))
            rows, lens, B = [rows[r] for r in keep], lens[keep], len(keep)
        for row in rows:
            if row is not None:
                st = row["stats"]
                st.time_draft += t1 - t0
                st.time_verify += t2 - t1
                st.time_accept += t3 - t2
                st.time_cache += time.perf_counter() - t3
        yield from done  # rows finished this step, in row order
