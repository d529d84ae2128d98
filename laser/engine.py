"""The LASER decode engine: one loop, draft -> verify -> accept -> commit, over B >= 1 rows.

`laser.generate` is this loop with one row, `generate_batch` the same loop with a queue
that refills rows as they finish (continuous batching).

Preparing a model (Engine(model): prepared on first use, the same object per model until close()):
  attention  a model running transformers' SDPA is switched to the "laser" attention
             function, which inside a LASER call runs the Triton tree kernel (when the
             call uses kernels) or SDPA with grouped-query heads read in place (CPU), and
             outside one runs transformers' own SDPA, as before.
  linears    every nn.Linear gets a forward that, inside a LASER call on a CPU,
             runs the product laser.cpu.routes_for() measured fastest for its shape on this
             machine (once per machine, cached), and otherwise F.linear, as before. The
             "packed" and "tiled" products keep a copy of each weight they run (self.packs),
             freed by close(), where laser.cpu.may_pack() allows the copies of every kind
             the routes use (at most half of the memory still available, or
             LASER_CPU_PACK=1); where only one kind fits, every such route runs "tiled";
             where none does, they run oneDNN on the weights in place, with a warning.
  forward    verifications and prefills of a Llama or Qwen2 model on a CPU run
             laser.forward.DirectForward: the model's computation without its module calls
             (logits and cache equal up to fp32 rounding).
"Inside a LASER call" is a context variable, set around each of LASER's forwards in the
calling thread only (never across a yield to the caller): calls nest, interleave and run
concurrently on one model from several threads, and the model's other users see the model
they had. Engine.close() undoes the preparation.

Drafts are scored by an AcceptanceModel: the caller's, or (acceptance="auto", the default of
laser.generate and generate_batch) the engine's own for the call's AcceptConfig, which learns
from every verified tree of every call with that configuration on this model (strict and
relaxed accept differently, so each keeps its own). acceptance=None drafts by pool shares.

State of one call (nothing survives it):
  rows    B slots of _Row (None = idle): the request's sequence, pools and stats, and the
          indexes of its text that loop control and the relaxed rule "fresh" read
          (laser.repeats), extended with every committed token.
  cache   a TreeCache [B, H, capacity, D] per layer; cache.lens[r] == rows[r].n - 1 (the
          last committed token, "pending", is fed at the start of the next verification).
Each step: every row drafts its tree from its own pools; with a cost curve the trees are cut
together (laser._C.cut_trees); one forward over every row's pending + tree at cache column
W = max(lens), per-row positions and 4-D masks; loop control and HF logits processors on its
logits (each position against its own prefix); per-row acceptance in one pass; cache.commit
moves each row's pending + accepted path onto its past. The forward is padded, [B, q], on a
GPU, with the Triton kernels or with sliding-window layers (the cut: one budget for all
rows); for several rows on a CPU it is ragged, [1, N] with the rows back to back, so no
padding is computed and the cut sizes each row's tree by its own chances against the cost of
the whole batch. Finished
rows are refilled from the queue (one prefill forward for all rows freed in a step); once
the queue is empty they leave the batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from laser._C import AcceptanceModel, RetrievalPool, cut_trees, draft_union
from laser.accept import accept_trees
from laser.cache import TreeCache
from laser.config import GLOBAL, OWN, SHARED, AcceptConfig, DraftConfig
from laser.cpu import LinearRoutes, PackedWeights, may_pack, routes_for, sdpa_gqa_forward
from laser.forward import DirectForward
from laser.hf import cache_kwarg, fill_only
from laser.kernels.bits import mask_to_bits
from laser.repeats import NgramIndex, RowText

COST_CONTEXT = 256  # context length the default cost curve is measured after (cost())
FILL_MASK_MAX = 1 << 24  # elements of a direct prefill's mask (64 MiB): one 4,096-token prompt, 8 of 1,448


@dataclass
class DecodeStats:
    steps: int = 0
    new_tokens: int = 0
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted per step
    tree_sizes: list[int] = field(default_factory=list)
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_accept: float = 0.0
    time_cache: float = 0.0
    time_prefill: float = 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean tokens committed per verification step (accepted drafts + the bonus token)."""
        return float(np.mean(self.accepted)) + 1.0 if self.accepted else 0.0

    @property
    def histogram(self) -> np.ndarray:
        """histogram[a] = number of steps that accepted a draft tokens."""
        return np.bincount(np.asarray(self.accepted, dtype=np.int64))

    @property
    def total_time(self) -> float:
        return self.time_prefill + self.time_draft + self.time_verify + self.time_accept + self.time_cache


@dataclass
class Request:
    input_ids: list[int] | np.ndarray
    # shared pool(s): drafts from each, each receives the output (update_pool). A list: the
    # request's group pool first, then pools of wider scope (acceptance source GLOBAL)
    pool: RetrievalPool | list[RetrievalPool] | None = None
    tag: object = None  # returned with the result (e.g. the record id)


@dataclass
class Result:
    tag: object
    tokens: np.ndarray  # generated tokens (prompt excluded)
    stats: DecodeStats = field(default_factory=DecodeStats)
    index: int = -1  # position of the request in the input list


def shared_pools(pool) -> list:
    """A request's `pool` argument as a list: None -> [], a RetrievalPool -> [it], a list or
    tuple of distinct RetrievalPools -> itself; anything else is a TypeError."""
    pools = [] if pool is None else [pool] if isinstance(pool, RetrievalPool) else pool
    if not isinstance(pools, (list, tuple)) or not all(isinstance(p, RetrievalPool) for p in pools):
        raise TypeError(f"pool must be a RetrievalPool, a list of them or None, got {type(pool).__name__}")
    if len({id(p) for p in pools}) != len(pools):
        raise ValueError("pool lists a RetrievalPool twice")
    return list(pools)


def draft_sources(shared: list, local: RetrievalPool, prompt_weight: float) -> list:
    """(pool, weight, AcceptanceModel source slot) a request drafts from: its shared pools at
    weight 1 (the first SHARED, the others GLOBAL), then its own text (OWN) unless weight 0."""
    pairs = [(p, 1.0, SHARED if k == 0 else GLOBAL) for k, p in enumerate(shared)]
    return pairs + ([(local, prompt_weight, OWN)] if prompt_weight > 0 else [])


# ---------------------------------------------------------------- model preparation

@dataclass(frozen=True)
class _Call:
    kernels: bool  # verification attention through the Triton tree kernel
    routes: LinearRoutes | None  # CPU linears by measured route (None: F.linear)


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("laser_call", default=None)
ATTENTION = "laser"


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers AttentionInterface entry of the "laser" implementation (see the module docstring).
    query [B, Hq, q, D], key/value [B, Hkv, T, D]; laser_tree_bits [B, q, ceil(q/64)] and
    laser_tree_lens [B] come as forward kwargs from the engine's kernel path; laser_ragged =
    (gather [B * q], scatter [N]) from its ragged path: query [1, Hq, N, D] holds the rows'
    tokens back to back, key/value [B, Hkv, T, D] every row's cache, attention_mask the padded
    [B, 1, q, T]; the queries are laid out padded for one attention call and taken back."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    call = _CALL.get()
    bits, lens = kwargs.pop("laser_tree_bits", None), kwargs.pop("laser_tree_lens", None)
    ragged = kwargs.pop("laser_ragged", None)
    if call is not None and ragged is not None:  # rows back to back: attention on the rows padded, one call
        gather, scatter = ragged  # [B * q] token of each padded slot (padding: any); [N] slot of each token
        B, _, q, _ = attention_mask.shape
        Hq, D = query.shape[1], query.shape[3]
        padded = query[0].index_select(1, gather).view(Hq, B, q, D).transpose(0, 1)  # [B, Hq, q, D]
        out = sdpa_gqa_forward(module, padded, key, value, attention_mask, dropout=dropout, scaling=scaling,
                               **kwargs)[0]  # [B, q, Hq, D]
        return out.reshape(B * q, Hq, D).index_select(0, scatter)[None], None  # [1, N, Hq, D]
    if call is not None and call.kernels and bits is not None and query.shape[2] == bits.shape[-2]:
        from laser.kernels.tree_attention import tree_attention

        out = tree_attention(query, key, value, bits, scaling, lens=lens)  # [B, Hq, q, D]
        return out.transpose(1, 2).contiguous(), None
    if call is not None and query.device.type == "cpu":
        return sdpa_gqa_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _linear_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    call = _CALL.get()
    if call is not None and call.routes is not None:
        return call.routes.linear(x, module.weight, module.bias)
    return F.linear(x, module.weight, module.bias)


class Engine:
    """A model prepared for LASER decoding (see the module docstring). Engine(model) is one
    object per model until close(). Thread-safe: one Engine serves concurrent calls; each
    call holds its own cache and rows."""

    _engines: "weakref.WeakKeyDictionary[torch.nn.Module, Engine]" = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __new__(cls, model):
        """The model's engine: prepared on first use, the same object until close()."""
        with cls._lock:
            engine = cls._engines.get(model)
            if engine is None:
                engine = super().__new__(cls)
                engine._prepare(model)
                cls._engines[model] = engine
            return engine

    def _prepare(self, model) -> None:
        self.model = model
        self.kv = cache_kwarg(model)
        self.dtype = next(model.parameters()).dtype
        self.vocab = model.get_output_embeddings().weight.shape[0]
        text = model.config.get_text_config()
        types = set(getattr(text, "layer_types", None) or ["full_attention"])
        if not types <= {"full_attention", "sliding_attention"}:
            raise ValueError(f"LASER supports full and sliding-window attention layers, not {sorted(types)}")
        # sliding-window layers get their own mask (the model takes a dict of masks by layer type)
        self.window = getattr(text, "sliding_window", None) if "sliding_attention" in types else None
        self._before = model.config._attn_implementation
        self.attention = self._before == "sdpa" and getattr(model, "_supports_attention_backend", False)
        if self.attention:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

            AttentionInterface.register(ATTENTION, _attention)
            AttentionMaskInterface.register(ATTENTION, sdpa_mask)
            model.set_attn_implementation(ATTENTION)
        # linears whose forward is already set on the instance (accelerate's hooks) are left alone
        self._linears = [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" not in m.__dict__]
        for m in self._linears:
            m.forward = _linear_forward.__get__(m)
        # verification forwards of Llama-architecture models on a CPU: LASER's flat forward (laser/forward.py)
        self.direct = DirectForward.of(model) if self.attention else None
        self._routes: dict[int, LinearRoutes] = {}  # by torch thread count
        self._models: dict[AcceptConfig, AcceptanceModel] = {}  # acceptance="auto": one per AcceptConfig
        self.packs = PackedWeights()  # the "packed" and "tiled" products' weight copies, shared by every thread count
        self._costs: dict[str, np.ndarray] = {}  # cost(): by shape key and batch size

    def routes(self) -> LinearRoutes | None:
        """The CPU linear routes at the current thread count (None on a GPU). One thread is routed
        too: the tiled product beats F.linear there as well (1 / 9 rows: 19.5 / 24.5 ms against
        35.2 / 62.0 for the 210 layer linears of a SmolLM2 forward, AMD EPYC VM)."""
        threads = torch.get_num_threads()
        if self.model.device.type != "cpu":
            return None
        if threads not in self._routes:
            weights = {id(m.weight): m.weight for m in self._linears if m.weight.dim() == 2}
            shapes = {tuple(w.shape) for w in weights.values()}
            size = sum(w.numel() * w.element_size() for w in weights.values())
            routes = routes_for(shapes, 2 * threads, packs=self.packs)
            kinds = routes.copy_kinds()
            if len(kinds) > 1 and not may_pack(size * len(kinds)) and may_pack(size):
                routes, kinds = routes.one_copy("tiled"), {"tiled"}  # the rows of decode steps win
            if kinds and not may_pack(size * len(kinds)):
                warnings.warn(f"LASER: no CPU copies ({', '.join(sorted(kinds))}) of this model's {size / 2**30:.1f} GiB "
                              "of linear weights (they would take more than half of the free memory, or "
                              "LASER_CPU_PACK=0): those linears run oneDNN on the weights in place",
                              RuntimeWarning, stacklevel=3)
                routes.packs = None
            self._routes[threads] = routes
        return self._routes[threads]

    def cost(self, batch: int = 1) -> np.ndarray:
        """The verification cost curve (laser.calibrate) of this model's shape on this machine at
        `batch` rows: what sizes each step's trees where a call's DraftConfig has no cost. Measured
        once (a notice on stderr first) and kept in $LASER_CACHE/cost-curves.json by machine,
        thread count, device and model shape, so every later call and process takes the same one."""
        key = f"{self._shape_key()} | batch {batch}"
        with self._lock:
            if key in self._costs:
                return self._costs[key]
        from laser.cpu import _file_lock, _machine_key, write_cache
        from laser.decode import calibrate
        from laser.model import cache_dir

        path = cache_dir() / "cost-curves.json"
        machine = _machine_key(2 * torch.get_num_threads()) if self.model.device.type == "cpu" else \
            torch.cuda.get_device_name(self.model.device)
        full = f"{machine} | {key}"
        with _file_lock(cache_dir() / "cost-curves.lock"):
            try:
                known = json.loads(path.read_text())
            except (OSError, ValueError):
                known = {}
            curve = known.get(full) if isinstance(known, dict) else None
            if not (isinstance(curve, list) and curve and all(isinstance(c, (int, float)) and c > 0 for c in curve)):
                t0 = time.perf_counter()
                print(f"laser: measuring the verification cost of this {type(self.model).__name__} at {batch} row(s) "
                      f"on this machine, once (a few seconds; kept in {path})", file=sys.stderr, flush=True)
                cfg = self.model.config
                limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1 << 20
                context = max(1, min(COST_CONTEXT, limit - 65))  # 64 nodes + the pending token fit the positions
                curve = [float(c) for c in calibrate(self.model, context_len=context, batch=batch)]
                known = known if isinstance(known, dict) else {}
                known[full] = curve
                write_cache(path, known)
                print(f"laser: measured in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        with self._lock:
            return self._costs.setdefault(key, np.asarray(curve, dtype=np.float64))

    def _shape_key(self) -> str:
        """What a forward's cost depends on beyond the machine: architecture, sizes, dtype, device, threads."""
        c = self.model.config.get_text_config()
        sizes = [getattr(c, f, None) for f in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                "num_attention_heads", "num_key_value_heads", "vocab_size")]
        return (f"{type(self.model).__name__} {sizes} {self.dtype} | {self.model.device} | "
                f"threads {torch.get_num_threads()} | window {self.window}")

    def draft_config(self, cfg: DraftConfig, batch: int) -> DraftConfig:
        """cfg with its cost curve: cfg's own, else this model's on this machine (cost())."""
        if cfg.cost is not None or cfg.budget == 0 or not cfg.auto_cost:
            return cfg
        return dataclasses.replace(cfg, cost=self.cost(batch))

    def close(self) -> None:
        """Give the model back as it was: its attention implementation, its linears' forward."""
        with self._lock:
            for m in self._linears:
                m.__dict__.pop("forward", None)
            self._linears = []
            self.direct = None
            self.packs.clear()
            if self.attention:
                self.model.set_attn_implementation(self._before)
                self.attention = False
            if Engine._engines.get(self.model) is self:
                del Engine._engines[self.model]

    @contextlib.contextmanager
    def active(self, kernels: bool = False):
        """Forwards of the model in this block (this thread) run LASER's attention and linears
        (kernels: callers pass it already checked against self.attention and self.window, as run() does).
        Keep the block free of yields: a generator suspended inside it would leave it set."""
        token = _CALL.set(_Call(kernels=kernels, routes=self.routes()))
        try:
            yield
        finally:
            _CALL.reset(token)

    def acceptance(self, acceptance, accept: AcceptConfig) -> AcceptanceModel | None:
        """A call's `acceptance` argument resolved: "auto" -> this engine's model for `accept`
        (made on first use), an AcceptanceModel or None -> itself; anything else is a TypeError."""
        if isinstance(acceptance, str) and acceptance == "auto":
            with self._lock:
                return self._models.setdefault(accept, AcceptanceModel())
        if acceptance is not None and not isinstance(acceptance, AcceptanceModel):
            raise TypeError(f"acceptance must be an AcceptanceModel, 'auto' or None, got {acceptance!r}")
        return acceptance

    # ------------------------------------------------------------ checks

    def check(self, ids, max_new_tokens: int, cfg: DraftConfig) -> np.ndarray:
        """One request's ids as int32 numpy [L], or a clear error."""
        x = torch.as_tensor(np.asarray(ids) if isinstance(ids, (list, tuple)) else ids)
        if x.dim() == 2 and x.shape[0] == 1:
            x = x[0]
        if x.dim() != 1 or x.numel() == 0:
            raise ValueError("input_ids must be a non-empty 1-D sequence or a [1, L] tensor")
        if x.dtype.is_floating_point or x.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integers, got {x.dtype}")
        bad = (x < 0) | (x >= self.vocab)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"token id {int(x[i])} at position {i} is out of range [0, {self.vocab})")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        cfg_ = self.model.config
        limit = getattr(cfg_, "max_position_embeddings", None) or getattr(cfg_, "n_positions", None)
        need = x.numel() + max_new_tokens + cfg.max_depth
        if limit is not None and need > limit:
            raise ValueError(f"prompt of {x.numel()} tokens + max_new_tokens {max_new_tokens} (+ draft depth "
                             f"{cfg.max_depth}) exceeds the model's context window of {limit} tokens")
        return x.cpu().numpy().astype(np.int32)

    def eos_ids(self, eos_token_id) -> np.ndarray:
        if isinstance(eos_token_id, str):
            if eos_token_id != "auto":
                raise ValueError(f"eos_token_id must be an id, a list of ids, None or 'auto', got {eos_token_id!r}")
            eos_token_id = self.model.generation_config.eos_token_id
        return np.asarray([] if eos_token_id is None else np.atleast_1d(eos_token_id), dtype=np.int64)

    # ------------------------------------------------------------ the loop

    @torch.no_grad()
    def run(self, prompts: list[np.ndarray], pools: list, B: int, max_new_tokens: int, accept: AcceptConfig,
            eos: np.ndarray, update_pool: bool, cfg: DraftConfig, kernels: bool, tags=None, processor=None,
            stopping=None, streamer=None, acceptance: AcceptanceModel | None = None,
            learn_into: AcceptanceModel | None = None) -> Iterator[Result]:
        """Decode checked prompts B rows at a time; yields each Result as its row finishes.
        pools[i]: prompt i's shared pools, a list (shared_pools() of a request's `pool`).
        processor / stopping: HF LogitsProcessorList / StoppingCriteriaList (plain lists too), or None.
        acceptance: draft by this model's chances; every verified tree teaches learn_into
        (default: acceptance itself, learning online)."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        if isinstance(processor, list) and not isinstance(processor, LogitsProcessorList):
            processor = LogitsProcessorList(processor)
        if isinstance(stopping, list) and not isinstance(stopping, StoppingCriteriaList):
            stopping = StoppingCriteriaList(stopping)
        kernels = kernels and self.attention and self.window is None
        yield from _Loop(self, prompts, pools, B, max_new_tokens, accept, eos, update_pool, cfg, tags, processor,
                         stopping, streamer, kernels, acceptance, learn_into).run()

    def forward(self, kernels: bool, **inputs):
        """One forward of the model on LASER's route (prefills; verifications go through verify())."""
        with self.active(kernels):
            return self.model(**inputs)

    def fill(self, ids: torch.Tensor, pos: torch.Tensor, lengths: list[int], mask, cache: TreeCache) -> None:
        """A prefill forward inside cache.filling(): ids, pos [b, L], row j's first lengths[j] tokens
        real (right-padded); mask: the model's own (2-D, or per layer type with sliding windows).
        Through DirectForward where verify() would take it (it takes no sliding windows), on a causal
        additive mask [b, 1, L, L] of at most FILL_MASK_MAX elements, with no logits; else through
        the model (SDPA's causal path builds no mask), keeping one logits row.
        On the Intel Xeon VM, SmolLM2 writing one token after a 309-token prompt: 334 ms against
        377 through the model (its C++ attention skips each chunk's later, hidden keys: 0.87 ms a
        layer against SDPA's 1.36; no module calls; the products, 229 ms, as before)."""
        direct, (b, L) = self.direct, ids.shape
        if direct is not None and ids.device.type == "cpu" and b * L * L <= FILL_MASK_MAX and direct.runnable():
            seen = np.tri(L, dtype=bool)[None] & (np.arange(L)[None, None, :] < np.array(lengths)[:, None, None])
            additive = np.where(seen, np.float32(0), np.finfo(np.float32).min)[:, None]  # [b, 1, L, L]
            with self.active(False):
                direct(_CALL.get().routes, ids, pos, torch.from_numpy(additive), cache, logits=False)
            return
        self.forward(False, input_ids=ids, position_ids=pos, attention_mask=mask, **{self.kv: cache}, use_cache=True,
                     **fill_only(self.model))

    def verify(self, kernels: bool, ids: torch.Tensor, pos: torch.Tensor, mask, cache: TreeCache,
               **extra) -> torch.Tensor:
        """Logits of one verification forward (the loop's only other call of the model): through
        DirectForward where it applies (a supported float32 model on a CPU, without kernels or
        hooks), else through the model."""
        direct = self.direct
        if direct is not None and not kernels and ids.device.type == "cpu" and direct.runnable():
            with self.active(kernels):
                return direct(_CALL.get().routes, ids, pos, mask, cache, **extra)
        return self.forward(kernels, input_ids=ids, position_ids=pos, attention_mask=mask, **{self.kv: cache},
                            use_cache=True, **extra).logits


@dataclass
class _Row:
    index: int  # the request's position
    seq: np.ndarray  # int32 [L + max_new + 1]: prompt + committed tokens; seq[:n] valid, seq[n-1] pending
    L: int
    n: int
    local: RetrievalPool  # this request's prompt and output (prompt lookup)
    pools: list  # what it drafts from: the shared pools (weight 1) and local (prompt_weight)
    weights: list
    sources: list  # AcceptanceModel source slot of each: SHARED, GLOBAL or OWN
    budget: int
    shared: list  # the request's shared pools (updated with its output under update_pool)
    stats: DecodeStats
    text: RowText | None  # loop control's index of seq[:n] (None: off)
    fresh: NgramIndex | None  # relaxed rule "fresh": n-grams of seq[:n] (None: not that rule)

    @property
    def texts(self) -> list:
        """The indexes of seq[:n] that grow as tokens commit."""
        return [t for t in (self.text, self.fresh) if t is not None]

    @property
    def new(self) -> int:
        return self.n - self.L


class _Loop:
    """One call's loop over B rows (see the module docstring)."""

    def __init__(self, engine: Engine, prompts, pools, B, max_new, accept, eos, update_pool, cfg, tags, processor,
                 stopping, streamer, kernels, acceptance, learn_into):
        self.e, self.prompts, self.pools, self.tags = engine, prompts, pools, tags
        self.acceptance = acceptance
        self.learner = learn_into if learn_into is not None else acceptance
        self.max_new, self.accept, self.eos, self.update_pool, self.cfg = max_new, accept, eos, update_pool, cfg
        self.processor, self.stopping, self.streamer = processor, stopping, streamer
        self.queue = deque(range(len(prompts)))
        capacity = max(p.size for p in prompts) + max_new + cfg.budget + 1  # widest block end: W + q
        self.cache = TreeCache.for_model(engine.model, B, capacity)
        self.rows: list[_Row | None] = [None] * B
        self.kernels = kernels  # Triton tree attention in verification
        # several rows on a CPU, through LASER's attention: their blocks back to back (ragged), no
        # padding computed; the cut sizes each row's tree on its own (else padded [B, q])
        self.ragged = (B > 1 and engine.model.device.type == "cpu" and engine.attention and not kernels
                       and engine.window is None)

    def run(self) -> Iterator[Result]:
        cache, cfg = self.cache, self.cfg
        model = self.acceptance
        drafting = cfg.acceptance_args(model)  # the same for every step
        self.start(list(range(len(self.rows))))
        while any(row is not None for row in self.rows):
            t0 = time.perf_counter()
            # 1. draft: each row's tree from its own pools; one cost-aware budget for all
            trees = [None if row is None else
                     draft_union(row.pools, row.weights, row.seq[: row.n], budget=row.budget, max_depth=cfg.max_depth,
                                 min_match=cfg.min_match, max_match=cfg.max_match, cost=cfg.cost,
                                 sources=row.sources, **drafting) for row in self.rows]
            if cfg.cost is not None and len(trees) > 1:
                trees = cut_trees(trees, cfg.cost, ragged=self.ragged)
            # relaxed rule "fresh": the nodes that may be accepted without being the argmax
            relax_ok = [None if row is None or row.fresh is None else ~row.fresh.repeats(t)
                        for row, t in zip(self.rows, trees)] if self.accept.fresh else None
            W = cache.begin_block()
            lens = cache.lens[: len(self.rows)]
            pending = np.array([row.seq[row.n - 1] if row else 0 for row in self.rows])
            ids, pos, mask, extra, starts = self.verify_inputs(pending, trees, lens, W)
            t1 = time.perf_counter()
            # 2. verify: one forward over [B, q] (ragged: [1, N]); logits [B, q, V] ([1, N, V]) in the model's dtype
            logits = self.e.verify(self.kernels, ids, pos, mask, cache, **extra)
            if self.processor is not None or self.accept.loop_control:
                logits = self.process(logits, trees, starts)
            t2 = time.perf_counter()
            # 3. accept: longest agreeing root path + the bonus token per row, cut at EOS / max_new_tokens
            judged = accept_trees(logits, trees, self.accept.mode, self.accept.top_k, self.accept.min_prob, self.eos,
                                  [self.max_new - row.new if row else 0 for row in self.rows], starts, relax_ok)
            for r, (row, j) in enumerate(zip(self.rows, judged)):
                if row is not None and self.stopping is not None:
                    if cut := _stop_at(self.stopping, row.seq, row.n, j[1]):
                        judged[r] = (j[0], j[1][:cut], True)
            t3 = time.perf_counter()
            # 4. commit: each row's pending + accepted path (block columns W + keep) onto its past
            moves = []  # (row, block column, destination column) per kept token
            for r, j in enumerate(judged):
                if j is not None:
                    path, out, _ = j
                    keep = np.concatenate([[0], path[: out.size - 1] + 1])  # pending + the committed path's nodes
                    moves += [(r, W + k, lens[r] + i) for i, k in enumerate(keep)]
            if moves:
                cache.commit(*np.array(moves, dtype=np.int64).T)
            t4 = time.perf_counter()
            done = []
            for r, (row, t, j) in enumerate(zip(self.rows, trees, judged)):
                if row is None:
                    continue
                path, out, stop = j
                if self.learner is not None:  # the path's committed nodes (out = them + a bonus, or cut)
                    self.learner.observe(t, path[: out.size])
                row.local.extend(row.seq[: row.n], out)
                for text in row.texts:
                    text.extend(out)
                if self.update_pool:
                    for pool in row.shared:
                        pool.extend(row.seq[row.L : row.n], out)  # windows inside the output only
                row.seq[row.n : row.n + out.size] = out
                row.n += out.size
                if cache.lens[r] != row.n - 1:
                    raise RuntimeError(f"KV cache row {r} holds {cache.lens[r]} positions, expected {row.n - 1}")
                if self.streamer is not None:
                    self.streamer.put(torch.from_numpy(out.astype(np.int64)))
                st = row.stats
                st.steps += 1
                st.accepted.append(out.size - 1)
                st.tree_sizes.append(len(t))
                st.time_draft += t1 - t0
                st.time_verify += t2 - t1
                st.time_accept += t3 - t2
                st.time_cache += t4 - t3
                if stop or row.new >= self.max_new:
                    st.new_tokens = row.new
                    tag = self.tags[row.index] if self.tags is not None else None
                    done.append(Result(tag, row.seq[row.L : row.n].copy(), st, row.index))
                    self.rows[r] = None
            free = [r for r, row in enumerate(self.rows) if row is None]
            if free:
                cache.reset_rows(free)
                self.start(free)
            yield from done  # rows finished this step, in row order

    def start(self, free: list[int]) -> None:
        """Fill free rows with the next queued prompts (one prefill forward for all of them);
        once the queue is empty, idle rows leave the batch."""
        take = [(r, self.queue.popleft()) for r in free[: len(self.queue)]]
        if take:
            t0 = time.perf_counter()
            prompts = [self.prompts[i] for _, i in take]
            self.prefill([r for r, _ in take], prompts)
            each = (time.perf_counter() - t0) / len(take)
            cfg = self.cfg
            for (r, i), ids in zip(take, prompts):
                L = ids.size
                seq = np.zeros(L + self.max_new + 1, dtype=np.int32)
                seq[:L] = ids
                shared = self.pools[i]
                local = RetrievalPool(max_depth=max((p.max_depth for p in shared), default=12))
                local.insert(ids)
                pairs = draft_sources(shared, local, cfg.prompt_weight)
                a = self.accept
                counted = ids if a.loop_scope == "all" else ids[:0]  # the text loop control counts, so far
                text = RowText(counted, self.e.vocab, a.no_repeat_ngram, a.repetition_penalty) if a.loop_control else None
                fresh = NgramIndex(a.fresh_ngram, ids) if a.fresh else None
                # with neither pool: budget 0, one token per step (draft_union needs a pool: local)
                self.rows[r] = _Row(i, seq, L, L, local, [p for p, *_ in pairs] or [local],
                                    [w for _, w, _ in pairs] or [1.0], [k for *_, k in pairs] or [OWN],
                                    cfg.budget if pairs else 0, shared, DecodeStats(time_prefill=each), text, fresh)
        if not self.queue and any(row is None for row in self.rows) and any(self.rows):
            keep = [r for r, row in enumerate(self.rows) if row is not None]
            self.cache.keep_rows(keep)
            self.rows = [self.rows[r] for r in keep]

    def prefill(self, rows: list[int], prompts: list[np.ndarray]) -> None:
        """Cache rows[j] <- prompts[j][:-1] (the last prompt token is pending), one forward.
        Right-padded to one length: a causal mask keeps every real token off the padding. The
        model builds it from a 2-D mask (SDPA's causal path where nothing is padded), except
        with sliding-window layers, which get explicit masks per layer type."""
        lengths = [p.size - 1 for p in prompts]
        L = max(lengths)
        if L == 0:
            self.cache.lens[rows] = 0
            return
        ids = np.zeros((len(rows), L), dtype=np.int64)
        for j, p in enumerate(prompts):
            ids[j, : p.size - 1] = p[:-1]
        pos = np.broadcast_to(np.arange(L), (len(rows), L))
        device = self.e.model.device
        if self.e.window is None:
            mask = torch.from_numpy((np.arange(L)[None, :] < np.array(lengths)[:, None]).astype(np.int64)).to(device)
        else:
            mask = self.masks(np.broadcast_to(np.tril(np.ones((L, L), dtype=bool)), (len(rows), L, L)), pos, pos)
        with self.cache.filling(rows, lengths):
            self.e.fill(torch.from_numpy(ids).to(device), torch.from_numpy(pos.copy()).to(device), lengths, mask,
                        self.cache)

    def masks(self, visible: np.ndarray, qpos: np.ndarray, kpos: np.ndarray):
        """Additive 4-D mask [B, 1, q, T] from visible [B, q, T]; with sliding-window layers, a dict
        by layer type whose sliding mask also hides keys at positions <= qpos - window."""
        e = self.e
        device = e.model.device

        def additive(v: np.ndarray) -> torch.Tensor:
            m = torch.zeros(v.shape[0], 1, *v.shape[1:], dtype=e.dtype, device=device)
            return m.masked_fill_(~torch.from_numpy(np.require(v, requirements=["C", "W"])).to(device)[:, None], torch.finfo(e.dtype).min)

        full = additive(visible)
        if e.window is None:
            return full
        near = (qpos[:, :, None] - kpos[:, None, :]) < e.window
        return {"full_attention": full, "sliding_attention": additive(visible & near)}

    def verify_inputs(self, pending: np.ndarray, trees: list, lens: np.ndarray, W: int):
        """One verification forward's inputs over B rows of [pending] + tree.

        pending [B]: each row's last committed token; trees[r] None = an idle row; lens [B]:
        positions cached per row; the block goes at cache column W = max(lens). With q = 1 + the
        largest tree: input_ids [B, q] (pending, then the tree in DFS order, zero-padded),
        position_ids [B, q] (lens[r] + depth), masks over [B, q, W + q]: row r sees its own
        past (columns < lens[r]), the pending column W and its ancestors inside the block;
        padded nodes see only themselves and pending, so every row stays finite. Kernel path:
        the block's tree masks as bits [B, q, ceil(q/64)] and lens. Ragged path: input_ids and
        position_ids [1, N], the live rows' 1 + len(tree) tokens back to back (idle rows none),
        the same padded masks, and the cache placed to match. Also returns starts: row r's first
        position in the ragged sequence (None when padded).
        """
        B = len(trees)
        q = 1 + max(len(t) for t in trees if t is not None)
        ids = np.zeros((B, q), dtype=np.int64)
        pos = np.zeros((B, q), dtype=np.int64)
        visible = np.zeros((B, q, W + q), dtype=bool)
        visible[:, :, W] = True
        for r, t in enumerate(trees):
            if t is None:
                continue
            m = len(t)
            ids[r, 0], ids[r, 1 : m + 1] = pending[r], t.tokens
            pos[r, :] = lens[r]
            pos[r, 1 : m + 1] += t.depth
            visible[r, :, : lens[r]] = True
            visible[r, 1 : m + 1, W + 1 : W + 1 + m] = t.mask
            visible[r, m + 1 :, W + 1 + m :] = np.eye(q - 1 - m, dtype=bool)
        kpos = None if self.e.window is None else np.concatenate([np.broadcast_to(np.arange(W), (B, W)), pos], axis=1)
        device = self.e.model.device
        mask = self.masks(visible, pos, kpos)
        extra, starts = {}, None
        if self.kernels and self.e.window is None:
            extra = {"laser_tree_bits": mask_to_bits(visible[:, :, W:]).to(device),
                     "laser_tree_lens": torch.from_numpy(lens.astype(np.int32)).to(device)}
        if self.ragged:  # the live rows' pending + tree back to back; idle rows take no tokens
            counts = np.array([0 if t is None else len(t) + 1 for t in trees])
            starts = list(np.concatenate([[0], np.cumsum(counts)[:-1]]))
            keep = np.arange(q)[None, :] < counts[:, None]  # [B, q]
            ids, pos = ids[keep][None], pos[keep][None]
            self.cache.place(counts)
            scatter = np.flatnonzero(keep)  # [N] padded slot r * q + i of each token
            gather = np.zeros(B * q, dtype=np.int64)  # [B * q] token of each slot (padding: token 0)
            gather[scatter] = np.arange(scatter.size)
            both = torch.from_numpy(np.concatenate([gather, scatter])).to(device)
            extra = {"laser_ragged": (both[: B * q], both[B * q :])}
        return torch.from_numpy(ids).to(device), torch.from_numpy(pos).to(device), mask, extra, starts

    def process(self, logits: torch.Tensor, trees: list, starts: list[int] | None) -> torch.Tensor:
        """Loop control, then HF logits processors, on every row, each verification position
        seeing its own prefix (HF's order: its built-in processors, then the caller's).
        logits [B, q, V], or [1, N, V] with row r from starts[r] (ragged)."""
        out = logits.float()  # HF's processors see fp32 scores, as in its own generate
        flat = out.view(-1, out.shape[-1])
        for r, (row, t) in enumerate(zip(self.rows, trees)):
            if row is not None:
                at = r * out.shape[1] if starts is None else starts[r]
                if row.text is not None:
                    row.text.apply(flat[at : at + len(t) + 1], t)
                if self.processor is not None:
                    flat[at : at + len(t) + 1] = _process(flat[at : at + len(t) + 1], row.seq, row.n, t, self.processor)
        return out


def _process(logits: torch.Tensor, seq: np.ndarray, n: int, tree, processor) -> torch.Tensor:
    """logits [m + 1, V] fp32 of one row: position 0 continues seq[:n], position i + 1 continues
    seq[:n] + the path to tree node i. Positions of equal depth have equal prefix lengths
    and go through the processor as one batch."""
    device = logits.device
    base = torch.from_numpy(seq[:n].astype(np.int64)).to(device)
    out = logits.clone()
    out[:1] = processor(base[None], logits[:1])
    if len(tree):
        depth, paths_of = tree.depth, _paths_to_nodes(tree)
        for d in range(1, int(depth.max()) + 1):
            nodes = np.flatnonzero(depth == d)
            prefix = torch.from_numpy(tree.tokens[paths_of[nodes, :d]].astype(np.int64)).to(device)
            ids = torch.cat([base.expand(len(nodes), n), prefix], dim=1)
            at = torch.from_numpy(nodes + 1).to(device)
            out[at] = processor(ids, logits[at])
    return out


def _paths_to_nodes(tree) -> np.ndarray:
    """[m, max_depth] DFS indices of each node's root path (-1 padded)."""
    m = len(tree)
    out = np.full((m, int(tree.depth.max())), -1, dtype=np.int64)
    for i in range(m):  # parents precede children: copy the parent's path, append self
        p = tree.parents[i]
        if p >= 0:
            out[i] = out[p]
        out[i, tree.depth[i] - 1] = i
    return out


def _stop_at(stopping, seq: np.ndarray, n: int, out: np.ndarray) -> int:
    """Tokens of `out` to keep: up to and including the first one after which `stopping` fires (0 = none fired)."""
    full = torch.from_numpy(np.concatenate([seq[:n], out]).astype(np.int64))[None]  # one copy per step; views below
    for j in range(out.size):
        if bool(torch.as_tensor(stopping(full[:, : n + j + 1], None)).any()):
            return j + 1
    return 0
