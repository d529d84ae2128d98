"""Fused relaxed-acceptance statistics: one pass over the verification logits.

For every logits row r (R rows, vocabulary V): argmax, and the online-softmax normaliser.
For every draft node i, judged on its parent row r = parent_row[i]: the softmax
probability of its token and its rank (number of logits strictly above the token's).
No softmax tensor and no topk: node tokens are grouped by row (CSR), and each row's
programs compare the row once against all of that row's node logits.

Kernels: _row_partials (grid R x S, each program one V-chunk) and _row_combine (grid R).
Launcher: fused_row_stats. Reference: laser.accept.row_stats_reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from laser.accept import RowStats

NEG = tl.constexpr(-3.0e38)  # finite "minus infinity": keeps exp(m_old - m_new) free of inf - inf


@triton.jit
def _row_partials(
    logits_ptr,  # [R, V] fp32/fp16/bf16, row stride stride_r
    stride_r,
    V,
    row_start_ptr,  # [R + 1] int32, CSR offsets into node_tok
    node_tok_ptr,  # [n] int64, tokens of the nodes grouped by parent row
    pm_ptr,  # [R, S] fp32 chunk max
    pa_ptr,  # [R, S] int32 chunk argmax (first index of the max)
    pl_ptr,  # [R, S] fp32 chunk sum of exp(x - chunk max)
    pc_ptr,  # [R, S, C_PAD] int32 chunk count of logits > node logit
    S,
    CHUNK,
    C_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    s = tl.program_id(1)
    row = logits_ptr + r.to(tl.int64) * stride_r
    lo = tl.load(row_start_ptr + r)
    hi = tl.load(row_start_ptr + r + 1)
    cj = tl.arange(0, C_PAD)
    cmask = cj < hi - lo
    toks = tl.load(node_tok_ptr + lo + cj, mask=cmask, other=0)
    # padding nodes get +inf so that nothing counts as greater
    tval = tl.load(row + toks, mask=cmask, other=float("inf")).to(tl.float32)

    m = tl.full((), NEG, tl.float32)
    l = tl.full((), 0.0, tl.float32)
    a = tl.full((), 0, tl.int32)
    cnt = tl.zeros((C_PAD,), tl.int32)
    start = s * CHUNK
    end = tl.minimum(start + CHUNK, V)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        valid = idx < end
        x = tl.load(row + idx, mask=valid, other=float("-inf")).to(tl.float32)  # interpreter: fp32 at once
        bm = tl.max(x, axis=0)
        bi = tl.min(tl.where(x == bm, idx, 2147483647), axis=0)
        a = tl.where(bm > m, bi, a)  # strict: the earliest maximum wins
        m_new = tl.maximum(m, bm)
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        cnt += tl.sum((x[None, :] > tval[:, None]).to(tl.int32), axis=1)
    o = r * S + s
    tl.store(pm_ptr + o, m)
    tl.store(pa_ptr + o, a)
    tl.store(pl_ptr + o, l)
    tl.store(pc_ptr + o * C_PAD + cj, cnt)


@triton.jit
def _row_combine(
    logits_ptr,  # [R, V]
    stride_r,
    row_start_ptr,  # [R + 1] int32
    node_tok_ptr,  # [n] int64 (CSR order)
    node_id_ptr,  # [n] int64 original node index of each CSR entry
    pm_ptr, pa_ptr, pl_ptr, pc_ptr,  # partials, see _row_partials
    argmax_ptr,  # [R] int64 out
    prob_ptr,  # [n] fp32 out
    rank_ptr,  # [n] int64 out
    S,
    S_PAD: tl.constexpr,
    C_PAD: tl.constexpr,
):
    r = tl.program_id(0)
    sj = tl.arange(0, S_PAD)
    smask = sj < S
    pm = tl.load(pm_ptr + r * S + sj, mask=smask, other=NEG)
    pa = tl.load(pa_ptr + r * S + sj, mask=smask, other=2147483647)
    pl = tl.load(pl_ptr + r * S + sj, mask=smask, other=0.0)
    M = tl.max(pm, axis=0)
    A = tl.min(tl.where(pm == M, pa, 2147483647), axis=0)
    Z = tl.sum(pl * tl.exp(pm - M), axis=0)
    tl.store(argmax_ptr + r, A.to(tl.int64))

    lo = tl.load(row_start_ptr + r)
    hi = tl.load(row_start_ptr + r + 1)
    cj = tl.arange(0, C_PAD)
    cmask = cj < hi - lo
    counts = tl.load(pc_ptr + (r * S + sj[:, None]) * C_PAD + cj[None, :], mask=smask[:, None] & cmask[None, :], other=0)
    rank = tl.sum(counts, axis=0)
    toks = tl.load(node_tok_ptr + lo + cj, mask=cmask, other=0)
    tval = tl.load(logits_ptr + r.to(tl.int64) * stride_r + toks, mask=cmask, other=0.0).to(tl.float32)
    ids = tl.load(node_id_ptr + lo + cj, mask=cmask, other=0)
    tl.store(prob_ptr + ids, tl.exp(tval - M) / Z, mask=cmask)
    tl.store(rank_ptr + ids, rank.to(tl.int64), mask=cmask)


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def group_by_row(parent_row: torch.Tensor, tokens: torch.Tensor, n_rows: int):
    """CSR of nodes by parent row: (row_start [R+1] int32, tokens [n], node ids [n], widest row)."""
    order = torch.argsort(parent_row, stable=True)
    counts = torch.bincount(parent_row, minlength=n_rows)
    row_start = torch.zeros(n_rows + 1, dtype=torch.int32, device=parent_row.device)
    row_start[1:] = torch.cumsum(counts, 0)
    return row_start, tokens.index_select(0, order).contiguous(), order, int(counts.max()) if counts.numel() else 0


_WORKSPACE: dict = {}


def _workspace(device, nbytes: int) -> torch.Tensor:
    """A grow-only byte buffer per device for the split partials: no allocation per call."""
    buf = _WORKSPACE.get(device)
    if buf is None or buf.numel() < nbytes:
        buf = _WORKSPACE[device] = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, device=device)
    return buf


def launch(logits, row_start, node_tok, node_id, widest: int, splits: int | None = None) -> RowStats:
    """Run both kernels on a prepared CSR (see group_by_row)."""
    R, V = logits.shape
    n = node_tok.numel()
    dev = logits.device
    C_PAD = _pow2(max(widest, 1))
    BLOCK = max(64, min(2048, 8192 // C_PAD))
    if splits is None:  # enough programs to fill the GPU, chunks of at least a few blocks
        splits = max(1, min(triton.cdiv(V, 4 * BLOCK), triton.cdiv(4 * 132, R)))
    S = splits
    CHUNK = triton.cdiv(triton.cdiv(V, S), BLOCK) * BLOCK
    S = triton.cdiv(V, CHUNK)
    ws = _workspace(dev, 4 * R * S * (3 + C_PAD))  # four [R, S(, C_PAD)] 4-byte partials, back to back
    pm = ws[: 4 * R * S].view(torch.float32).view(R, S)
    pa = ws[4 * R * S : 8 * R * S].view(torch.int32).view(R, S)
    pl = ws[8 * R * S : 12 * R * S].view(torch.float32).view(R, S)
    pc = ws[12 * R * S : 4 * R * S * (3 + C_PAD)].view(torch.int32).view(R, S, C_PAD)
    _row_partials[(R, S)](logits, logits.stride(0), V, row_start, node_tok, pm, pa, pl, pc, S, CHUNK,
                          C_PAD=C_PAD, BLOCK=BLOCK)
    argmax = torch.empty(R, dtype=torch.int64, device=dev)
    prob = torch.empty(n, dtype=torch.float32, device=dev)
    rank = torch.empty(n, dtype=torch.int64, device=dev)
    _row_combine[(R,)](logits, logits.stride(0), row_start, node_tok, node_id, pm, pa, pl, pc, argmax, prob, rank,
                       S, S_PAD=_pow2(S), C_PAD=C_PAD)
    return RowStats(argmax, prob, rank)


def fused_row_stats(logits: torch.Tensor, parent_row: torch.Tensor, tokens: torch.Tensor, splits: int | None = None) -> RowStats:
    """logits [R, V]; parent_row [n] int64 in [0, R); tokens [n] int64 in [0, V)."""
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
    row_start, node_tok, node_id, widest = group_by_row(parent_row, tokens, logits.shape[0])
    return launch(logits, row_start, node_tok, node_id, widest, splits)
