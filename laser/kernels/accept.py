"""Fused relaxed-acceptance statistics: one pass over the verification logits.

For every logits row r (R rows, vocabulary V): argmax, and the online-softmax normaliser.
For every draft node i, judged on its parent row r = parent_row[i]: the softmax
probability of its token and its rank (number of logits strictly above the token's).
No softmax tensor and no topk: node tokens are grouped by row (CSR), and each row's
programs compare the row once against all of that row's node logits.

Kernel: _row_stats (grid R x S, each program one V-chunk, kept per lane and reduced once at
the end; the last program of a row to finish, by an atomic ticket, merges the row's
partials in _combine: one launch in all).
Launcher: fused_row_stats. Reference: laser.accept.row_stats_reference.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from laser.accept import RowStats

NEG = tl.constexpr(-3.0e38)  # finite "minus infinity": keeps exp(m_old - m_new) free of inf - inf


@triton.jit
def _row_stats(
    logits_ptr,  # [R, V] fp32/fp16/bf16, row stride stride_r
    stride_r,
    V,
    row_start_ptr,  # [R + 1] int32, CSR offsets into node_tok
    node_tok_ptr,  # [n] int64, tokens of the nodes grouped by parent row
    wsf_ptr,  # fp32 workspace: pm [R, S] chunk max, then pl [R, S] chunk sum of exp(x - chunk max)
    wsi_ptr,  # int32 workspace: pa [R, S] chunk argmax (first index), then pc [R, S, C_PAD] count > node logit
    ticket_ptr,  # [R] int32, zero between calls: programs of a row that have finished
    node_id_ptr, argmax_ptr, prob_ptr, rank_ptr,  # see _combine
    R,
    S,
    CHUNK,
    S_PAD: tl.constexpr,
    C_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    s = tl.program_id(1)
    pm_ptr, pl_ptr = wsf_ptr, wsf_ptr + R * S
    pa_ptr, pc_ptr = wsi_ptr, wsi_ptr + R * S
    row = logits_ptr + r.to(tl.int64) * stride_r
    lo = tl.load(row_start_ptr + r)
    hi = tl.load(row_start_ptr + r + 1)
    cj = tl.arange(0, C_PAD)
    cmask = cj < hi - lo
    toks = tl.load(node_tok_ptr + lo + cj, mask=cmask, other=0)
    # padding nodes get +inf so that nothing counts as greater
    tval = tl.load(row + toks, mask=cmask, other=float("inf")).to(tl.float32)

    # Per-lane running state over this program's chunk: lane j sees columns start + j,
    # start + j + BLOCK, ... The loop body is elementwise (no cross-thread reduction); the
    # lanes are reduced once after it.
    lanes = tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), NEG, tl.float32)  # lane max
    a = tl.zeros((BLOCK,), tl.int32)  # lane argmax (first index: columns grow along a lane)
    l = tl.zeros((BLOCK,), tl.float32)  # lane sum of exp(x - m)
    cnt = tl.zeros((C_PAD, BLOCK), tl.int32)  # cnt[c, j]: lane j's logits above node c's
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
        cnt += (x[None, :] > tval[:, None]).to(tl.int32)
    mx = tl.max(m, axis=0)
    a = tl.min(tl.where(m == mx, a, 2147483647), axis=0)  # earliest column holding the max
    l = tl.sum(l * tl.exp(m - mx), axis=0)
    m = mx
    cnt = tl.sum(cnt, axis=1)
    o = r * S + s
    tl.store(pm_ptr + o, m)
    tl.store(pa_ptr + o, a)
    tl.store(pl_ptr + o, l)
    tl.store(pc_ptr + o * C_PAD + cj, cnt)
    # the row's last program to finish merges its S partials (one launch for everything)
    done = tl.atomic_add(ticket_ptr + r, 1, sem="acq_rel")
    if done == S - 1:
        _combine(r, row, row_start_ptr, node_tok_ptr, node_id_ptr, pm_ptr, pa_ptr, pl_ptr, pc_ptr,
                 argmax_ptr, prob_ptr, rank_ptr, S, S_PAD, C_PAD)
        tl.store(ticket_ptr + r, 0)  # ready for the next call


@triton.jit
def _combine(
    r,
    row,  # pointer to logits row r
    row_start_ptr,  # [R + 1] int32
    node_tok_ptr,  # [n] int64 (CSR order)
    node_id_ptr,  # [n] int64 original node index of each CSR entry
    pm_ptr, pa_ptr, pl_ptr, pc_ptr,  # partials, see _row_stats
    argmax_ptr,  # [R] int64 out
    prob_ptr,  # [n] fp32 out
    rank_ptr,  # [n] int64 out
    S,
    S_PAD: tl.constexpr,
    C_PAD: tl.constexpr,
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
    counts = tl.load(pc_ptr + (r * S + sj[:, None]) * C_PAD + cj[None, :], mask=smask[:, None] & cmask[None, :],
                     other=0, cache_modifier=".cg")
    rank = tl.sum(counts, axis=0)
    toks = tl.load(node_tok_ptr + lo + cj, mask=cmask, other=0)
    tval = tl.load(row + toks, mask=cmask, other=0.0).to(tl.float32)
    ids = tl.load(node_id_ptr + lo + cj, mask=cmask, other=0)
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


def _workspace(device, R: int, S: int, C_PAD: int):
    """Grow-only per-device buffers (fp32 partials, int32 partials, zeroed tickets): no allocation per call.

    One stream at a time: two concurrent launches on one device would share them.
    """
    f, i, t = _WORKSPACE.get(device, (None, None, None))
    if f is None or f.numel() < 2 * R * S:
        f = torch.empty(max(2 * R * S, 1 << 16), dtype=torch.float32, device=device)
    if i is None or i.numel() < R * S * (1 + C_PAD):
        i = torch.empty(max(R * S * (1 + C_PAD), 1 << 18), dtype=torch.int32, device=device)
    if t is None or t.numel() < R:
        t = torch.zeros(max(R, 1024), dtype=torch.int32, device=device)
    _WORKSPACE[device] = (f, i, t)
    return f, i, t


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the interpreter on the CPU: 4, keeps tests small)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


@functools.lru_cache(maxsize=4096)
def _config(device: torch.device, R: int, V: int, widest: int, splits: int | None):
    """(C_PAD, BLOCK, S, CHUNK) for R rows of V logits whose widest row holds `widest` nodes.

    BLOCK keeps the per-lane count tile [C_PAD, BLOCK] at <= 4096 entries (registers);
    S splits each row so that about 8 programs per SM run, each over >= 2 blocks.
    """
    C_PAD = _pow2(max(widest, 1))
    BLOCK = max(128, min(1024, 4096 // C_PAD))
    if splits is None:
        splits = min(triton.cdiv(8 * _sm_count(device), R), triton.cdiv(V, 2 * BLOCK))
    CHUNK = triton.cdiv(triton.cdiv(V, max(1, splits)), BLOCK) * BLOCK
    return C_PAD, BLOCK, triton.cdiv(V, CHUNK), CHUNK


def launch(logits, row_start, node_tok, node_id, widest: int, splits: int | None = None) -> RowStats:
    """Run the kernel on a prepared CSR (see group_by_row): one launch, three output buffers."""
    R, V = logits.shape
    n = node_tok.numel()
    dev = logits.device
    C_PAD, BLOCK, S, CHUNK = _config(dev, R, V, widest, splits)
    wsf, wsi, tickets = _workspace(dev, R, S, C_PAD)
    argmax = torch.empty(R, dtype=torch.int64, device=dev)
    prob = torch.empty(n, dtype=torch.float32, device=dev)
    rank = torch.empty(n, dtype=torch.int64, device=dev)
    _row_stats[(R, S)](logits, logits.stride(0), V, row_start, node_tok, wsf, wsi, tickets, node_id,
                       argmax, prob, rank, R, S, CHUNK, S_PAD=_pow2(S), C_PAD=C_PAD, BLOCK=BLOCK)
    return RowStats(argmax, prob, rank)


def fused_row_stats(logits: torch.Tensor, parent_row: torch.Tensor, tokens: torch.Tensor, splits: int | None = None,
                    widest: int | None = None) -> RowStats:
    """logits [R, V]; parent_row [n] int64 in [0, R); tokens [n] int64 in [0, V); widest: see group_by_row."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be a 2-D [R, V] tensor, contiguous along V")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"logits dtype {logits.dtype} is not supported (fp32, fp16, bf16)")
    if parent_row.shape != tokens.shape or parent_row.dim() != 1:
        raise ValueError("parent_row and tokens must be 1-D tensors of the same length")
    if parent_row.dtype != torch.int64 or tokens.dtype != torch.int64:
        raise TypeError("parent_row and tokens must be int64")
    if logits.shape[1] >= 2**31:
        raise ValueError("vocabulary too large for int32 indices")
    row_start, node_tok, node_id, widest = group_by_row(parent_row, tokens, logits.shape[0], widest)
    return launch(logits, row_start, node_tok, node_id, widest, splits)
