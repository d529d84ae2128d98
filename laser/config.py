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
    cost: np.ndarray | None = None  # cost[b] = verify time for b nodes; cuts each step's trees (see calibrate)
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
                  "match_levels", "min_nodes")
        return same_cost and all(getattr(self, f) == getattr(other, f) for f in fields)

    __hash__ = None

    def acceptance_args(self, model) -> dict:
        """draft / draft_union keyword arguments for drafting with AcceptanceModel `model` (None: none)."""
        return {} if model is None else {"acceptance": model, "min_chance": self.min_chance,
                                         "match_levels": self.match_levels, "min_nodes": self.min_nodes}


@dataclass(frozen=True)
class AcceptConfig:
    """strict: a draft token is accepted iff it is the argmax (the output is greedy decoding's).
    relaxed: also iff it is within the top_k and its probability is >= min_prob."""

    mode: str = "strict"
    top_k: int = 2
    min_prob: float = 0.1

    def __post_init__(self):
        if self.mode not in ("strict", "relaxed"):
            raise ValueError(f"mode must be 'strict' or 'relaxed', got {self.mode!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if not 0.0 <= self.min_prob <= 1.0:
            raise ValueError(f"min_prob must be in [0, 1], got {self.min_prob!r}")
