"""What the kernels and their callers share, without importing Triton."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def kernels_forced() -> bool:
    """LASER_FORCE_KERNELS=1 runs the Triton paths on CPU too (with TRITON_INTERPRET=1): for tests."""
    return os.environ.get("LASER_FORCE_KERNELS") == "1"


@dataclass
class RowStats:
    """Per-row statistics of verification logits, from the fused kernel or the torch reference."""

    argmax: torch.Tensor  # [R] int64, argmax of every logits row
    prob: torch.Tensor | None  # [n] float32, softmax prob of node i's token in its parent row (None: strict)
    # [n] int64, number of logits in the parent row strictly above the token's, capped at
    # top_k where one is given (None: strict)
    rank: torch.Tensor | None
