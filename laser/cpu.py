"""Forwards on a CPU: each linear routed to the fastest fp32 product for its shape,
as measured on this machine.

At the row counts LASER runs (one pending token plus a small tree, B such rows, or a
prompt of a few hundred rows) the fastest fp32 product depends on the CPU and its BLAS.
On a 2-core AMD EPYC VM (median ms, weights streaming from DRAM as in a real forward) MKL's
F.linear was slow and an output-split bmm won:

  rows                      1      2      5      9      17     41     65
  576 -> 1536  F.linear     0.33   0.63   0.59   0.71   0.83   1.24   1.70
               split        0.23   0.31   0.39   0.44   0.57   0.99   1.23
               oneDNN       0.24   0.45   0.50   0.54   0.66   1.08   1.31
  576 -> 49152 F.linear     9.5    22.6   24.6   28.0   31.6   44.1   56.3
  (LM head)    split        5.4    7.5    16.2   18.9   21.9   36.3   51.2
               oneDNN       5.8    10.6   11.6   13.4   16.2   26.7   36.9

while on a 2-core Intel Xeon VM F.linear won at 1-2 rows by 2-3x (LM head, 1 row: 2.9 ms
against the split's 8.8). So no table is hard-coded: routes_for() times the products (PRODUCTS)
for each (N, K) of a model at row buckets 1, 2, 4, ..., 512 (the 512 winner also serves longer
prefills), once per machine (CPU model, torch version, threads), and keeps the winners in $LASER_CACHE/cpu-routes.json, so every
later process on the machine takes the same routes (and rounds the same way).

split: the weight cut along the output features into `ways` blocks, one torch.bmm of
`ways` batches, which keeps every core busy; up to FEW_ROWS rows the weight is the bmm's
left operand ([T, N/T, K] @ [K, rows]), above that the right one.
packed: oneDNN on its own blocked copy of the weight (PackedWeights: one copy per weight,
made on first use, so the routed linears hold their weights twice). On a 2-core AMD EPYC
(AVX-512) VM, cold weights, median ms:

  rows                      1      3      9      17     65
  576 -> 1536  split        0.17   0.20   0.31   0.30   0.86
               onednn       0.13   0.17   0.20   0.22   0.39
               packed       0.12   0.12   0.15   0.16   0.34
  576 -> 49152 split        2.89   3.51   9.64   11.45  30.60
  (LM head)    onednn       3.32   4.01   4.59   5.43   11.34
               packed       2.76   3.24   2.79   3.63   9.51

and a SmolLM2-135M forward over 1 + 8 tree tokens took 50 ms against 32 ms for one token
(65 ms through the routes without "packed"; context 300, 2026-12-05).
tiled: LASER's own product (laser._C.tiled_linear, csrc/linear.h) on a tiled copy of the
weight, [ceil(N/32)][K][32]: each weight element is loaded once and multiplies up to 14 rows
held in L1 (AVX-512; 3 on AVX2, 1 otherwise), OpenMP threads over the blocks, so at 1-16
rows it runs at the memory's speed (on the Intel Xeon VM up to ~12 rows, the weight prefetched
4 KiB ahead; above that its arithmetic binds: ~165 GFLOP/s on 2 cores with the weight in
cache). The 210 layer linears of a SmolLM2 forward (423 MB of weights), AMD VM, median ms:

  rows                      1      2      5      9      17     33
               split        17.2   18.1   35.5   40.4   50.6   67.0
               packed       26.7   29.5   22.6   27.1   34.2   50.5
               tiled        14.7   13.8   14.1   14.6   23.0   38.3

and the forward over 1 / 2 / 3 / 5 / 9 / 17 tokens (0-16 tree nodes, context 300) took
33 / 33 / 34 / 34 / 36 / 48 ms (2026-12-06). Each copy ("packed", "tiled") holds the routed
weights once more: an engine makes them only where may_pack() allows the kinds its routes use.

laser.engine.Engine gives each `nn.Linear` of a model a forward that takes this route
inside LASER calls. Only the linears pass through Python: a TorchFunctionMode doing the
same intercepted every torch call of the forward (~2,200 per SmolLM2 forward) and cost
15-22 ms of an 80-150 ms forward. Results equal F.linear up to fp32 summation order.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

from laser import _C

FEW_ROWS = 4  # up to here the split's weight-major layout is the faster one
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # a product is measured at each, used up to it;
# the last bucket's winner also serves more rows (prefills of several prompts: at 1024 rows on
# the AMD EPYC VM the tiled product ran 481-491 GFLOP/s as at 512, the packed copies 461-472)
PRODUCTS = ("linear", "split", "onednn", "packed", "tiled")
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_PACKED = _ONEDNN and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
ROUTE_SECONDS = 3  # about what measure() takes for one shape on a 2-core CPU (1.5-2.7 s; the first-use notice)
ROUTES_VERSION = 3  # in the machine key: bump when a product's speed or the choice changes (routes measured again)
TILED_MARGIN = 1.03  # another product takes a bucket from the tiled one only if more than 3% faster (see winner())
PACK_ROWS = 32  # the row count oneDNN lays a packed copy out for; any count runs on it (16-512 measured alike)


class PackedWeights:
    """The copies of each weight that the "packed" and "tiled" products run on, made on first
    use and made again when the weight changes (in place: its version counter; replaced: a
    new tensor or storage). Thread-safe; clear() frees every copy.
      packed  oneDNN's blocked layout (torch.ops.mkldnn._reorder_linear_weight)
      tiled   laser._C.tile_weight's layout for laser._C.tiled_linear (csrc/linear.h)"""

    KINDS = ("packed", "tiled")

    def __init__(self):
        self._copies: dict[tuple[int, str], tuple] = {}  # (id(w), kind) -> (weakref to w, w._version, w.data_ptr(), copy)
        self._lock = threading.Lock()
        self.generation = 0  # goes up with every copy made and every clear(): what callers holding copies check

    def get(self, w: torch.Tensor, kind: str):
        """w's copy of this kind: a tensor (packed) or a float32 numpy array (tiled)."""
        hit = self._copies.get((id(w), kind))
        if hit is not None and hit[0]() is w and hit[1] == w._version and hit[2] == w.data_ptr():
            return hit[3]
        with self._lock:
            if kind == "packed":
                copy = torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_ROWS)
            elif kind == "tiled":
                copy = torch.empty(_C.tiled_size(*w.shape)).numpy()  # torch's allocation: 64-byte aligned
                _C.tile_weight(w.detach().contiguous().numpy(), copy, torch.get_num_threads())
            else:
                raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
            key = (id(w), kind)  # a weight that dies takes its copy with it
            gone = weakref.ref(w, lambda _, key=key: self._copies.pop(key, None))
            self._copies[key] = (gone, w._version, w.data_ptr(), copy)
            self.generation += 1
            return copy

    def __len__(self) -> int:
        return len(self._copies)

    def clear(self) -> None:
        with self._lock:
            self._copies.clear()
            self.generation += 1


def _tiled(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, packs: PackedWeights) -> torch.Tensor:
    """The tiled product on checked operands: x [..., K] float32 C-contiguous, bias [N] contiguous."""
    N, K = w.shape
    y = torch.empty(*x.shape[:-1], N)  # x, bias and y hold what tiled_linear_at reads and writes
    _C.tiled_linear_at(x.data_ptr(), x.numel() // K, K, packs.get(w, "tiled"), N, 0 if bias is None else bias.data_ptr(),
                       y.data_ptr(), torch.get_num_threads())
    return y


def split_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, ways: int,
                 product: str = "split", packs: PackedWeights | None = None) -> torch.Tensor:
    """F.linear(x [..., K], w [N, K], bias [N]) on a CPU through `product` (one of PRODUCTS;
    "packed" and "tiled" take w's copy from `packs`, and without them are "onednn")."""
    rows, (N, K) = x.numel() // max(x.shape[-1], 1), w.shape
    if (product == "linear" or rows < 1 or not x.dtype == w.dtype == torch.float32
            or x.device.type != "cpu" or not w.is_contiguous() or (bias is not None and bias.dtype != torch.float32)):
        return F.linear(x, w, bias)
    if product == "tiled" and packs is not None:
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad)):
            return F.linear(x, w, bias)  # the C++ product keeps no autograd graph
        return _tiled(x.contiguous(), w, None if bias is None else bias.contiguous(), packs)
    if product in ("onednn", "packed", "tiled") and _ONEDNN:
        weight = packs.get(w, "packed") if product == "packed" and packs is not None and _PACKED else w
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, K).contiguous(), weight, bias, "none", [], "")
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


class LinearRoutes:
    """The product to use per (N, K) and row count: table[(N, K)][i] serves rows up to ROW_BUCKETS[i]
    (the last entry: any count above).
    packs: the weights' copies (the "packed" and "tiled" products; one PackedWeights per model);
    None: no copies are made, and both run as "onednn" on the weight in place."""

    def __init__(self, ways: int, table: dict[tuple[int, int], list[str]], packs: PackedWeights | None = None):
        self.ways, self.table, self.packs = ways, table, packs
        self._tiled: dict[frozenset, int] = {}  # tiled_upto's answers

    def tiled_upto(self, shapes: frozenset) -> int:
        """The largest row bucket at which every (N, K) of `shapes` routes to the tiled product
        (0: none, or no copies). The direct forward (laser/forward.py) runs its C++ layers, all
        tiled, up to it: at one row, where F.linear wins some shapes alone, a SmolLM2 forward
        through the C++ layers took 27 ms against 32-38 ms stepping through the routes in Python."""
        if self.packs is None:
            return 0
        if shapes not in self._tiled:
            self._tiled[shapes] = max((b for i, b in enumerate(ROW_BUCKETS)
                                       if all(s in self.table and self.table[s][i] == "tiled" for s in shapes)), default=0)
        return self._tiled[shapes]

    def product(self, N: int, K: int, rows: int) -> str:
        choice = self.table.get((N, K))
        if choice is None or rows < 1:
            return "linear"
        return choice[min(bisect.bisect_left(ROW_BUCKETS, rows), len(ROW_BUCKETS) - 1)]

    def copy_kinds(self) -> set[str]:
        """The kinds of weight copy (PackedWeights.KINDS) some route of the table runs on."""
        return {p for choice in self.table.values() for p in choice if p in PackedWeights.KINDS}

    def one_copy(self, kind: str) -> "LinearRoutes":
        """These routes with every copy-backed product run on copies of `kind` alone (one copy per
        weight instead of one per kind; the products are within ~10% of each other where the
        other one wins, 128-512 rows on the AMD VM)."""
        table = {s: [kind if p in PackedWeights.KINDS else p for p in c] for s, c in self.table.items()}
        return LinearRoutes(self.ways, table, self.packs)

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        return split_linear(x, w, bias, self.ways, self.product(w.shape[0], w.shape[1], rows), self.packs)

    def lean(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """linear() on operands its caller vouches for (the direct forward's): x [..., K] float32,
        C-contiguous, on the CPU, outside autograd; w [N, K] and bias [N] float32 and contiguous.
        The tiled route then skips split_linear's checks (~10 us a call, 211 calls a SmolLM2 forward)."""
        if self.packs is None or self.product(w.shape[0], w.shape[1], x.numel() // w.shape[1]) != "tiled":
            return self.linear(x, w, bias)
        return _tiled(x, w, bias, self.packs)


def _median_ms(f, reps: int) -> float:
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return 1e3 * sorted(ts)[reps // 2]


def stream_bytes() -> int:
    """Bytes of weight copies a measurement cycles through so that they stream from memory, as
    a forward's weights do: twice the largest CPU cache, 32 MiB at least, 512 MiB at most.
    (An Intel Xeon VM's 260 MiB L3 held a fixed 32 MiB: F.linear then won at 8-16 rows, where
    over a forward's 423 MB of weights the tiled product is 1.2-1.3x faster.)"""
    largest = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip()
            largest = max(largest, int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0))
        except (OSError, ValueError):
            pass
    return min(max(2 * largest, 32 << 20), 512 << 20)


def measure(N: int, K: int, ways: int, reps: int = 7) -> list[str]:
    """The fastest product per row bucket for an [N, K] weight, the weights streaming from
    memory as in a forward (copies totalling stream_bytes(), in turn)."""
    copies = max(1, min(1024, stream_bytes() // (4 * N * K)))
    ws = [torch.randn(N, K) for _ in range(copies)]
    packs = PackedWeights()
    for w in ws:  # copying is once per weight, not part of a product's time
        packs.get(w, "tiled")
        if _PACKED:
            packs.get(w, "packed")
    turn = [0]
    out = []
    for rows in ROW_BUCKETS:
        x = torch.randn(rows, K)
        times = {}
        for product in PRODUCTS:
            if ((product == "split" and N % ways) or (product == "onednn" and not _ONEDNN)
                    or (product == "packed" and not _PACKED)):
                continue

            def run():
                turn[0] = (turn[0] + 1) % copies
                split_linear(x, ws[turn[0]], None, ways, product, packs)

            times[product] = _median_ms(run, reps)
        out.append(winner(times))
    return out


def winner(times: dict[str, float]) -> str:
    """The product a row bucket routes to, from its median times: the fastest, except that the
    tiled product keeps the bucket within TILED_MARGIN of it. Products that close swap places
    between measurements on a shared VM (576 -> 1536 at 512 rows, AMD EPYC: tiled 1.92 ms against
    packed 1.99 in one run, packed chosen in another, and a 309-token prefill 200 ms against 191
    with every product tiled), and each bucket the tiled product holds spares a second weight copy
    and widens the direct forward's C++ layers (LinearRoutes.tiled_upto)."""
    fastest = min(times, key=lambda p: (times[p], PRODUCTS.index(p)))
    return "tiled" if times.get("tiled", float("inf")) <= TILED_MARGIN * times[fastest] else fastest


def _machine_key(ways: int) -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    products = ",".join(PRODUCTS)  # a machine measured with fewer products, or less streaming, is measured again
    return (f"{model} | torch {torch.__version__} | threads {torch.get_num_threads()} | ways {ways} | {products} | "
            f"stream {stream_bytes() >> 20} MiB | routes v{ROUTES_VERSION}")


_lock = threading.Lock()


def write_cache(path: Path, data) -> None:
    """JSON into a cache file, replaced whole; a read-only cache is left as it is (what was
    measured still holds for this process)."""
    try:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock on `path` (created), released on exit; where the file cannot be made
    (a read-only cache) it goes on unlocked."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a")
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when f closes
        yield


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (MemAvailable), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def may_pack(weight_bytes: int) -> bool:
    """Whether a model may keep copies of `weight_bytes` of weights (its weights times the kinds
    of copy its routes use): LASER_CPU_PACK=1 always, =0 never; unset, while they take at most
    half of the memory still available (unknown: yes)."""
    forced = os.environ.get("LASER_CPU_PACK", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ValueError(f"LASER_CPU_PACK must be 0 or 1, got {forced!r}")
    free = available_memory()
    return free is None or 2 * weight_bytes <= free


def routes_for(shapes, ways: int, cache_dir: str | Path | None = None, packs: PackedWeights | None = None) -> LinearRoutes:
    """Routes for these (N, K) shapes: from $LASER_CACHE/cpu-routes.json, measuring (and
    adding) the shapes this machine has not seen. Processes of one host measure one at a time
    (file locks in the cache), so a host's processes started together measure once; the file
    keeps the first answer for a shape. packs: where the "packed" and "tiled" products keep
    their copies (None: they run as "onednn", see LinearRoutes)."""
    from laser.model import cache_dir as default_cache

    folder = Path(cache_dir) if cache_dir is not None else default_cache()
    path = folder / "cpu-routes.json"
    key = _machine_key(ways)

    def read() -> dict:  # the whole file ({} if absent or unreadable)
        try:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) and isinstance(data.get(key, {}), dict) else {}
        except (OSError, ValueError):
            return {}

    # One measurement at a time on this host (a node's Ray workers start together: each then
    # times an idle machine, and the later ones take the first one's answer); hosts sharing the
    # cache measure side by side and take turns only to rewrite the file.
    with _lock, _file_lock(folder / f"cpu-routes.{socket.gethostname()}.lock"):
        known = read().get(key, {})
        todo = sorted({(int(n), int(k)) for n, k in shapes} - {tuple(map(int, s.split("x"))) for s in known})
        if todo:
            print(f"laser: measuring this CPU's fastest linear product for {len(todo)} new weight shape(s) "
                  f"({', '.join(f'{n}x{k}' for n, k in todo)}) at {ways} ways, once per machine (~{ROUTE_SECONDS * len(todo)} s; "
                  f"kept in {path}; `laser calibrate --model M` does it ahead of a job)", file=sys.stderr, flush=True)
            measured = {f"{n}x{k}": measure(n, k, ways) for n, k in todo}
            with _file_lock(folder / "cpu-routes.lock"):
                data = read()  # again: another host may have written meanwhile
                entry = data.setdefault(key, {})
                for s, choice in measured.items():
                    entry.setdefault(s, choice)  # the first answer for a shape stays
                write_cache(path, data)
            known = {**measured, **entry}
    table = {tuple(map(int, s.split("x"))): list(c) for s, c in known.items()
             if isinstance(c, list) and len(c) == len(ROW_BUCKETS) and all(p in PRODUCTS for p in c)}
    return LinearRoutes(ways, table, packs)


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
