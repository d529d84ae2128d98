"""Bit-packed tree masks, shared by the decoder (host) and the tree-attention kernel."""

from __future__ import annotations

import numpy as np
import torch


def mask_to_bits(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[..., n, n] bool ancestor-or-self masks -> [..., n, ceil(n/64)] int64 bitmasks (bit j of row i = mask[i, j])."""
    m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    n = m.shape[-1]
    W = max(1, -(-n // 64))
    padded = np.zeros((*m.shape[:-1], W * 64), dtype=bool)
    padded[..., :n] = m
    packed = np.packbits(padded, axis=-1, bitorder="little")  # [..., n, W*8] uint8, little-endian bits
    return torch.from_numpy(np.ascontiguousarray(packed).view(np.int64).copy())
