"""Verification forwards on a multi-core CPU: small-row linears as a batched matmul.

A verification forward multiplies every weight by a few rows (the pending token plus a
small tree: 2-48 rows). At those shapes torch's fp32 `F.linear` (MKL sgemm) runs on one
core: on the 2-core benchmark machine a 17-row linear took the same time with 1 and 2
threads, while 64 rows used both. Split along the output features into `ways` equal
blocks, the same product as one `torch.bmm` of `ways` batches keeps every core busy:
a forward over 17 tokens at context 300 went from 167 to 130 ms (benchmarks/RESULTS.md).

`small_row_linears(model, rows)` routes F.linear through that split for one forward,
through torch's public TorchFunctionMode: no module of the model is touched, and outside
the `with` block nothing changes. The result equals F.linear up to fp32 summation order.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

MIN_ROWS, MAX_ROWS = 2, 48  # 1 row is a GEMV (already multi-threaded); >= 64 rows MKL threads itself


class SplitLinear(TorchFunctionMode):
    """F.linear(x [..., K], w [N, K], b) over MIN_ROWS..MAX_ROWS rows as bmm of `ways` N-blocks."""

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
            if (MIN_ROWS <= rows <= MAX_ROWS and N % self.ways == 0 and w.is_contiguous()
                    and x.dtype == w.dtype == torch.float32 and x.device.type == "cpu"):
                T = self.ways
                self.split_calls += 1
                y = torch.bmm(x.reshape(1, rows, K).expand(T, rows, K), w.view(T, N // T, K).transpose(1, 2))
                y = y.transpose(0, 1).reshape(*x.shape[:-1], N)  # [T, rows, N/T] -> [..., N]
                return y if bias is None else y + bias
        return func(*args, **kwargs)


def small_row_linears(model, rows: int):
    """Context for one forward over `rows` tokens: the split on a multi-core CPU, else nothing."""
    threads = torch.get_num_threads()
    if model.device.type != "cpu" or threads < 2 or not MIN_ROWS <= rows <= MAX_ROWS:
        return contextlib.nullcontext()
    return SplitLinear(2 * threads)
