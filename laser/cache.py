"""TreeCache: a LASER-owned HF KV cache, preallocated and written in place.

Per layer, keys and values are one buffer each, [rows, H, capacity, D], allocated on the
layer's first update (its H, D, dtype and device) and never reallocated. The cache owns
the row lengths:

  lens[r]   columns [0, lens[r]) of row r hold positions 0 .. lens[r] - 1 (compacted);
            columns past that are garbage, hidden from every query by the caller's mask.
  width     where the next forward's q tokens go: columns [width, width + q) of every
            active row; update() returns the views [:rows, :, :width + q] (no copy).
  rows      active rows: buffers [:rows]; keep_rows() drops finished ones.

A forward is either a verification (begin_block() sets width = max(lens) and the model
appends the [pending + tree] block there: padded, [rows, q] tokens into columns
[width, width + q) of every row; or ragged, after place(): the rows' blocks back to back as
one sequence [1, N], token j into row rows[j], column cols[j]) or a prefill of some rows from
column 0 (`filling(rows)`: the model's keys go to those rows and come back as they are). After a
verification, commit(rows, src, dst) is the one place that moves accepted columns. The direct
forward's C++ layers (laser/forward.py) write a verification block themselves, at the slots
block_slots() gives, which are the ones update() would write.

Models talk to it through HF's public Cache interface (update, get_seq_length,
get_mask_sizes); the caller always passes explicit positions and a 4-D mask (one per
layer type for models with sliding-window layers), so the cache never shapes a mask.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _Layer(CacheLayerMixin):
    is_sliding = False  # every layer keeps the whole past; the caller's mask applies windows
    is_compileable = False

    def __init__(self, owner: "TreeCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states, value_states) -> None:
        c = self.owner
        B, H, _, D = key_states.shape
        self.keys = key_states.new_zeros((c.max_rows, H, c.capacity, D))
        self.values = value_states.new_zeros((c.max_rows, value_states.shape[1], c.capacity, value_states.shape[3]))
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """key_states [b, H, q, D]: a prefill of the `filling` rows, or every active row's block."""
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            # written in place, the buffers would chain every forward's graph (and its tensors) for good
            raise RuntimeError("TreeCache keeps no autograd graph: run the forwards that use it under torch.no_grad()")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        c = self.owner
        q = key_states.shape[2]
        if c.fill_rows is not None:  # prefill from column 0: attend over the new keys alone
            self.keys[c.fill_rows, :, :q] = key_states
            self.values[c.fill_rows, :, :q] = value_states
            return key_states, value_states
        w = c.width
        if c.placed is not None:  # ragged: [1, H, N, D], token j to (rows[j], cols[j])
            rows, cols, end = c.placed
            self.keys[rows, :, cols] = key_states[0].transpose(0, 1)
            self.values[rows, :, cols] = value_states[0].transpose(0, 1)
            return self.keys[: c.rows, :, :end], self.values[: c.rows, :, :end]
        if w + q > c.capacity:
            raise RuntimeError(f"TreeCache capacity {c.capacity} exceeded: {w} + {q} columns")
        self.keys[: c.rows, :, w : w + q] = key_states
        self.values[: c.rows, :, w : w + q] = value_states
        return self.keys[: c.rows, :, : w + q], self.values[: c.rows, :, : w + q]

    def get_seq_length(self) -> int:
        return 0 if self.owner.fill_rows is not None else self.owner.width

    def get_mask_sizes(self, query, *args) -> tuple[int, int]:  # query: a length (5.2x) or cache positions
        q = query if isinstance(query, int) else int(query.shape[0])
        return self.get_seq_length() + q, 0

    def get_max_length(self) -> int:
        return self.owner.capacity


class TreeCache(Cache):
    def __init__(self, n_layers: int, rows: int, capacity: int, device="cpu"):
        super().__init__(layers=[_Layer(self) for _ in range(n_layers)])
        self.device = torch.device(device)
        self.max_rows = self.rows = rows
        self.capacity = capacity
        self.lens = np.zeros(rows, dtype=np.int64)
        self.width = 0
        self.fill_rows: torch.Tensor | None = None
        self.placed: tuple[torch.Tensor, torch.Tensor, int] | None = None  # ragged block: rows [N], cols [N], end

    @classmethod
    def for_model(cls, model, rows: int, capacity: int) -> "TreeCache":
        return cls(model.config.get_text_config().num_hidden_layers, rows, capacity, model.device)

    @contextlib.contextmanager
    def filling(self, rows: list[int], lengths: list[int]):
        """A prefill forward of len(rows) sequences into cache rows `rows`, from column 0;
        row rows[j] then holds lengths[j] positions."""
        self.fill_rows = torch.tensor(rows, dtype=torch.long, device=self.device)
        try:
            yield
        finally:
            self.fill_rows = None
        self.lens[rows] = lengths

    def begin_block(self) -> int:
        """Before a verification forward: its block goes at column W = max(lens); returns W."""
        self.width = int(self.lens[: self.rows].max())
        self.placed = None
        return self.width

    def place(self, counts: np.ndarray) -> None:
        """After begin_block(), for a ragged forward: row r's counts[r] tokens go to its columns
        [W, W + counts[r]), the rows' blocks back to back in row order; the layers see every
        row's columns [0, W + max(counts))."""
        end = self.width + int(counts.max())
        if end > self.capacity:
            raise RuntimeError(f"TreeCache capacity {self.capacity} exceeded: {end} columns")
        rows = np.repeat(np.arange(counts.size), counts)
        cols = self.width + np.concatenate([np.arange(m) for m in counts])
        both = torch.from_numpy(np.stack([rows, cols])).to(self.device)
        self.placed = (both[0], both[1], end)

    def block_slots(self, tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """After begin_block() (and place() for a ragged block): the cache row and column of each of
        the block's `tokens` tokens, in order ([N] int64 each), where update() writes them: for the
        direct forward, whose C++ layers write the block themselves."""
        if self.placed is not None:
            rows, cols, _ = self.placed
            return rows.cpu().numpy(), cols.cpu().numpy()
        q = tokens // self.rows
        if tokens != q * self.rows or self.width + q > self.capacity:
            raise RuntimeError(f"TreeCache: {tokens} tokens are no block of {self.rows} rows within capacity {self.capacity}")
        return np.repeat(np.arange(self.rows), q), self.width + np.tile(np.arange(q), self.rows)

    def commit(self, rows: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
        """In every layer, copy column src[i] of row rows[i] to column dst[i] (all heads), then
        set each listed row's length to its largest dst + 1. Needs dst <= src within a row
        (accepted block columns move left, onto the row's past), which a block at
        W >= lens[r] guarantees. One index_select and one index_copy_ per buffer, none where
        every column is already in place (one row whose path is the tree's first branch)."""
        if rows.size == 0:
            return
        np.maximum.at(self.lens, rows, dst + 1)
        moved = src != dst
        rows, src, dst = rows[moved], src[moved], dst[moved]
        layers = [layer for layer in self.layers if layer.is_initialized]
        if layers and rows.size:
            R, H, C, _ = layers[0].keys.shape
            base = (rows[:, None] * H + np.arange(H)[None, :]) * C  # [n, H] flat row of (row, head, column 0)
            both = torch.from_numpy(np.stack([(base + src[:, None]).ravel(), (base + dst[:, None]).ravel()]))
            s, d = both.to(layers[0].keys.device)
            for layer in layers:
                for t in (layer.keys, layer.values):
                    flat = t.view(-1, t.shape[-1])  # [R * H * C, D]
                    flat.index_copy_(0, d, flat.index_select(0, s))

    def reset_rows(self, rows) -> None:
        self.lens[rows] = 0

    def keep_rows(self, keep: list[int]) -> None:
        """Keep only rows `keep` (in that order) as rows 0 .. len(keep) - 1; the rest leave the batch."""
        at = torch.tensor(keep, dtype=torch.long, device=self.device)
        for layer in self.layers:
            if layer.is_initialized:
                for t in (layer.keys, layer.values):
                    t[: len(keep)] = t.index_select(0, at)
        self.lens[: len(keep)] = self.lens[keep]
        self.lens[len(keep):] = 0
        self.rows = len(keep)

    def data_ptrs(self) -> list[int]:
        """Buffer addresses, for tests: they never change once allocated."""
        return [t.data_ptr() for layer in self.layers if layer.is_initialized for t in (layer.keys, layer.values)]
