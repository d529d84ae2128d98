"""Fused relaxed-acceptance statistics: one pass over the verification logits.

For every logits row r (R rows, vocabulary V): argmax, the online-softmax normaliser and
the K = top_k largest logits (with multiplicity). For every draft node i, judged on its
parent row r = parent_row[i]: the softmax probability of its token and its rank, capped at
K: min(number of logits strictly above the token's, K) = how many of the row's K largest
exceed the token's logit. That is all relaxed acceptance needs (rank < top_k), and it
costs 2K - 1 max/min per logit, whatever the number of nodes; counting exact ranks cost
one compare-add per logit and node slot. No softmax tensor and no topk call.

Kernel: _row_stats (grid R x S, each program one V-chunk, kept per lane and reduced once at
the end; the last program of a row to finish, by an atomic ticket, merges the row's
partials and judges its nodes in _combine: one launch in all).
Launcher: fused_row_stats. Reference: laser.accept.row_stats_reference.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from laser.kernels.common import RowStats

NEG = tl.constexpr(-3.0e38)  # finite "minus infinity": keeps exp(m_old - m_new) free of inf - inf
MAX_K = 4  # top_k the kernel handles (four running values per lane); larger k: the torch reference


@triton.jit
def _insert(x, t1, t2, t3, t4, K: tl.constexpr):
    """Insert x into each lane's descending K largest (t1 >= t2 >= ...): 2K - 1 max/min."""
    y = tl.minimum(t1, x)
    t1 = tl.maximum(t1, x)
    if K >= 2:
        z = tl.minimum(t2, y)
        t2 = tl.maximum(t2, y)
        y = z
    if K >= 3:
        z = tl.minimum(t3, y)
        t3 = tl.maximum(t3, y)
        y = z
    if K >= 4:
        t4 = tl.maximum(t4, y)
    return t1, t2, t3, t4


@triton.jit
def _row_stats(
    logits_ptr,  # [R, V] fp32/fp16/bf16, row stride stride_r
    stride_r,
    V,
    row_start_ptr,  # [R + 1] int32, CSR offsets into node_tok
    node_tok_ptr,  # [n] int64, tokens of the nodes grouped by parent row
    wsf_ptr,  # fp32 workspace: pm [R, S] chunk max, pl [R, S] chunk sum of exp(x - chunk max), pt [R, S, K] chunk K largest
    wsi_ptr,  # int32 workspace: pa [R, S] chunk argmax (first index)
    ticket_ptr,  # [R] int32, zero between calls: programs of a row that have finished
    node_id_ptr, argmax_ptr, prob_ptr, rank_ptr,  # see _combine
    R,
    S,
    CHUNK,
    S_PAD: tl.constexpr,
    C_PAD: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    s = tl.program_id(1)
    pm_ptr, pl_ptr, pt_ptr = wsf_ptr, wsf_ptr + R * S, wsf_ptr + 2 * R * S
    pa_ptr = wsi_ptr
    row = logits_ptr + r.to(tl.int64) * stride_r

    # Per-lane running state over this program's chunk: lane j sees columns start + j,
    # start + j + BLOCK, ... The loop body is elementwise (no cross-thread reduction); the
    # lanes are reduced once after it.
    lanes = tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), NEG, tl.float32)  # lane max
    a = tl.zeros((BLOCK,), tl.int32)  # lane argmax (first index: columns grow along a lane)
    l = tl.zeros((BLOCK,), tl.float32)  # lane sum of exp(x - m)
    t1 = tl.full((BLOCK,), float("-inf"), tl.float32)  # lane's K largest, descending (t2..t4 unused below K)
    t2 = tl.full((BLOCK,), float("-inf"), tl.float32)
    t3 = tl.full((BLOCK,), float("-inf"), tl.float32)
    t4 = tl.full((BLOCK,), float("-inf"), tl.float32)
    start = s * CHUNK
    end = tl.minimum(start + CHUNK, V)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + lanes
        x = tl.load(row + idx, mask=idx < end, other=float("-inf")).to(tl.float32)  # interpreter: fp32 at once
        # one exp per logit: e = exp(-|x - m|) rescales l when x is a new max, else is x's term
        gt = x > m
        e = tl.exp(-tl.abs(x - m))
        l = tl.where(gt, l * e + 1.0, l + e)
        a = tl.where(gt, idx, a)
        m = tl.where(gt, x, m)
        t1, t2, t3, t4 = _insert(x, t1, t2, t3, t4, K)
    mx = tl.max(m, axis=0)
    a = tl.min(tl.where(m == mx, a, 2147483647), axis=0)  # earliest column holding the max
    l = tl.sum(l * tl.exp(m - mx), axis=0)
    o = r * S + s
    tl.store(pm_ptr + o, mx)
    tl.store(pa_ptr + o, a)
    tl.store(pl_ptr + o, l)
    # the chunk's K largest: the largest lane head, K times, popping one occurrence each time
    for j in tl.static_range(K):
        v = tl.max(t1, axis=0)
        hit = lanes == tl.min(tl.where(t1 == v, lanes, BLOCK), axis=0)
        t1, t2, t3, t4 = tl.where(hit, t2, t1), tl.where(hit, t3, t2), tl.where(hit, t4, t3), tl.where(hit, float("-inf"), t4)
        tl.store(pt_ptr + o * K + j, v)
    # the row's last program to finish merges its S partials (one launch for everything)
    done = tl.atomic_add(ticket_ptr + r, 1, sem="acq_rel")
    if done == S - 1:
        _combine(r, row, row_start_ptr, node_tok_ptr, node_id_ptr, pm_ptr, pa_ptr, pl_ptr, pt_ptr,
                 argmax_ptr, prob_ptr, rank_ptr, S, S_PAD, C_PAD, K, K_PAD)
        tl.store(ticket_ptr + r, 0)  # ready for the next call


@triton.jit
def _combine(
    r,
    row,  # pointer to logits row r
    row_start_ptr,  # [R + 1] int32
    node_tok_ptr,  # [n] int64 (CSR order)
    node_id_ptr,  # [n] int64 original node index of each CSR entry
    pm_ptr, pa_ptr, pl_ptr, pt_ptr,  # partials, see _row_stats
    argmax_ptr,  # [R] int64 out
    prob_ptr,  # [n] fp32 out
    rank_ptr,  # [n] int64 out: min(rank, K)
    S,
    S_PAD: tl.constexpr,
    C_PAD: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
):
    sj = tl.arange(0, S_PAD)
    smask = sj < S
    # .cg: read the other programs' partials from L2, not a stale L1 line
    pm = tl.load(pm_ptr + r * S + sj, mask=smask, other=NEG, cache_modifier=".cg")
    pa = tl.load(pa_ptr + r * S + sj, mask=smask, other=2147483647, cache_modifier=".cg")
    pl = tl.load(pl_ptr + r * S + sj, mask=smask, other=0.0, cache_modifier=".cg")
    M = tl.max(pm, axis=0)
    A = tl.min(tl.where(pm == M, pa, 2147483647), axis=0)
    Z = tl.sum(pl * tl.exp(pm - M), axis=0)
    tl.store(argmax_ptr + r, A.to(tl.int64))

    lo = tl.load(row_start_ptr + r)
    hi = tl.load(row_start_ptr + r + 1)
    cj = tl.arange(0, C_PAD)
    cmask = cj < hi - lo
    toks = tl.load(node_tok_ptr + lo + cj, mask=cmask, other=0)
    tval = tl.load(row + toks, mask=cmask, other=0.0).to(tl.float32)
    ids = tl.load(node_id_ptr + lo + cj, mask=cmask, other=0)
    # the row's K largest from the S chunks' K largest: rank = how many of them exceed the node's
    kj = tl.arange(0, K_PAD)
    flat = sj[:, None] * K_PAD + kj[None, :]  # [S_PAD, K_PAD]
    top = tl.load(pt_ptr + (r * S + sj[:, None]) * K + kj[None, :], mask=smask[:, None] & (kj[None, :] < K),
                  other=float("-inf"), cache_modifier=".cg")
    rank = tl.zeros((C_PAD,), tl.int32)
    for j in tl.static_range(K):
        v = tl.max(tl.max(top, axis=1), axis=0)
        top = tl.where(flat == tl.min(tl.min(tl.where(top == v, flat, S_PAD * K_PAD), axis=1), axis=0),
                       float("-inf"), top)
        rank += (v > tval).to(tl.int32)
    tl.store(prob_ptr + ids, tl.exp(tval - M) / Z, mask=cmask)
    tl.store(rank_ptr + ids, rank.to(tl.int64), mask=cmask)


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def group_by_row(parent_row: torch.Tensor, tokens: torch.Tensor, n_rows: int, widest: int | None = None):
    """CSR of nodes by parent row: (row_start [R+1] int32, tokens [n], node ids [n], widest row).

    widest (most nodes in one row) sizes the kernel; pass it when known on the host, which
    saves a device-to-host sync.
    """
    order = torch.argsort(parent_row, stable=True)
    counts = torch.bincount(parent_row, minlength=n_rows)
    row_start = torch.zeros(n_rows + 1, dtype=torch.int32, device=parent_row.device)
    row_start[1:] = torch.cumsum(counts, 0)
    if widest is None:
        widest = int(counts.max()) if counts.numel() else 0
    return row_start, tokens.index_select(0, order).contiguous(), order, widest


_WORKSPACE: dict = {}


def _workspace(device, R: int, S: int, K: int):
    """Grow-only per-device buffers (fp32 partials, int32 partials, zeroed tickets): no allocation per call.

    One stream at a time: two concurrent launches on one device would share them.
    """
    f, i, t = _WORKSPACE.get(device, (None, None, None))
    if f is None or f.numel() < R * S * (2 + K):
        f = torch.empty(max(R * S * (2 + K), 1 << 16), dtype=torch.float32, device=device)
    if i is None or i.numel() < R * S:
        i = torch.empty(max(R * S, 1 << 14), dtype=torch.int32, device=device)
    if t is None or t.numel() < R:
        t = torch.zeros(max(R, 1024), dtype=torch.int32, device=device)
    _WORKSPACE[device] = (f, i, t)
    return f, i, t


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the interpreter on the CPU: 4, keeps tests small)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


@functools.lru_cache(maxsize=4096)
def _config(device: torch.device, R: int, V: int, splits: int | None):
    """(BLOCK, S, CHUNK) for R rows of V logits: S splits each row so that about 8 programs
    per SM run, each over >= 2 blocks of BLOCK lanes."""
    BLOCK = 1024
    if splits is None:
        splits = min(triton.cdiv(8 * _sm_count(device), R), triton.cdiv(V, 2 * BLOCK))
    CHUNK = triton.cdiv(triton.cdiv(V, max(1, splits)), BLOCK) * BLOCK
    return BLOCK, triton.cdiv(V, CHUNK), CHUNK


def launch(logits, row_start, node_tok, node_id, widest: int, top_k: int, splits: int | None = None) -> RowStats:
    """Run the kernel on a prepared CSR (see group_by_row): one launch, three output buffers."""
    R, V = logits.shape
    n = node_tok.numel()
    dev = logits.device
    BLOCK, S, CHUNK = _config(dev, R, V, splits)
    wsf, wsi, tickets = _workspace(dev, R, S, top_k)
    argmax = torch.empty(R, dtype=torch.int64, device=dev)
    prob = torch.empty(n, dtype=torch.float32, device=dev)
    rank = torch.empty(n, dtype=torch.int64, device=dev)
    _row_stats[(R, S)](logits, logits.stride(0), V, row_start, node_tok, wsf, wsi, tickets, node_id,
                       argmax, prob, rank, R, S, CHUNK, S_PAD=_pow2(S), C_PAD=_pow2(max(widest, 1)), K=top_k,
                       K_PAD=_pow2(top_k), BLOCK=BLOCK)
    return RowStats(argmax, prob, rank)


def fused_row_stats(logits: torch.Tensor, parent_row: torch.Tensor, tokens: torch.Tensor, top_k: int,
                    splits: int | None = None, widest: int | None = None) -> RowStats:
    """logits [R, V]; parent_row [n] int64 in [0, R); tokens [n] int64 in [0, V); ranks capped at
    top_k in [1, MAX_K]; widest: see group_by_row."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be a 2-D [R, V] tensor, contiguous along V")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"logits dtype {logits.dtype} is not supported (fp32, fp16, bf16)")
    if parent_row.shape != tokens.shape or parent_row.dim() != 1:
        raise ValueError("parent_row and tokens must be 1-D tensors of the same length")
    if parent_row.dtype != torch.int64 or tokens.dtype != torch.int64:
        raise TypeError("parent_row and tokens must be int64")
    if not (isinstance(top_k, int) and 1 <= top_k <= MAX_K):
        raise ValueError(f"top_k must be an integer in [1, {MAX_K}] for the kernel, got {top_k!r}")
    if logits.shape[1] >= 2**31:
        raise ValueError("vocabulary too large for int32 indices")
    row_start, node_tok, node_id, widest = group_by_row(parent_row, tokens, logits.shape[0], widest)
    return launch(logits, row_start, node_tok, node_id, widest, top_k, splits)
