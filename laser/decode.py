"""The LASER decode loop: draft -> verify -> accept -> commit, for any HF causal LM.

State per call (nothing survives between calls):
  seq     int32 numpy [L + max_new + 1]: prompt + committed tokens; seq[:n] is valid.
  cache   the model's own KV cache; invariant: cache length == n - 1 (the last committed
          token, "pending", is fed at the start of the next verification pass).
  local   a private RetrievalPool of this request's prompt and output (prompt lookup).
The shared `pool` only ever receives generated tokens, never the prompt.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from laser import RetrievalPool, draft_union
from laser.accept import accept_trees, kernels_forced
from laser.cpu import register_sdpa_gqa, route_linears
from laser.hf import cache_kwarg, cache_length, compact_cache, fill_only, new_cache
from laser.kernels.bits import mask_to_bits


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
class DecodeOutput:
    sequences: torch.Tensor  # [B, L + new] int64, prompt included and padded like HF generate's (B = 1: unpadded)
    stats: DecodeStats


@dataclass
class DraftConfig:
    # budget, max_depth, min_match and max_match default as RetrievalPool.draft / draft_union do
    budget: int = 32  # hard cap on tree nodes per step
    max_depth: int = 10  # cap on draft depth below the context
    # Shortest context suffix a draft may start from. A 1-token suffix is a weak context: its
    # trees were accepted at about half the rate the pool counts predict, so the cost cut
    # kept trees that did not pay. Side by side on 10 prompts (benchmarks/RESULTS.md): strict
    # 1.82x vs 1.56x greedy (offline replay), relaxed 2.02x vs 1.87x with 2 over 1.
    min_match: int = 2
    max_match: int = 4
    prompt_weight: float = 8.0  # weight of this request's own prompt/output pool; 0 turns prompt lookup off
    cost: np.ndarray | None = None  # cost[b] = verify time for b nodes; cuts each tree (see calibrate)
    # The cut trusts pool statistics times a fixed confidence. A per-call online estimate
    # (accepted / predicted, decayed) was tried and removed: it shrank trees too far, and a
    # tree cut to zero stops it from learning (benchmarks/RESULTS.md).
    confidence: float = 1.0


def _draft_sources(pool: RetrievalPool | None, prompt: np.ndarray, cfg: DraftConfig):
    """Where one request drafts from: (local, pools, weights, budget).

    local is the request's private pool, holding its prompt (its output is streamed in by
    the caller). The request drafts from the shared pool (weight 1) and from local
    (cfg.prompt_weight; 0 leaves it out); with neither, budget 0: one token per step.
    """
    local = RetrievalPool(max_depth=pool.max_depth if pool is not None else 12)
    local.insert(prompt)
    pairs = [(p, w) for p, w in ((pool, 1.0), (local, cfg.prompt_weight)) if p is not None and w > 0]
    if not pairs:
        return local, [local], [1.0], 0
    return local, [p for p, _ in pairs], [w for _, w in pairs], cfg.budget


def _verify_inputs(pending: np.ndarray, trees: list, lens: np.ndarray, dtype, device):
    """Inputs of one verification forward over B rows of [pending] + tree (generate: B = 1).

    pending [B]: each row's last committed token (not in the cache yet); trees[r] None = an
    idle row; lens [B]: positions cached per row. With q = 1 + the largest tree and
    W = max(lens), returns input_ids [B, q] (pending, then the tree in DFS order, zero-
    padded), position_ids [B, q] (lens[r] + depth), a 4-D additive mask [B, 1, q, W + q] and
    its bool form visible [B, q, W + q]: row r sees its own past (columns < lens[r]), the
    pending column W and its ancestors inside the block; padded nodes see only themselves
    and pending, so every row stays finite.
    """
    B = len(trees)
    q = 1 + max(len(t) for t in trees if t is not None)
    W = int(lens.max())
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
    mask = torch.zeros(B, 1, q, W + q, dtype=dtype, device=device)
    mask.masked_fill_(~torch.from_numpy(visible).to(device)[:, None], torch.finfo(dtype).min)
    return torch.from_numpy(ids).to(device), torch.from_numpy(pos).to(device), mask, visible


@contextlib.contextmanager
def _forwards(model, kernels: bool):
    """How the model runs for one decode call, restored after it. Attention: the Triton
    tree kernel if `kernels` (CUDA); on a CPU where the model runs transformers' SDPA, the
    same SDPA with grouped-query heads read in place. Linears on a multi-core CPU: routed
    per shape (laser.cpu). Yields whether the tree kernel is on."""
    before = model.config._attn_implementation
    name = None
    if kernels:
        from laser.kernels.tree_attention import register

        name = register()
    elif model.device.type == "cpu" and before == "sdpa" and getattr(model, "_supports_attention_backend", False):
        name = register_sdpa_gqa()  # (models outside the attention interface would only log a warning)
    with contextlib.ExitStack() as stack:
        if name is not None:
            model.set_attn_implementation(name)
            stack.callback(model.set_attn_implementation, before)
        stack.enter_context(route_linears(model))
        yield kernels


def _process(logits: torch.Tensor, seq: np.ndarray, n: int, tree, processor) -> torch.Tensor:
    """Apply HF logits processors row by row, each row seeing its own prefix.

    Row 0 continues seq[:n]; row i + 1 continues seq[:n] + the path to tree node i. Rows of
    equal depth have equal prefix lengths and go through the processor as one batch.
    """
    if processor is None:
        return logits  # acceptance reads any float dtype: no fp32 copy of [m+1, V]
    logits = logits.float()  # HF's processors see fp32 scores, as in its own generate
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
            rows = torch.from_numpy(nodes + 1).to(device)
            out[rows] = processor(ids, logits[rows])
    return out


def _paths_to_nodes(tree) -> np.ndarray:
    """[m, max_depth] DFS indices of each node's root path (-1 padded)."""
    m = len(tree)
    width = int(tree.depth.max())
    out = np.full((m, width), -1, dtype=np.int64)
    for i in range(m):  # parents precede children: copy the parent's path, append self
        p = tree.parents[i]
        if p >= 0:
            out[i] = out[p]
        out[i, tree.depth[i] - 1] = i
    return out


def _check_args(model, ids: torch.Tensor, max_new_tokens: int, mode: str, top_k: int, min_prob: float, cfg: DraftConfig):
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"laser.generate decodes one sequence; got a batch of {ids.shape[0]}")
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError("input_ids must be a non-empty 1-D sequence or a [1, L] tensor")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integers, got {ids.dtype}")
    vocab = model.get_output_embeddings().weight.shape[0]
    bad = (ids < 0) | (ids >= vocab)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"token id {int(ids[i])} at position {i} is out of range [0, {vocab})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    need = ids.numel() + max_new_tokens + cfg.max_depth
    if limit is not None and need > limit:
        raise ValueError(
            f"prompt of {ids.numel()} tokens + max_new_tokens {max_new_tokens} (+ draft depth {cfg.max_depth}) "
            f"exceeds the model's context window of {limit} tokens"
        )
    if mode not in ("strict", "relaxed"):
        raise ValueError(f"mode must be 'strict' or 'relaxed', got {mode!r}")
    if not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if not (0.0 <= min_prob <= 1.0):
        raise ValueError(f"min_prob must be in [0, 1], got {min_prob!r}")
    if not 1 <= cfg.min_match <= cfg.max_match:
        raise ValueError(f"need 1 <= min_match <= max_match, got {cfg.min_match} and {cfg.max_match}")
    if cfg.budget < 0 or cfg.max_depth < 1 or cfg.prompt_weight < 0:
        raise ValueError("budget must be >= 0, max_depth >= 1 and prompt_weight >= 0")
    return ids


@torch.no_grad()
def generate(
    model,
    input_ids,
    pool: RetrievalPool | None = None,
    max_new_tokens: int = 128,
    mode: str = "strict",
    top_k: int = 2,
    min_prob: float = 0.1,
    eos_token_id: int | list[int] | None | str = "auto",
    update_pool: bool = True,
    draft: DraftConfig | None = None,
    logits_processor=None,
    use_kernels: bool | None = None,
    stopping_criteria=None,
    streamer=None,
    attention_mask=None,
    pad_token_id: int | None = None,
) -> DecodeOutput:
    """Speculative decoding with drafts from `pool` and from the request's own text.

    strict mode returns exactly `model.generate(do_sample=False)`'s tokens.
    input_ids: one sequence ([L] or [1, L]), or a batch as HF takes it: [B, L] with a
    left-padding attention_mask, or a list of id lists; a batch runs through the batch loop
    (laser.batch) and comes back [B, L + new] like HF's (early-stopped rows right-padded
    with pad_token_id, default: the generation config's, else its EOS).
    eos_token_id: "auto" takes the model's generation config; None never stops early.
    use_kernels: Triton tree attention in the verification pass (default: on CUDA).
    stopping_criteria: HF StoppingCriteria(List), checked after every committed token (a
    step that commits several tokens is cut where it fires). streamer: an HF streamer; it
    gets the prompt, then each step's committed tokens, then end().
    """
    cfg = draft or DraftConfig()
    device = model.device
    rows = _rows_of(input_ids, attention_mask)
    if rows is not None:
        return _generate_rows(model, rows, input_ids, attention_mask, pool, max_new_tokens, mode, top_k, min_prob,
                              eos_token_id, update_pool, cfg, pad_token_id,
                              logits_processor=logits_processor, stopping_criteria=stopping_criteria, streamer=streamer)
    ids = _check_args(model, torch.as_tensor(input_ids), max_new_tokens, mode, top_k, min_prob, cfg)
    if isinstance(eos_token_id, str):
        if eos_token_id != "auto":
            raise ValueError(f"eos_token_id must be an id, a list of ids, None or 'auto', got {eos_token_id!r}")
        eos_token_id = model.generation_config.eos_token_id
    eos = np.asarray([] if eos_token_id is None else np.atleast_1d(eos_token_id), dtype=np.int64)
    kv = cache_kwarg(model)
    dtype = next(model.parameters()).dtype
    stats = DecodeStats()
    if use_kernels is None:
        use_kernels = device.type == "cuda" or kernels_forced()
    with _forwards(model, use_kernels) as kernels:
        if streamer is not None:
            streamer.put(ids[None].cpu())
        out = _loop(model, ids, pool, max_new_tokens, mode, top_k, min_prob, eos, update_pool, cfg,
                    logits_processor, kv, dtype, device, stats, kernels, stopping_criteria, streamer)
        if streamer is not None:
            streamer.end()
        return out


def _rows_of(input_ids, attention_mask) -> list[list[int]] | None:
    """The unpadded rows of a batch input (a list of id lists, or [B, L] with B > 1 or with a
    left-padding attention_mask); None for one plain sequence."""
    if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple, np.ndarray, torch.Tensor)):
        return [list(map(int, r)) for r in input_ids]
    x = torch.as_tensor(input_ids)
    if x.dim() != 2 or (x.shape[0] == 1 and (attention_mask is None or bool(torch.as_tensor(attention_mask).all()))):
        return None
    m = torch.ones_like(x, dtype=torch.bool) if attention_mask is None else torch.as_tensor(attention_mask).bool()
    if m.shape != x.shape:
        raise ValueError(f"attention_mask {tuple(m.shape)} does not match input_ids {tuple(x.shape)}")
    out = []
    for r in range(x.shape[0]):
        keep = m[r].nonzero().flatten()
        if keep.numel() == 0 or not bool(m[r, int(keep[0]):].all()):
            raise ValueError(f"row {r}: attention_mask must be left padding (zeros, then ones) with at least one token")
        out.append(x[r, int(keep[0]):].tolist())
    return out


def _generate_rows(model, rows, input_ids, attention_mask, pool, max_new_tokens, mode, top_k, min_prob, eos_token_id,
                   update_pool, cfg, pad_token_id, **unsupported) -> DecodeOutput:
    """B rows through the batch loop (laser.batch), returned as HF's generate returns a batch:
    [B, L + new], the input as given (or left-padded to L) and each row's new tokens after it,
    rows that stopped early right-padded with pad_token_id."""
    from laser.batch import Request, generate_batch

    named = [k for k, v in unsupported.items() if v is not None]
    if named:
        raise ValueError(f"laser.generate takes {named[0]} for one sequence only (got {len(rows)} rows)")
    if pad_token_id is None:
        pad_token_id = model.generation_config.pad_token_id
        if pad_token_id is None:
            eos = model.generation_config.eos_token_id
            pad_token_id = int(np.atleast_1d(eos)[0]) if eos is not None else 0
    res = sorted(generate_batch(model, [Request(r, pool) for r in rows], batch_size=len(rows),
                                max_new_tokens=max_new_tokens, mode=mode, top_k=top_k, min_prob=min_prob,
                                eos_token_id=eos_token_id, update_pool=update_pool, draft=cfg), key=lambda r: r.index)
    x = torch.as_tensor(input_ids) if not isinstance(input_ids, (list, tuple)) else None
    width = x.shape[1] if x is not None else max(len(r) for r in rows)
    new = max(len(r.tokens) for r in res)
    out = torch.full((len(rows), width + new), pad_token_id, dtype=torch.long)
    stats = DecodeStats()
    for i, (row, r) in enumerate(zip(rows, res)):
        out[i, :width] = x[i] if x is not None else torch.tensor([pad_token_id] * (width - len(row)) + row)
        out[i, width : width + len(r.tokens)] = torch.from_numpy(r.tokens.astype(np.int64))
        stats.steps += r.stats.steps
        stats.new_tokens += r.stats.new_tokens
        stats.accepted += r.stats.accepted
        stats.tree_sizes += r.stats.tree_sizes
    return DecodeOutput(out, stats)


def _stop_at(stopping, seq: np.ndarray, n: int, out: np.ndarray) -> int:
    """Tokens of `out` to keep: up to and including the first one after which `stopping` fires (0 = none fired)."""
    full = torch.from_numpy(np.concatenate([seq[:n], out]).astype(np.int64))[None]  # one copy per step; views below
    for j in range(out.size):
        if bool(torch.as_tensor(stopping(full[:, : n + j + 1], None)).any()):
            return j + 1
    return 0


def _loop(model, ids, pool, max_new_tokens, mode, top_k, min_prob, eos, update_pool, cfg, logits_processor,
          kv, dtype, device, stats, kernels, stopping=None, streamer=None) -> DecodeOutput:
    """The loop itself; generate() validates and sets up (see the module docstring for the state)."""

    L = ids.numel()
    seq = np.zeros(L + max_new_tokens + 1, dtype=np.int32)
    seq[:L] = ids.cpu().numpy()
    local, pools, weights, budget = _draft_sources(pool, seq[:L], cfg)

    # prefill: cache <- prompt[:-1]; the last prompt token is pending
    t0 = time.perf_counter()
    cache = new_cache(model)
    if L > 1:
        model(input_ids=ids[None, :-1].to(device), **{kv: cache}, use_cache=True, **fill_only(model))
    n, new = L, 0
    stats.time_prefill = time.perf_counter() - t0

    while new < max_new_tokens:
        # 1. draft: tree from the shared pool + this request's own text
        t0 = time.perf_counter()
        tree = draft_union(pools, weights, seq[:n], budget=budget, max_depth=cfg.max_depth,
                           min_match=cfg.min_match, max_match=cfg.max_match, cost=cfg.cost, confidence=cfg.confidence)
        past = n - 1
        inp, pos, mask, visible = _verify_inputs(seq[n - 1 : n], [tree], np.array([past]), dtype, device)
        extra = {"laser_tree_bits": mask_to_bits(visible[0, :, past:]).to(device)} if kernels else {}
        t1 = time.perf_counter()
        # 2. verify: one forward over [pending] + tree
        logits = model(input_ids=inp, position_ids=pos, attention_mask=mask, **{kv: cache}, use_cache=True,
                       **extra).logits
        logits = _process(logits[0], seq, n, tree, logits_processor)  # [m+1, V], the model's dtype
        t2 = time.perf_counter()
        # 3. accept: longest agreeing root path + the bonus token, cut at EOS / max_new_tokens
        path, out, stop = accept_trees(logits[None], [tree], mode, top_k, min_prob, eos, [max_new_tokens - new])[0]
        if stopping is not None and (cut := _stop_at(stopping, seq, n, out)):
            out, stop = out[:cut], True
        t3 = time.perf_counter()
        # 4. commit: tokens, KV cache, pools
        seq[n : n + out.size] = out
        # cache holds past + pending + tree; keep pending and the committed path nodes
        keep = torch.from_numpy(np.concatenate([[0], path[: out.size - 1] + 1])).to(device)
        compact_cache(cache, past, keep)
        if cache_length(cache) != n + out.size - 1:
            raise RuntimeError(f"KV cache holds {cache_length(cache)} positions, expected {n + out.size - 1}")
        local.extend(seq[:n], out)
        if pool is not None and update_pool:
            pool.extend(seq[L:n], out)  # windows inside the output only: no prompt tokens
        n, new = n + out.size, new + out.size
        if streamer is not None:
            streamer.put(torch.from_numpy(out.astype(np.int64)))
        stats.steps += 1
        stats.accepted.append(out.size - 1)
        stats.tree_sizes.append(len(tree))
        stats.time_draft += t1 - t0
        stats.time_verify += t2 - t1
        stats.time_accept += t3 - t2
        stats.time_cache += time.perf_counter() - t3
        if stop:
            break
    stats.new_tokens = new
    return DecodeOutput(torch.from_numpy(seq[:n].astype(np.int64))[None], stats)


@torch.no_grad()
def calibrate(model, context_len: int = 256, sizes=(0, 1, 2, 4, 8, 16, 32, 64), repeats: int = 5,
              batch: int = 1) -> np.ndarray:
    """Measure the verification cost curve on this hardware: cost[b] = seconds for b tree nodes.

    Times one forward of `batch` rows of b + 1 tokens after a `context_len` prefix. After
    one warm-up round, `repeats` rounds each time every size once (round-robin, so a slow
    spell of a shared machine touches all sizes alike, not the few measured during it);
    cost = per-size median, made non-decreasing in b (a forward over more tokens never
    costs less; a dip is noise), interpolated linearly to every b in [0, max(sizes)].
    Pass it as DraftConfig(cost=...); for laser.batch, calibrate with its batch size.
    """
    device, kv = model.device, cache_kwarg(model)
    dtype = next(model.parameters()).dtype
    vocab = model.get_output_embeddings().weight.shape[0]
    sizes = sorted(set(int(b) for b in sizes))
    if not sizes or sizes[0] < 0 or repeats < 1:
        raise ValueError("calibrate needs sizes >= 0 and repeats >= 1")
    with _forwards(model, False):  # time the forwards generate_batch (and generate on CPU) run
        gen = torch.Generator().manual_seed(0)
        cache = new_cache(model)
        model(input_ids=torch.randint(0, vocab, (batch, context_len), generator=gen).to(device), **{kv: cache},
              use_cache=True)

        def forward(b: int) -> float:
            inp = torch.randint(0, vocab, (batch, b + 1), generator=gen).to(device)
            pos = (context_len + torch.arange(b + 1))[None].expand(batch, -1).to(device)
            mask = torch.zeros(batch, 1, b + 1, context_len + b + 1, dtype=dtype, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(input_ids=inp, position_ids=pos, attention_mask=mask, **{kv: cache}, use_cache=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            compact_cache(cache, context_len, torch.empty(0, dtype=torch.long, device=device))
            return dt

        for b in sizes:  # warm-up round
            forward(b)
        times = np.array([[forward(b) for b in sizes] for _ in range(repeats)])  # [repeats, len(sizes)]
    medians = np.maximum.accumulate(np.median(times, axis=0))
    return np.interp(np.arange(sizes[-1] + 1), np.asarray(sizes, dtype=np.float64), medians)


UNSUPPORTED = {  # generation-config fields LASER cannot honour, with the value that means "off"
    "do_sample": False, "num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "penalty_alpha": None,
    "prompt_lookup_num_tokens": None, "dola_layers": None,
}


def hf_generate(model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None,
                synced_gpus=False, streamer=None, pool: RetrievalPool | None = None, laser_mode: str = "strict",
                laser_top_k: int = 2, laser_min_prob: float = 0.1, laser_draft: DraftConfig | None = None,
                laser_streamer=None, **model_kwargs):
    """`model.generate(..., custom_generate=laser.hf_generate, pool=...)`: LASER behind HF's API.

    HF prepares input_ids, the generation config, its logits processors (repetition
    penalty, no-repeat n-grams...), which LASER applies inside verification, and its
    stopping criteria, checked after every committed token. Streaming: transformers keeps
    `streamer=` to itself for a custom_generate callable (it only puts the prompt), so pass
    `laser_streamer=`: it gets the prompt, each step's tokens and end(). Sampling, beam search and other decoding strategies raise ValueError: LASER
    decodes greedily (strict) or with relaxed verification, never silently otherwise.
    """
    for name, off in UNSUPPORTED.items():
        value = getattr(generation_config, name, off)
        if value is not None and value != off:
            raise ValueError(f"laser.hf_generate does not support {name}={value!r}: it decodes greedily "
                             f"(laser_mode='strict') or with relaxed verification (laser_mode='relaxed')")
    if model_kwargs.get("assistant_model") is not None:
        raise ValueError("laser.hf_generate drafts from its pools: assistant_model is not supported")
    attn = model_kwargs.get("attention_mask")
    if input_ids.shape[0] != 1 or (attn is not None and not bool(attn.all())):
        raise ValueError("laser.hf_generate decodes one unpadded sequence; use laser.batch.generate_batch for many")
    max_new = generation_config.max_length - input_ids.shape[1]
    if generation_config.max_new_tokens is not None:
        max_new = generation_config.max_new_tokens
    out = generate(model, input_ids, pool=pool, max_new_tokens=max_new, mode=laser_mode, top_k=laser_top_k,
                   min_prob=laser_min_prob, eos_token_id=generation_config.eos_token_id, draft=laser_draft,
                   logits_processor=logits_processor if logits_processor else None,
                   stopping_criteria=stopping_criteria if stopping_criteria else None,
                   streamer=laser_streamer if laser_streamer is not None else streamer)
    return out.sequences.to(input_ids.device)
