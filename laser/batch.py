"""generate_batch: many requests through the engine's loop, batch_size rows at a time.

Rows are refilled from the queue as they finish (continuous batching) and results stream
out in finish order; see laser.engine for the loop and its state.
"""

from __future__ import annotations

from typing import Iterator

from laser.config import AcceptConfig, DraftConfig
from laser.engine import Engine, Request, Result, shared_pools
from laser.kernels.common import kernels_forced

__all__ = ["Request", "Result", "generate_batch"]


def generate_batch(model, requests: list[Request], batch_size: int = 8, max_new_tokens: int = 128,
                   mode: str = "strict", top_k: int = 2, min_prob: float = 0.1, eos_token_id="auto",
                   update_pool: bool = True, draft: DraftConfig | None = None, use_kernels: bool | None = None,
                   logits_processor=None, stopping_criteria=None, acceptance="auto",
                   learn_into=None, no_repeat_ngram_size: int = AcceptConfig.no_repeat_ngram,
                   repetition_penalty: float = AcceptConfig.repetition_penalty,
                   relaxed_rule: str = AcceptConfig.rule, loop_scope: str = AcceptConfig.loop_scope) -> Iterator[Result]:
    """Decode all requests, `batch_size` rows at a time, refilling rows as they finish.

    Returns an iterator that yields each Result as its request finishes (finish order;
    `Result.index` is the request's position): nothing is kept after it is yielded, so a
    long queue runs in flat memory. Arguments are checked here, before the first result.
    Strict mode gives each request exactly its own greedy output. acceptance, learn_into:
    AcceptanceModels; no_repeat_ngram_size, repetition_penalty, relaxed_rule, loop_scope: as in laser.generate.
    """
    cfg = draft or DraftConfig()
    accept = AcceptConfig(mode, top_k, min_prob, rule=relaxed_rule, no_repeat_ngram=no_repeat_ngram_size,
                          repetition_penalty=repetition_penalty, loop_scope=loop_scope)
    engine = Engine(model)
    acceptance = engine.acceptance(acceptance, accept)
    prompts = [engine.check(r.input_ids, max_new_tokens, cfg) for r in requests]
    pools = [shared_pools(r.pool) for r in requests]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    eos = engine.eos_ids(eos_token_id)
    kernels = (model.device.type == "cuda" or kernels_forced()) if use_kernels is None else use_kernels
    if not requests:
        return iter(())
    cfg = engine.draft_config(cfg, min(batch_size, len(requests)))
    return engine.run(prompts, pools, min(batch_size, len(requests)), max_new_tokens, accept,
                      eos, update_pool, cfg, kernels, tags=[r.tag for r in requests], processor=logits_processor,
                      stopping=stopping_criteria, acceptance=acceptance, learn_into=learn_into)
