"""Forwards on a multi-core CPU: linears as a batched matmul over blocks of output features.

torch's fp32 `F.linear` (MKL sgemm) is slow at the row counts LASER runs: one pending
token plus a small tree (1-65 rows), B such rows, or a prompt (a few hundred rows); past
MAX_ROWS MKL's own threading does as well. On the 2-core benchmark machine, with the
weights streaming from DRAM as in a real forward (median ms, benchmarks/RESULTS.md):

  rows                      1      2      4      17     65     300
  576 -> 1536  F.linear     0.28   0.50   0.49   0.71   1.18   4.90
               split        0.17   0.24   0.30   0.44   1.02   4.12
  576 -> 49152 F.linear     10.0   21.2   21.5   27.7   61.8   241
  (lm head)    split        4.9    7.2    6.9    22.4   47.1   185

Split along the output features into `ways` equal blocks, the same product is one
`torch.bmm` of `ways` batches, which keeps every core busy. Up to FEW_ROWS rows the
weight is the bmm's left operand (x^T is the small one MKL packs: [T, N/T, K] @ [K, rows]),
above that the right one ([rows, K] @ [T, K, N/T]); each layout is the faster one there.

`split_linears(model, rows)` routes F.linear through the split for one forward, through
torch's public TorchFunctionMode: no module of the model is touched, and outside the
`with` block nothing changes. The result equals F.linear up to fp32 summation order.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

FEW_ROWS = 4  # up to here the weight-major layout is faster (table above)
MAX_ROWS = 512  # 576 -> 1536 over 296 rows: split 4.2 ms, F.linear 5.0; over 2400: 33.6 vs 33.1 (MKL threads)


class SplitLinear(TorchFunctionMode):
    """F.linear(x [..., K], w [N, K], b) over 1..MAX_ROWS rows as bmm of `ways` N-blocks."""

    def __init__(self, ways: int):
        super().__init__()
        self.ways = ways
        self.split_calls = 0  # linears that took the split path (for tests and profiling)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows, (N, K) = x.numel() // max(x.shape[-1], 1), w.shape
            if (1 <= rows <= MAX_ROWS and N % self.ways == 0 and w.is_contiguous()
                    and x.dtype == w.dtype == torch.float32 and x.device.type == "cpu"):
                T = self.ways
                self.split_calls += 1
                blocks = w.view(T, N // T, K)
                if rows <= FEW_ROWS:  # [T, N/T, K] @ [K, rows] -> [T, N/T, rows] -> [rows, N]
                    # contiguous: a strided [rows, N] view would push SDPA off its fast path
                    y = torch.bmm(blocks, x.reshape(rows, K).t().expand(T, K, rows)).permute(2, 0, 1).contiguous()
                else:  # [rows, K] @ [T, K, N/T] -> [T, rows, N/T] -> [rows, N]
                    y = torch.bmm(x.reshape(1, rows, K).expand(T, rows, K), blocks.transpose(1, 2)).transpose(0, 1)
                y = y.reshape(*x.shape[:-1], N)
                return y if bias is None else y + bias
        return func(*args, **kwargs)


def split_linears(model, rows: int):
    """Context for one forward over `rows` tokens: the split on a multi-core CPU, else nothing."""
    threads = torch.get_num_threads()
    if model.device.type != "cpu" or threads < 2 or not 1 <= rows <= MAX_ROWS:
        return contextlib.nullcontext()
    return SplitLinear(2 * threads)
