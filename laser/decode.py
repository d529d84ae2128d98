"""laser.generate: LASER's decoding behind HF generate's conventions (one sequence or a batch).

The loop itself is laser.engine's; this module turns HF-style arguments into engine calls
and the engine's results into HF-style outputs, and measures the verification cost curve.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from laser._C import AcceptanceModel, RetrievalPool
from laser.cache import TreeCache
from laser.config import AcceptConfig, DraftConfig
from laser.engine import DecodeStats, Engine, shared_pools
from laser.hf import fill_only
from laser.kernels.common import kernels_forced

__all__ = ["AcceptConfig", "DecodeOutput", "DecodeStats", "DraftConfig", "calibrate", "generate", "hf_generate"]


@dataclass
class DecodeOutput:
    sequences: torch.Tensor  # [B, L + new] int64, prompt included and padded like HF generate's (B = 1: unpadded)
    stats: DecodeStats  # one row's, or the rows' steps, tokens and trees together


@torch.no_grad()
def generate(
    model,
    input_ids,
    pool: RetrievalPool | list[RetrievalPool] | None = None,
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
    acceptance: AcceptanceModel | str | None = "auto",
    learn_into: AcceptanceModel | None = None,
    no_repeat_ngram_size: int = AcceptConfig.no_repeat_ngram,
    repetition_penalty: float = AcceptConfig.repetition_penalty,
    relaxed_rule: str = AcceptConfig.rule,
    loop_scope: str = AcceptConfig.loop_scope,
) -> DecodeOutput:
    """Speculative decoding with drafts from `pool` and from each request's own text.

    strict mode returns exactly `model.generate(do_sample=False)`'s tokens.
    input_ids: one sequence ([L] or [1, L]), or a batch as HF takes it: [B, L] with a
    left-padding attention_mask, or a list of id lists; a batch comes back [B, L + new] like
    HF's (early-stopped rows right-padded with pad_token_id, default: the generation
    config's, else its EOS). Every row drafts from `pool` and, with update_pool, adds its
    output to it. pool may be a list: the request's group pool first, then pools of wider
    scope (for example one of every text; AcceptanceModel source GLOBAL), each drafted from
    at weight 1 and each updated.
    eos_token_id: "auto" takes the model's generation config; None never stops early.
    use_kernels: Triton tree attention in the verification pass (default: on CUDA).
    no_repeat_ngram_size, repetition_penalty: loop control as HF generate's arguments of the
    same name (strict mode returns HF greedy's tokens with them), kept as an index of each row's
    text, so a tree costs about what it costs without them (laser.repeats). loop_scope: "all"
    (HF's: the prompt counts) or "output" (the generated tokens only; see AcceptConfig).
    relaxed_rule: "fresh" (default) or "paper" (the paper's rule alone; see AcceptConfig).
    logits_processor: HF LogitsProcessorList, applied at every verified position (after loop control).
    stopping_criteria: HF StoppingCriteria(List), checked after every committed token of
    every row (a step that commits several tokens is cut where it fires).
    streamer: an HF streamer (one sequence, as HF's own): it gets the prompt, then each
    step's committed tokens, then end().
    acceptance: the AcceptanceModel that scores drafts by calibrated chances (with
    draft.min_chance and draft.match_levels) and learns from every verified tree (or learn_into
    does, leaving acceptance as it is: drafts then do not depend on row order). "auto": the
    model's engine keeps one per (mode, top_k, min_prob), learning across calls. None: drafts
    by pool shares (the paper's uncalibrated drafting; pass DraftConfig(min_match=2, max_match=4)).
    The first call on a model prepares it (laser.engine.Engine).
    """
    cfg = draft or DraftConfig()
    accept = AcceptConfig(mode, top_k, min_prob, rule=relaxed_rule, no_repeat_ngram=no_repeat_ngram_size,
                          repetition_penalty=repetition_penalty, loop_scope=loop_scope)
    engine = Engine(model)
    acceptance = engine.acceptance(acceptance, accept)
    rows = _rows_of(input_ids, attention_mask)
    one = rows is None
    if one:
        rows = [input_ids]
    elif streamer is not None:
        raise ValueError(f"streamer takes one sequence only, as HF's streamers do (got {len(rows)} rows)")
    prompts = [engine.check(r, max_new_tokens, cfg) for r in rows]
    cfg = engine.draft_config(cfg, len(prompts))
    eos = engine.eos_ids(eos_token_id)
    kernels = (model.device.type == "cuda" or kernels_forced()) if use_kernels is None else use_kernels
    if streamer is not None:
        streamer.put(torch.from_numpy(prompts[0].astype(np.int64))[None])
    res = sorted(engine.run(prompts, [shared_pools(pool)] * len(prompts), len(prompts), max_new_tokens, accept, eos, update_pool,
                            cfg, kernels, processor=logits_processor or None, stopping=stopping_criteria or None,
                            streamer=streamer, acceptance=acceptance, learn_into=learn_into),
                 key=lambda r: r.index)
    if streamer is not None:
        streamer.end()
    if one:
        seq = np.concatenate([prompts[0], res[0].tokens]).astype(np.int64)
        return DecodeOutput(torch.from_numpy(seq)[None], res[0].stats)
    return _padded(model, rows, input_ids, res, pad_token_id)


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


def _padded(model, rows, input_ids, res, pad_token_id) -> DecodeOutput:
    """[B, L + new] as HF's generate returns a batch: the input as given (or left-padded to L),
    then each row's new tokens, rows that stopped early right-padded with pad_token_id."""
    if pad_token_id is None:
        pad_token_id = model.generation_config.pad_token_id
        if pad_token_id is None:
            eos = model.generation_config.eos_token_id
            pad_token_id = int(np.atleast_1d(eos)[0]) if eos is not None else 0
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


@torch.no_grad()
def calibrate(model, context_len: int = 256, sizes=(0, 1, 2, 4, 8, 16, 32, 64), repeats: int = 5,
              batch: int = 1) -> np.ndarray:
    """Measure the verification cost curve on this hardware: cost[b] = seconds for b tree nodes.

    Times one verification forward (Engine.verify: the direct forward where it applies) of
    `batch` rows of b + 1 tokens after a `context_len` prefix, through the engine's cache.
    After one warm-up round, `repeats` rounds each time every size once (round-robin, so a
    slow spell of a shared machine touches all sizes alike, not the few measured during it);
    cost = per-size median, made non-decreasing in b (a forward over more tokens never costs
    less; a dip is noise), interpolated linearly to every b in [0, max(sizes)]. Pass it as
    DraftConfig(cost=...), measured at the batch size it will run at. On a CPU several rows verify ragged (back to back, engine.py); a
    padded forward of the same tokens costs the same (within 3% at B = 8, 2-core AMD EPYC),
    and the ragged cut reads this curve at the batch's mean nodes per row.
    """
    engine = Engine(model)
    device, kv, dtype = model.device, engine.kv, engine.dtype
    sizes = sorted(set(int(b) for b in sizes))
    if not sizes or sizes[0] < 0 or repeats < 1:
        raise ValueError("calibrate needs sizes >= 0 and repeats >= 1")
    with engine.active(kernels=False):  # time the forwards generate_batch (and generate on CPU) run
        gen = torch.Generator().manual_seed(0)
        cache = TreeCache.for_model(model, batch, context_len + sizes[-1] + 1)
        with cache.filling(list(range(batch)), [context_len] * batch):
            model(input_ids=torch.randint(0, engine.vocab, (batch, context_len), generator=gen).to(device),
                  **{kv: cache}, use_cache=True, **fill_only(model))

        def forward(b: int) -> float:
            inp = torch.randint(0, engine.vocab, (batch, b + 1), generator=gen).to(device)
            pos = (context_len + torch.arange(b + 1))[None].expand(batch, -1).to(device)
            mask = torch.zeros(batch, 1, b + 1, context_len + b + 1, dtype=dtype, device=device)
            cache.begin_block()  # nothing is committed: every forward writes the same columns
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.verify(False, inp, pos, mask, cache)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        for b in sizes:  # warm-up round
            forward(b)
        times = np.array([[forward(b) for b in sizes] for _ in range(repeats)])  # [repeats, len(sizes)]
    medians = np.maximum.accumulate(np.median(times, axis=0))
    return np.interp(np.arange(sizes[-1] + 1), np.asarray(sizes, dtype=np.float64), medians)


def _loop_control(processors) -> tuple[dict, list]:
    """HF's RepetitionPenalty and NoRepeatNGram processors as generate's loop-control arguments
    (LASER's index, laser.repeats), and the other processors, in order."""
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    loops, rest = {}, []
    for p in processors or []:
        if type(p) is RepetitionPenaltyLogitsProcessor and getattr(p, "prompt_ignore_length", None) is None:
            loops["repetition_penalty"] = float(p.penalty)
        elif type(p) is NoRepeatNGramLogitsProcessor:
            loops["no_repeat_ngram_size"] = int(p.ngram_size)
        else:
            rest.append(p)
    return loops, rest


UNSUPPORTED = {  # generation-config fields LASER cannot honour, with the value that means "off"
    "do_sample": False, "num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "penalty_alpha": None,
    "prompt_lookup_num_tokens": None, "dola_layers": None,
}


def hf_generate(model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None,
                synced_gpus=False, streamer=None, pool: RetrievalPool | None = None, laser_mode: str = "strict",
                laser_top_k: int = 2, laser_min_prob: float = 0.1, laser_draft: DraftConfig | None = None,
                laser_streamer=None, laser_acceptance: AcceptanceModel | str | None = "auto", **model_kwargs):
    """`model.generate(..., custom_generate=laser.hf_generate, pool=...)`: LASER behind HF's API.

    HF prepares input_ids, the generation config, its logits processors (repetition
    penalty, no-repeat n-grams...), which LASER applies inside verification, and its
    stopping criteria, checked after every committed token. Streaming: transformers keeps
    `streamer=` to itself for a custom_generate callable (it only puts the prompt), so pass
    `laser_streamer=`: it gets the prompt, each step's tokens and end(). laser_acceptance: as
    generate's `acceptance` (default "auto": the engine's own model). A left-padded batch
    decodes through the batch loop. Sampling, beam search and other decoding strategies
    raise ValueError: LASER decodes greedily (strict) or with relaxed verification, never
    silently otherwise.
    """
    for name, off in UNSUPPORTED.items():
        value = getattr(generation_config, name, off)
        if value is not None and value != off:
            raise ValueError(f"laser.hf_generate does not support {name}={value!r}: it decodes greedily "
                             f"(laser_mode='strict') or with relaxed verification (laser_mode='relaxed')")
    if model_kwargs.get("assistant_model") is not None:
        raise ValueError("laser.hf_generate drafts from its pools: assistant_model is not supported")
    attn = model_kwargs.get("attention_mask")
    max_new = generation_config.max_length - input_ids.shape[1]
    if generation_config.max_new_tokens is not None:
        max_new = generation_config.max_new_tokens
    loops, logits_processor = _loop_control(logits_processor)
    out = generate(model, input_ids, attention_mask=attn, **loops, pad_token_id=generation_config.pad_token_id, pool=pool,
                   max_new_tokens=max_new, mode=laser_mode, top_k=laser_top_k, min_prob=laser_min_prob, eos_token_id=generation_config.eos_token_id, draft=laser_draft,
                   acceptance=laser_acceptance,
                   logits_processor=logits_processor if logits_processor else None,
                   stopping_criteria=stopping_criteria if stopping_criteria else None,
                   streamer=laser_streamer if laser_streamer is not None else streamer)
    return out.sequences.to(input_ids.device)
