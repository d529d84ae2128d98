"""Acceptance: which draft-tree nodes the target model agrees with, and the winning path.

Rows of the verification logits: row 0 is the pending token (the last committed token,
not yet in the cache), row i + 1 is tree node i. Node i is judged on the row of its parent
(`parent_row[i] = parents[i] + 1`, 0 for children of the context).

- strict:  accept iff token == argmax(parent row)           (output == greedy decoding)
- relaxed: accept iff token == argmax, or (rank < k and prob >= p), where rank is the
           number of logits strictly greater than the token's (ties favour the token);
           only rank < k matters, so ranks are reported capped at k.

Relaxed mode's per-row statistics come from the fused Triton kernel on CUDA, from
laser._C.row_stats_at on a CPU (float32 logits: one pass per row, OpenMP; 0.3 ms against the
reference's 4.3 for 30 rows of SmolLM2's 49,152 logits on the Intel VM), elsewhere from the
torch reference below; all return the same `RowStats`. Strict mode needs only each row's
argmax (row_argmax: the C++ pass on a CPU, 0.12 ms against torch's 1.6 there).
"""

from __future__ import annotations

import numpy as np
import torch

from laser import _C
from laser.kernels.common import RowStats, kernels_forced  # noqa: F401  (part of this module's API)


def row_stats_reference(logits: torch.Tensor, parent_row: torch.Tensor, tokens: torch.Tensor,
                        top_k: int | None = None) -> RowStats:
    """logits [R, V]; parent_row [n] int64 in [0, R); tokens [n] int64 -> RowStats (ranks capped at top_k)."""
    x = logits.float()
    argmax = x.argmax(dim=-1)
    rows = x.index_select(0, parent_row)  # [n, V]
    tok_logit = rows.gather(1, tokens[:, None])  # [n, 1]
    prob = torch.exp(tok_logit[:, 0] - torch.logsumexp(rows, dim=-1))
    rank = (rows > tok_logit).sum(dim=-1)
    return RowStats(argmax, prob, rank if top_k is None else rank.clamp_(max=top_k))


def _on_host(logits: torch.Tensor) -> bool:
    return logits.device.type == "cpu" and logits.dtype == torch.float32 and not kernels_forced()


def _host_row_stats(logits: torch.Tensor, parent_row: np.ndarray, tokens: np.ndarray, top_k: int) -> RowStats:
    x = logits.contiguous()  # [R, V]; x holds what row_stats_at reads
    argmax, prob, rank = _C.row_stats_at(x.data_ptr(), x.shape[0], x.shape[1], parent_row, tokens, top_k,
                                         torch.get_num_threads())
    return RowStats(torch.from_numpy(argmax), torch.from_numpy(prob), torch.from_numpy(rank))


def row_argmax(logits: torch.Tensor) -> torch.Tensor:
    """[R] int64: each row's first argmax of logits [R, V], as torch.argmax(dim=-1)."""
    if _on_host(logits) and logits.shape[0] > 0:
        none = np.zeros(0, np.int64)
        return _host_row_stats(logits, none, none, 0).argmax
    return logits.argmax(dim=-1)


def row_stats(logits: torch.Tensor, parent_row: torch.Tensor, tokens: torch.Tensor, top_k: int,
              widest: int | None = None) -> RowStats:
    """Ranks capped at top_k. widest: most nodes sharing one parent row, if known on the host
    (spares the kernel path a sync). The kernel takes top_k up to its MAX_K, the reference any."""
    if (logits.is_cuda or kernels_forced()) and parent_row.numel() > 0:
        from laser.kernels.accept import MAX_K, fused_row_stats

        if top_k <= MAX_K:
            return fused_row_stats(logits, parent_row, tokens, top_k, widest=widest)
    if _on_host(logits) and logits.shape[0] > 0:
        return _host_row_stats(logits, parent_row.numpy(), tokens.numpy(), top_k)
    return row_stats_reference(logits, parent_row, tokens, top_k)


def accept_flags(stats: RowStats, parent_row: torch.Tensor, tokens: torch.Tensor, mode: str, top_k: int, min_prob: float,
                 relax_ok: torch.Tensor | None = None):
    """[n] bool: node i agrees with its parent row under `mode`. relax_ok [n] bool (relaxed
    mode): the nodes that may be accepted without being the argmax (None: all)."""
    exact = tokens == stats.argmax.index_select(0, parent_row)
    if mode == "strict":
        return exact
    relaxed = (stats.rank < top_k) & (stats.prob >= min_prob)
    return exact | (relaxed if relax_ok is None else relaxed & relax_ok)


def longest_path(flags: np.ndarray, mask: np.ndarray, depth: np.ndarray) -> int:
    """Deepest node whose whole root path is accepted; -1 if none. First in DFS order on ties.

    flags [n] bool; mask [n, n] bool ancestor-or-self; depth [n] (>= 1). All numpy: the
    trees live on the host, and only the flags cross from the device (one copy per step).
    """
    if flags.size == 0:
        return -1
    ok = ~(mask & ~flags[None, :]).any(axis=1)  # every ancestor-or-self accepted
    score = np.where(ok, depth, 0)
    best = int(score.argmax())  # argmax returns the first maximum: DFS order breaks ties
    return best if ok[best] else -1


def chance(tree) -> np.ndarray:
    """[n] the pool's empirical chance that the text follows each node: count / matched count."""
    return np.minimum(1.0, tree.counts / tree.root_count) if len(tree) else np.zeros(0)


def accept_trees(logits: torch.Tensor, trees: list, mode: str, top_k: int, min_prob: float, eos: np.ndarray,
                 rooms: list[int], starts: list[int] | None = None, relax_ok: list | None = None) -> list:
    """Judge B verified trees at once and pick what each row commits.

    logits [B, q, V] (padded): row r's position 0 is its pending token, position i + 1 its
    node i (positions past len(trees[r]) + 1 are padding); or, with starts, the rows back to
    back (ragged): logits [1, N, V], row r's pending token at position starts[r], its node i
    at starts[r] + i + 1. trees[r] is None for an idle row.
    One pass over all positions (strict: argmax; relaxed: row_stats) and one device-to-host
    copy for the whole batch.
    relax_ok: per row None (idle) or [len(tree)] bool, the nodes relaxed mode may accept without
    being the argmax (None: every node).
    Returns per row None (idle) or (path: DFS indices root..best of the accepted nodes,
    out: tokens to commit = accepted path + bonus, cut at the first EOS and at rooms[r],
    stopped: EOS reached).
    """
    V = logits.shape[-1]
    if starts is None:
        starts = [r * logits.shape[1] for r in range(logits.shape[0])]
    live = [r for r, t in enumerate(trees) if t is not None]
    parent_row = np.concatenate([starts[r] + trees[r].parents.astype(np.int64) + 1 for r in live]
                                or [np.zeros(0, np.int64)])
    tokens = np.concatenate([trees[r].tokens.astype(np.int64) for r in live] or [np.zeros(0, np.int64)])
    both = torch.from_numpy(np.stack([parent_row, tokens])).to(logits.device)  # [2, N]
    flat = logits.reshape(-1, V)
    R = flat.shape[0]
    if mode == "strict":  # strict reads each row's argmax only: no probabilities, no ranks
        rs = RowStats(row_argmax(flat), None, None)
    else:
        widest = int(np.bincount(parent_row).max()) if parent_row.size else 0  # sizes the kernel, no sync
        rs = row_stats(flat, both[0], both[1], top_k, widest)
    ok = None
    if relax_ok is not None and mode != "strict":
        ok = torch.from_numpy(np.concatenate([relax_ok[r] for r in live] or [np.zeros(0, bool)])).to(logits.device)
    flags = accept_flags(rs, both[0], both[1], mode, top_k, min_prob, ok)  # [N]
    host = torch.cat([rs.argmax, flags.long()]).cpu().numpy()  # the step's one sync
    argmax, flags = host[:R], host[R:].astype(bool)
    out_rows, at = [None] * len(trees), 0
    for r in live:
        t = trees[r]
        f, at = flags[at : at + len(t)], at + len(t)
        best = longest_path(f, t.mask, t.depth)
        path = np.flatnonzero(t.mask[best]) if best >= 0 else np.empty(0, np.int64)
        out = np.append(t.tokens[path], argmax[starts[r] + best + 1])[: rooms[r]]
        stop = np.flatnonzero(np.isin(out, eos))
        if stop.size:
            out = out[: stop[0] + 1]
        out_rows[r] = (path, out, bool(stop.size))
    return out_rows
