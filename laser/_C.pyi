"""Type stubs for the native core (csrc/bindings.cpp)."""

from typing import Sequence

import numpy as np
import numpy.typing as npt

class PoolFormatError(ValueError):
    """A pool file is truncated, corrupt, of another version, or not a pool at all."""

class PoolIOError(OSError):
    """A pool file cannot be opened, written or renamed."""

class DraftTree:
    """Draft tree in depth-first pre-order; arrays are zero-copy views owned by the tree."""

    match_len: int
    root_count: float  # weighted count of the matched context (1 with an AcceptanceModel); counts / root_count = chance
    @property
    def tokens(self) -> npt.NDArray[np.int32]: ...  # [n]
    @property
    def parents(self) -> npt.NDArray[np.int32]: ...  # [n], -1 = child of the context
    @property
    def depth(self) -> npt.NDArray[np.int32]: ...  # [n], 1 = child of the context
    @property
    def counts(self) -> npt.NDArray[np.float32]: ...  # [n]
    @property
    def bins(self) -> npt.NDArray[np.int32]: ...  # [n] AcceptanceModel bin of each node, -1 without a model
    @property
    def rank(self) -> npt.NDArray[np.int32]: ...  # [n] best-first selection order; rank < b is a subtree
    @property
    def mask(self) -> npt.NDArray[np.bool_]: ...  # [n, n] ancestor-or-self
    @property
    def paths(self) -> npt.NDArray[np.int32]: ...  # [n_leaves, max_depth], -1 padded
    def __len__(self) -> int: ...

class AcceptanceModel:
    """Chance that a drafted node is accepted given its parent was, by (source slot, context
    length, parent count, whether the token continues the longest context drafted from, share);
    learned from verified trees (observe)."""

    shape: tuple[int, int, int, int, int]  # (sources, contexts, counts, longest, shares)
    def __init__(self, prior: float = 4.0) -> None: ...
    def observe(self, tree: DraftTree, path: npt.ArrayLike) -> None: ...  # path: DFS indices of the accepted nodes
    def set_state(self, hits: npt.ArrayLike, tries: npt.ArrayLike) -> None: ...
    @property
    def hits(self) -> npt.NDArray[np.float64]: ...  # [prod(shape)] copies
    @property
    def tries(self) -> npt.NDArray[np.float64]: ...
    @property
    def q(self) -> npt.NDArray[np.float64]: ...
    @property
    def prior(self) -> float: ...
    @staticmethod
    def bin(source: int, context: int, parent_count: float, share: float, longest: bool = True) -> int: ...

class RetrievalPool:
    def __init__(self, max_depth: int = 12, vocab_size: int = 0, max_nodes: int = 1 << 22, decay: float = 0.5) -> None: ...
    def insert(self, tokens: npt.ArrayLike, weight: float = 1.0) -> None: ...
    def extend(self, prefix: npt.ArrayLike, tokens: npt.ArrayLike, weight: float = 1.0) -> None: ...
    def draft(
        self,
        context: npt.ArrayLike,
        budget: int = 32,
        max_depth: int = 10,  # <= 0: the pool's own
        min_match: int = 2,
        max_match: int = 4,
        cost: npt.ArrayLike | None = None,
        acceptance: AcceptanceModel | None = None,
        sources: Sequence[int] | None = None,  # one source slot per pool, in [0, 4)
        min_chance: float = 0.0,  # past the first min_nodes nodes (best-first)
        match_levels: int = 1,
        min_nodes: int = 0,
    ) -> DraftTree: ...
    def count(self, tokens: npt.ArrayLike) -> float: ...
    def check_tokens(self, tokens: npt.ArrayLike) -> None: ...
    def __len__(self) -> int: ...
    def memory_bytes(self) -> int: ...
    @property
    def max_depth(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def max_nodes(self) -> int: ...
    @property
    def prune_count(self) -> int: ...
    def save(self, path: str) -> None: ...
    @staticmethod
    def load(path: str) -> RetrievalPool: ...

def draft_union(
    pools: Sequence[RetrievalPool],
    weights: Sequence[float],
    context: npt.ArrayLike,
    budget: int = 32,
    max_depth: int = 10,
    min_match: int = 2,
    max_match: int = 4,
    cost: npt.ArrayLike | None = None,
    acceptance: AcceptanceModel | None = None,
    sources: Sequence[int] | None = None,
    min_chance: float = 0.0,
    match_levels: int = 1,
    min_nodes: int = 0,
) -> DraftTree: ...

def cut_trees(trees: list[DraftTree | None], cost: npt.ArrayLike, ragged: bool = False) -> list[DraftTree | None]:
    """Cut trees verified in one forward to their first best-first nodes: one b for all (padded), or
    one per tree with nodes taken across trees by chance (ragged). None: idle rows."""
    ...

# The tiled CPU product (csrc/linear.h): float32, C-contiguous arrays, never converted.
def tiled_size(N: int, K: int) -> int: ...  # floats in tile_weight's copy of an [N, K] weight
def tile_weight(w: npt.NDArray[np.float32], out: npt.NDArray[np.float32], threads: int = 1) -> None: ...  # [N, K] -> [tiled_size]
def tiled_linear(
    x: npt.NDArray[np.float32],  # [M, K]
    tiled: npt.NDArray[np.float32],  # tile_weight's copy of w [N, K]
    N: int,
    bias: npt.NDArray[np.float32] | None,  # [N]
    out: npt.NDArray[np.float32],  # [M, N], written: x @ w.T (+ bias)
    threads: int = 1,
    isa: str = "",  # "" (the best this CPU runs), "avx512", "avx2" or "generic"
) -> None: ...
def tiled_linear_at(
    x: int, M: int, K: int,  # x.data_ptr() of a float32 C-contiguous [M, K]
    tiled: npt.NDArray[np.float32],  # tile_weight's copy of w [N, K]
    N: int,
    bias: int,  # data_ptr() of a float32 [N], or 0: none
    out: int,  # data_ptr() of a float32 C-contiguous [M, N], written: x @ w.T (+ bias)
    threads: int,
) -> None: ...  # tiled_linear on addresses (unchecked: the caller vouches for them), the best kernel this CPU runs
def tiled_isa() -> str: ...  # "avx512", "avx2" or "generic"

# The direct forward's layer steps (csrc/layer.h), on data_ptr()s of float32 C-contiguous
# tensors (unchecked: the caller vouches for them).
def add_rms_norm_at(h: int, y: int, rows: int, C: int, w: int, eps: float, out: int, threads: int = 1) -> None: ...
# h [rows, C] += y (0: no add); out [rows, C] = w * h * rsqrt(mean(h^2) + eps)
def rope_at(x: int, rows: int, heads: int, D: int, cos: int, sin: int, threads: int = 1) -> None: ...
# x [rows, heads, D] = x * cos + rotate_half(x) * sin in place; cos, sin [rows, D]
def silu_mul_at(gate: int, up: int, n: int, isa: str = "", threads: int = 1) -> None: ...
# gate[:n] = silu(gate) * up in place; isa: "" (the best this CPU runs), "avx512", "avx2" or "generic"
def attention_at(
    q: int, N: int, Hq: int, D: int,  # [N, Hq, D] queries
    k: int, v: int, Hkv: int, R: int, row_stride: int, head_stride: int, T: int,  # cache (r, g, t, d): r * row_stride + g * head_stride + t * D + d
    mask: int, S: int,  # [S, T] additive (-inf or float's lowest hides a column)
    mask_row: npt.NDArray[np.int64], cache_row: npt.NDArray[np.int64],  # [N] each token's mask row and cache row (checked)
    scale: float,
    out: int,  # [N, Hq, D], written
    threads: int,
    isa: str = "",  # "" (the best this CPU runs), "avx512", "avx2" or "generic"
) -> None: ...

class DirectLayers:
    """Every decoder layer's parameters for DirectBlock.run; make_direct_layers() makes it."""
def make_direct_layers(
    C: int, Hq: int, Hkv: int, D: int, I: int,
    norm1: list[int], eps1: list[float], norm2: list[int], eps2: list[float],  # per layer: the RMSNorm weights [C]
    tiled: list[list[npt.NDArray[np.float32]]],  # per layer: tile_weight copies of q, k, v, o, gate, up, down (checked)
    bias: list[list[int]],  # per layer: their biases' addresses (0: none)
) -> DirectLayers: ...  # norm and bias addresses unchecked: live while the caller uses the result

class DirectBlock:
    """One verification block of the direct forward (csrc/layer.h decoder_layer); make_direct_block() makes it."""
    def run(
        self, h: int, y: int,  # h [rows, C], the residual stream; y [rows, C] = the last layer's MLP output after
        layers: DirectLayers,
        k_cache: list[int], v_cache: list[int],  # each layer's [R, Hkv, capacity, D] buffers: the block is written into them
    ) -> None: ...
def make_direct_block(
    C: int, Hq: int, Hkv: int, D: int, I: int, scale: float, rows: int,
    cos: int, sin: int,  # [rows, D] rotary tables
    cache_row: npt.NDArray[np.int64], cache_col: npt.NDArray[np.int64],  # [rows] each token's cache slot (checked)
    mask_row: npt.NDArray[np.int64],  # [rows] each token's row of the mask (checked)
    mask: int, S: int, T: int,  # [S, T] additive mask; T columns attended
    R: int, capacity: int,  # the cache buffers' rows and columns
    scratch: list[int],  # x [rows, C], q [rows, Hq * D], k, v [rows, Hkv * D], att [rows, Hq * D], gate, up [rows, I]
    threads: int,
) -> DirectBlock: ...  # addresses unchecked: live float32 C-contiguous buffers the caller vouches for

# Acceptance statistics on a CPU (csrc/accept.h): logits = data_ptr() of a float32 C-contiguous [R, V]
# (unchecked); returns each row's first argmax [R], node i's token probability [n] in row
# parent_row[i] and the count of logits above it there, capped at top_k [n]. n = 0: argmax alone.
def row_stats_at(
    logits: int, R: int, V: int, parent_row: npt.NDArray[np.int64], tokens: npt.NDArray[np.int64], top_k: int,
    threads: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64]]: ...
