"""The decode engine's configuration: what to draft (DraftConfig) and what to accept (AcceptConfig).

Both are validated when built, so a bad value fails at the call that passes it, naming the
field. DraftConfig's defaults are the drafting the decoder scores with an AcceptanceModel (laser.generate's
default; the job's `--acceptance`); RetrievalPool.draft / draft_union's own defaults are the
uncalibrated drafting by pool shares (acceptance=None; the job without `--acceptance`).
tests/test_pool.py checks both against laser.job's pinned settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# AcceptanceModel source slots (draft_union(..., sources=)): where a drafted node came from.
SHARED, OWN, GLOBAL = 0, 1, 2  # the request's group pool, its own prompt and output, a pool of every text


@dataclass(frozen=True)
class DraftConfig:
    budget: int = 32  # hard cap on tree nodes per step
    max_depth: int = 10  # cap on draft depth below the context
    # Context suffixes drafted from: lengths min_match ... max_match (with an AcceptanceModel,
    # each pool's match_levels longest; without one, its longest). The acceptance model scores a
    # node by the context length its parent stands for, so 1-token matches enter only where they
    # are accepted. Drafting by pool shares (acceptance=None) trusts every match alike: use
    # min_match 2 and max_match 4 there (the pool's own defaults; 1-token matches were accepted
    # at half the rate their shares predict, benchmarks/HISTORY.md).
    min_match: int = 1
    max_match: int = 8
    prompt_weight: float = 8.0  # weight of this request's own prompt/output pool; 0 turns prompt lookup off
    # cost[b] = verify time for b nodes; cuts each step's trees (see calibrate). None: the model's
    # own curve on this machine, measured once (Engine.cost), or with auto_cost=False no cut (a
    # hard node budget, as laser.replay drafts)
    cost: np.ndarray | None = None
    auto_cost: bool = True
    # With an AcceptanceModel: past the first min_nodes nodes (best-first), nodes whose calibrated
    # chance is below min_chance are not drafted. min_nodes < budget with min_chance > 0: every
    # step drafts at least min_nodes nodes, and up to budget where the chances stay high.
    min_chance: float = 0.0
    match_levels: int = 3
    min_nodes: int = 0

    def __post_init__(self):
        for name in ("budget", "max_depth", "min_match", "max_match", "match_levels", "min_nodes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"DraftConfig.{name} must be an int, got {v!r}")
        if self.budget < 0:
            raise ValueError(f"DraftConfig.budget must be >= 0, got {self.budget}")
        if not isinstance(self.auto_cost, bool):
            raise TypeError(f"DraftConfig.auto_cost must be a bool, got {self.auto_cost!r}")
        if self.max_depth < 1:
            raise ValueError(f"DraftConfig.max_depth must be >= 1, got {self.max_depth}")
        if not 1 <= self.min_match <= self.max_match:
            raise ValueError(f"DraftConfig: need 1 <= min_match <= max_match, got {self.min_match} and {self.max_match}")
        if not self.prompt_weight >= 0:
            raise ValueError(f"DraftConfig.prompt_weight must be >= 0, got {self.prompt_weight!r}")
        if not 0 <= self.min_chance < 1:
            raise ValueError(f"DraftConfig.min_chance must be in [0, 1), got {self.min_chance!r}")
        if self.match_levels < 1:
            raise ValueError(f"DraftConfig.match_levels must be >= 1, got {self.match_levels}")
        if self.min_nodes < 0:
            raise ValueError(f"DraftConfig.min_nodes must be >= 0, got {self.min_nodes}")
        if self.cost is not None:
            cost = np.asarray(self.cost, dtype=np.float64)
            if cost.ndim != 1 or cost.size < 1 or not np.all(np.isfinite(cost)) or not np.all(cost > 0):
                raise ValueError("DraftConfig.cost must be a non-empty 1-D array of positive, finite seconds")
            object.__setattr__(self, "cost", cost)

    def __eq__(self, other):  # the cost array compares by value
        if not isinstance(other, DraftConfig):
            return NotImplemented
        same_cost = (self.cost is None and other.cost is None) or (
            self.cost is not None and other.cost is not None and np.array_equal(self.cost, other.cost))
        fields = ("budget", "max_depth", "min_match", "max_match", "prompt_weight", "min_chance",
                  "match_levels", "min_nodes", "auto_cost")
        return same_cost and all(getattr(self, f) == getattr(other, f) for f in fields)

    __hash__ = None

    def acceptance_args(self, model) -> dict:
        """draft / draft_union keyword arguments for drafting with AcceptanceModel `model` (None: none)."""
        return {} if model is None else {"acceptance": model, "min_chance": self.min_chance,
                                         "match_levels": self.match_levels, "min_nodes": self.min_nodes}


RELAXED_RULES = ("fresh", "paper")
LOOP_SCOPES = ("all", "output")


@dataclass(frozen=True)
class AcceptConfig:
    """What the verifier accepts, judged on the model's scores after loop control.

    strict: a draft token is accepted iff it is the argmax (the output is greedy decoding's,
    with the same loop control as HF's processors of the same setting).
    relaxed, rule "paper" (arXiv 2408.05676): also iff it is within the top_k and its
    probability is >= min_prob. Rule "fresh": as "paper", except that a token which is not the
    argmax is never accepted where it would repeat a fresh_ngram-token n-gram already in the
    text (prompt, committed tokens and the node's own root path): relaxed acceptance cannot
    copy the text into a loop, only greedy decoding itself can.
    Loop control, as HF's processors of the same name: no_repeat_ngram > 0 bans every token
    that would repeat an n-gram of that many tokens; repetition_penalty != 1 divides the
    positive scores (multiplies the negative ones) of every token already in the text. The
    text is loop_scope "all": prompt and output, as HF's processors count it; or "output": the
    generated tokens only, so a text may still quote its prompt (a title, a year) and only
    its own repeats are controlled (HF: RepetitionPenaltyLogitsProcessor(prompt_ignore_length=
    prompt length), and NoRepeatNGramLogitsProcessor over the output's ids).
    """

    mode: str = "strict"
    top_k: int = 2
    min_prob: float = 0.1
    rule: str = "fresh"
    fresh_ngram: int = 3
    no_repeat_ngram: int = 0
    repetition_penalty: float = 1.0
    loop_scope: str = "all"

    def __post_init__(self):
        if self.mode not in ("strict", "relaxed"):
            raise ValueError(f"mode must be 'strict' or 'relaxed', got {self.mode!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if not 0.0 <= self.min_prob <= 1.0:
            raise ValueError(f"min_prob must be in [0, 1], got {self.min_prob!r}")
        if self.loop_scope not in LOOP_SCOPES:
            raise ValueError(f"loop_scope must be one of {', '.join(LOOP_SCOPES)}, got {self.loop_scope!r}")
        if self.rule not in RELAXED_RULES:
            raise ValueError(f"relaxed rule must be one of {', '.join(RELAXED_RULES)}, got {self.rule!r}")
        for name in ("fresh_ngram", "no_repeat_ngram"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (1 if name == "fresh_ngram" else 0):
                raise ValueError(f"{name} must be an integer >= {1 if name == 'fresh_ngram' else 0}, got {v!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0
                and np.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}")

    @property
    def loop_control(self) -> bool:
        return self.no_repeat_ngram > 0 or self.repetition_penalty != 1.0

    @property
    def fresh(self) -> bool:
        """Relaxed acceptance checks each node for a repeated n-gram."""
        return self.mode == "relaxed" and self.rule == "fresh"
