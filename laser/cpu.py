"""Forwards on a multi-core CPU: each linear routed to the fastest fp32 product for its shape.

torch's fp32 `F.linear` (MKL sgemm) is slow at the row counts LASER runs: one pending
token plus a small tree (1-65 rows), B such rows, or a prompt (a few hundred rows); past
MAX_ROWS MKL's own threading does as well. On the 2-core benchmark machine, with the
weights streaming from DRAM as in a real forward (median ms, benchmarks/RESULTS.md):

  rows                      1      2      5      9      17     41     65
  576 -> 1536  F.linear     0.33   0.63   0.59   0.71   0.83   1.24   1.70
               split        0.23   0.31   0.39   0.44   0.57   0.99   1.23
               oneDNN       0.24   0.45   0.50   0.54   0.66   1.08   1.31
  576 -> 49152 F.linear     9.5    22.6   24.6   28.0   31.6   44.1   56.3
  (LM head)    split        5.4    7.5    16.2   18.9   21.9   36.3   51.2
               oneDNN       5.8    10.6   11.6   13.4   16.2   26.7   36.9

Split along the output features into `ways` equal blocks, the same product is one
`torch.bmm` of `ways` batches, which keeps every core busy. Up to FEW_ROWS rows the
weight is the bmm's left operand (x^T is the small one MKL packs: [T, N/T, K] @ [K, rows]),
above that the right one ([rows, K] @ [T, K, N/T]); each layout is the faster one there.
Vocabulary-wide products (N >= WIDE) over more than FEW_ROWS rows go to oneDNN instead.

laser.engine.Engine gives each `nn.Linear` of a model a forward that takes this route
inside LASER calls. Only the linears pass through Python: a TorchFunctionMode doing the
same intercepted every torch call of the forward (~2,200 per SmolLM2 forward) and cost
15-22 ms of an 80-150 ms forward. Results equal F.linear up to fp32 summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FEW_ROWS = 4  # up to here the weight-major layout is faster (table above)
MAX_ROWS = 512  # 576 -> 1536 over 296 rows: split 4.2 ms, F.linear 5.0; over 2400: 33.6 vs 33.1 (MKL threads)
WIDE = 16384  # output features from which oneDNN beats the split above FEW_ROWS (the LM head)
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def split_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, ways: int) -> torch.Tensor:
    """F.linear(x [..., K], w [N, K], bias [N]) on a CPU, through the product the table picks."""
    rows, (N, K) = x.numel() // max(x.shape[-1], 1), w.shape
    if not (1 <= rows <= MAX_ROWS and x.dtype == w.dtype == torch.float32 and x.device.type == "cpu"
            and w.is_contiguous()):
        return F.linear(x, w, bias)
    if N >= WIDE and rows > FEW_ROWS and _ONEDNN:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, K), w, bias, "none", [], "")
        return y.reshape(*x.shape[:-1], N)
    if N % ways:
        return F.linear(x, w, bias)
    blocks = w.view(ways, N // ways, K)
    if rows <= FEW_ROWS:  # [T, N/T, K] @ [K, rows] -> [T, N/T, rows] -> [rows, N]
        # contiguous: a strided [rows, N] view would push SDPA off its fast path
        y = torch.bmm(blocks, x.reshape(rows, K).t().expand(ways, K, rows)).permute(2, 0, 1).contiguous()
    else:  # [rows, K] @ [T, K, N/T] -> [T, rows, N/T] -> [rows, N]
        y = torch.bmm(x.reshape(1, rows, K).expand(ways, rows, K), blocks.transpose(1, 2)).transpose(0, 1)
    y = y.reshape(*x.shape[:-1], N)
    return y if bias is None else y + bias


# ---------------------------------------------------------------- attention

def sdpa_gqa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, with grouped-query heads handled inside SDPA (enable_gqa).

    query [B, Hq, q, D], key/value [B, Hkv, T, D], attention_mask additive or bool [B, 1, q, T].
    With a mask, transformers repeats each key/value head Hq/Hkv times first (repeat_kv: a
    copy of the whole cache per layer and forward); SDPA reads the groups in place instead,
    with the same result. On this CPU, 9 query / 3 KV heads, 300 cached positions, one
    layer: 9 queries 0.28 -> 0.15 ms, 8 rows x 6 queries 1.35 -> 0.68 ms. Everything else
    (no mask, position bias, softcap, no grouping) goes to transformers' own function.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    Hq, Hkv = query.shape[1], key.shape[1]
    if (attention_mask is None or Hkv == Hq or Hq % Hkv or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)  # [B, Hq, q, D]
    return out.transpose(1, 2).contiguous(), None
