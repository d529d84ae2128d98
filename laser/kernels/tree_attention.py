"""Tree-masked attention for the verification pass.

The last n key/value positions are the draft tree (query i = tree position i); of the
`past` positions before them, row b sees the first lens[b] (its own past; the rest of a
row shorter than the batch's widest is garbage). Inside the tree, query i of row b sees
key j iff j is an ancestor-or-self of i, given as a bitmask: bits[b, i, j // 64] >> (j % 64) & 1.
Grouped-query attention: query head h reads kv head h // (Hq / Hkv).

Kernels: _tree_attn (flash-style online softmax, grid = query blocks x batch*heads x splits of
the past) and _tree_attn_combine (merges the splits' partial softmax states).
Launcher: tree_attention. Reference: tree_attention_reference (dense mask + SDPA math).
The model wiring (transformers' attention interface) lives in laser.engine: this package
imports only torch and Triton.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from laser.kernels.bits import mask_to_bits  # noqa: F401  (re-exported)

NEG = tl.constexpr(-3.0e38)


@triton.jit
def _tree_attn(
    q_ptr, k_ptr, v_ptr, bits_ptr, o_ptr,  # q/o [B, Hq, n, D]; k/v [B, Hkv, past + n, D]; bits [B, n, W] int64
    lens_ptr,  # [B] int32: visible past per row (<= past)
    ws_ptr,  # fp32 workspace for the split partials: m, l [B*Hq*SPLITS*n_pad] then acc [.., D]
    sq_b, sq_h, sq_n,
    sk_b, sk_h, sk_t,
    sv_b, sv_h, sv_t,
    so_b, so_h, so_n, sbits_b,
    Hq, n, n_pad, past, chunk, group, scale,
    W: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """Program (m-block, b*h, split): split s covers past keys [s*chunk, (s+1)*chunk); the last split also the tree."""
    P = tl.num_programs(1) * SPLITS * n_pad  # rows of partials: B*Hq*SPLITS*n_pad
    pm_ptr, pl_ptr, pacc_ptr = ws_ptr, ws_ptr + P, ws_ptr + 2 * P
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mrow = offs_m < n
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :], mask=mrow[:, None], other=0.0)
    if UPCAST:  # interpreter (bf16) and fp32 inputs: fp32 right after the load
        q = q.to(tl.float32)
    kbase = k_ptr + b * sk_b + hk * sk_h
    vbase = v_ptr + b * sv_b + hk * sv_h

    m_i = tl.full((BLOCK_M,), NEG, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    # 1. this split's share of the cached past: every key visible
    lo = split * chunk
    hi = tl.minimum(lo + chunk, tl.load(lens_ptr + b))
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kmask = offs_n < hi
        m_i, l_i, acc = _attend(q, kbase, vbase, offs_n, kmask, kmask[None, :], m_i, l_i, acc, offs_d,
                                sk_t, sv_t, scale, UPCAST, PREC)
    # 2. the tree (last split only): key j visible to query i iff bit j of row i is set
    if split == SPLITS - 1:
        for start in range(0, n, BLOCK_N):
            offs_j = start + tl.arange(0, BLOCK_N)
            jmask = offs_j < n
            words = tl.load(bits_ptr + b * sbits_b + offs_m[:, None] * W + offs_j[None, :] // 64,
                            mask=mrow[:, None] & jmask[None, :], other=0)
            seen = ((words >> (offs_j[None, :] % 64).to(tl.int64)) & 1) != 0
            m_i, l_i, acc = _attend(q, kbase, vbase, past + offs_j, jmask, seen, m_i, l_i, acc, offs_d,
                                    sk_t, sv_t, scale, UPCAST, PREC)
    if SPLITS == 1:
        # rows past n saw no key (l = 0 when past == 0): divide by 1, not 0/0; their store is masked
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=mrow[:, None])
    else:
        row = (bh * SPLITS + split) * n_pad + offs_m
        tl.store(pm_ptr + row, m_i, mask=mrow)
        tl.store(pl_ptr + row, l_i, mask=mrow)
        tl.store(pacc_ptr + row[:, None] * D + offs_d[None, :], acc, mask=mrow[:, None])


@triton.jit
def _attend(q, kbase, vbase, rows, rmask, visible, m_i, l_i, acc, offs_d, sk_t, sv_t, scale,
            UPCAST: tl.constexpr, PREC: tl.constexpr):
    """One online-softmax step: queries q [BLOCK_M, D] over key/value rows `rows` [BLOCK_N]
    (rmask: in range), where `visible` [BLOCK_M, BLOCK_N] (or broadcastable) allows."""
    k = tl.load(kbase + rows[:, None] * sk_t + offs_d[None, :], mask=rmask[:, None], other=0.0)
    v = tl.load(vbase + rows[:, None] * sv_t + offs_d[None, :], mask=rmask[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _tree_attn_combine(
    o_ptr, ws_ptr,  # see _tree_attn
    so_b, so_h, so_n,
    Hq, n, n_pad,
    D: tl.constexpr, BLOCK_M: tl.constexpr, SPLITS: tl.constexpr,
):
    """Merge the SPLITS partial softmax states of each query row."""
    P = tl.num_programs(1) * SPLITS * n_pad
    pm_ptr, pl_ptr, pacc_ptr = ws_ptr, ws_ptr + P, ws_ptr + 2 * P
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mrow = offs_m < n
    m_all = tl.full((BLOCK_M,), NEG, tl.float32)
    for s in range(SPLITS):
        m_all = tl.maximum(m_all, tl.load(pm_ptr + (bh * SPLITS + s) * n_pad + offs_m, mask=mrow, other=NEG))
    l_all = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for s in range(SPLITS):
        row = (bh * SPLITS + s) * n_pad + offs_m
        w = tl.exp(tl.load(pm_ptr + row, mask=mrow, other=NEG) - m_all)
        l_all += w * tl.load(pl_ptr + row, mask=mrow, other=0.0)
        acc += w[:, None] * tl.load(pacc_ptr + row[:, None] * D + offs_d[None, :], mask=mrow[:, None], other=0.0)
    out = acc / tl.where(l_all > 0, l_all, 1.0)[:, None]  # rows past n: see _tree_attn
    tl.store(o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=mrow[:, None])


_WORKSPACE: dict = {}


def _workspace(device, n: int) -> torch.Tensor:
    """Grow-only fp32 buffer per device for the split partials: no allocation per call (one stream)."""
    buf = _WORKSPACE.get(device)
    if buf is None or buf.numel() < n:
        buf = _WORKSPACE[device] = torch.empty(max(n, 1 << 20), dtype=torch.float32, device=device)
    return buf


def tree_attention(q, k, v, bits, scale: float | None = None, splits: int | None = None,
                   lens: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, n, D]; k, v [B, Hkv, past + n, D]; bits [n, W] (every row) or [B, n, W] int64;
    lens [B] visible past per row (None: all of it) -> out [B, Hq, n, D] (q's dtype).

    splits: programs per (query block, head) along the past (None: enough to fill the GPU).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape != v.shape:
        raise ValueError("q must be [B, Hq, n, D] and k, v [B, Hkv, T, D] of equal shape")
    B, Hq, n, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    if Hq % Hkv or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)} k {tuple(k.shape)}")
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim {D} not supported (16, 32, 64, 128, 256)")
    if T < n:
        raise ValueError("keys must hold at least the n tree positions")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError("q, k, v must share one dtype among fp16, bf16, fp32")
    if q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        raise ValueError("the head dim must be contiguous")
    W = -(-n // 64)
    if bits.dim() == 2:
        bits = bits[None]
    if bits.dtype != torch.int64 or tuple(bits.shape[1:]) != (n, W) or bits.shape[0] not in (1, B):
        raise ValueError(f"bits must be int64 [{n}, {W}] or [{B}, {n}, {W}]")
    bits = bits.to(q.device).contiguous()
    past = T - n
    if lens is None:
        lens = torch.full((B,), past, dtype=torch.int32, device=q.device)
    lens = lens.to(device=q.device, dtype=torch.int32).contiguous()
    if tuple(lens.shape) != (B,):
        raise ValueError(f"lens must be [{B}]")
    out = torch.empty_like(q)
    scale = D ** -0.5 if scale is None else scale
    BLOCK_M = 16 if n <= 16 else (32 if n <= 32 else 64)
    BLOCK_N = 32 if q.dtype == torch.float32 and D >= 128 else 64  # fp32 tiles: stay inside shared memory
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    upcast = interp or q.dtype == torch.float32
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    m_blocks = triton.cdiv(n, BLOCK_M)
    # flash-decoding: split the past so that programs fill the GPU (about 2 waves of 132 SMs)
    splits = 1 if interp and splits is None else splits
    if splits is None:
        splits = max(1, min(triton.cdiv(264, m_blocks * B * Hq), triton.cdiv(past, 4 * BLOCK_N)))
    chunk = triton.cdiv(triton.cdiv(max(past, 1), splits), BLOCK_N) * BLOCK_N
    splits = max(1, triton.cdiv(past, chunk)) if past else 1
    n_pad = m_blocks * BLOCK_M
    ws = _workspace(q.device, B * Hq * splits * n_pad * (2 + D)) if splits > 1 else out  # out: unused
    grid = (m_blocks, B * Hq, splits)
    _tree_attn[grid](q, k, v, bits, out, lens, ws,
                     q.stride(0), q.stride(1), q.stride(2),
                     k.stride(0), k.stride(1), k.stride(2),
                     v.stride(0), v.stride(1), v.stride(2),
                     out.stride(0), out.stride(1), out.stride(2), bits.stride(0) if bits.shape[0] > 1 else 0,
                     Hq, n, n_pad, past, chunk, Hq // Hkv, scale,
                     W=W, D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SPLITS=splits, UPCAST=upcast, PREC=prec)
    if splits > 1:
        _tree_attn_combine[(m_blocks, B * Hq)](out, ws, out.stride(0), out.stride(1), out.stride(2),
                                               Hq, n, n_pad, D=D, BLOCK_M=BLOCK_M, SPLITS=splits)
    return out


def tree_attention_reference(q, k, v, mask, scale: float | None = None, lens=None) -> torch.Tensor:
    """Same math in torch: dense [n, n] or [B, n, n] bool tree mask, the first lens[b] past keys
    visible (None: all), GQA by repeat."""
    B, Hq, n, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    kk = k.repeat_interleave(Hq // Hkv, dim=1).float()
    vv = v.repeat_interleave(Hq // Hkv, dim=1).float()
    visible = torch.ones(B, 1, n, T, dtype=torch.bool, device=q.device)
    if lens is not None:
        visible[:, 0, :, : T - n] = torch.arange(T - n, device=q.device)[None, None, :] < torch.as_tensor(lens, device=q.device)[:, None, None]
    m = torch.as_tensor(mask, device=q.device)
    visible[:, 0, :, T - n :] = m if m.dim() == 3 else m[None]
    s = (q.float() @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~visible, float("-inf"))
    return (torch.softmax(s, dim=-1) @ vv).to(q.dtype)
