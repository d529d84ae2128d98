"""Text quality of generated knowledge: how varied each text is, and how many texts loop.

Per text (whitespace words): the share of distinct word n-grams for n = 1..4 (1.0 for a text
too short to hold one), a loop flag (distinct 4-gram share below LOOP_BELOW), the longest
repeated span (the most words that occur twice at two different starts, overlaps allowed,
so a text that cycles with period p over w words has a span of w - p), and the length in
words. Per output: the loop share, the mean of each distinct share, the mean length and the
mean longest repeat: `laser.quality(texts).loop_share`, `.distinct[4]`, `.summary()`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

LOOP_BELOW = 0.7  # a text loops when fewer than 70% of its word 4-grams are distinct
ORDERS = (1, 2, 3, 4)


@dataclass(frozen=True)
class TextQuality:
    distinct: dict  # {n: share of distinct word n-grams} for n in ORDERS
    loop: bool  # distinct[4] < LOOP_BELOW
    longest_repeat: int  # words in the longest span that occurs at two different starts
    words: int


@dataclass(frozen=True)
class Quality:
    n: int  # texts
    loop_share: float  # share of texts that loop
    distinct: dict  # {n: mean distinct n-gram share}
    mean_words: float
    mean_longest_repeat: float
    texts: list = field(repr=False, default_factory=list)  # [TextQuality] in input order

    def summary(self) -> dict:
        """The output-level numbers as plain JSON (no per-text list)."""
        return {"texts": self.n, "loop_share": self.loop_share,
                **{f"distinct_{k}": v for k, v in self.distinct.items()},
                "mean_words": self.mean_words, "mean_longest_repeat": self.mean_longest_repeat}

    def line(self) -> str:
        """One line for a summary: loop share, mean distinct-4 and mean length."""
        return (f"{100 * self.loop_share:.1f}% loops, distinct-4 {self.distinct[4]:.3f}, "
                f"{self.mean_words:.0f} words a text")


def _distinct(words: list[str], n: int) -> float:
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def _longest_repeat(words: list[str]) -> int:
    """Longest run of equal words between the text and itself shifted by d >= 1, over all d."""
    if len(words) < 2:
        return 0
    _, ids = np.unique(np.array(words, dtype=object).astype(str), return_inverse=True)
    best = 0
    for d in range(1, ids.size - best):  # a shift of d compares ids.size - d pairs: stop once it cannot win
        eq = np.concatenate([[0], (ids[d:] == ids[:-d]).astype(np.int8), [0]])
        edges = np.flatnonzero(np.diff(eq))  # run starts and ends alternate
        if edges.size:
            best = max(best, int((edges[1::2] - edges[::2]).max()))
    return best


def text_quality(text: str) -> TextQuality:
    words = text.split()
    distinct = {n: _distinct(words, n) for n in ORDERS}
    return TextQuality(distinct, distinct[4] < LOOP_BELOW, _longest_repeat(words), len(words))


def quality(texts) -> Quality:
    """Quality of a list of texts (see the module docstring). An empty list gives zeros."""
    per = [text_quality(t) for t in texts]
    if not per:
        return Quality(0, 0.0, {n: 0.0 for n in ORDERS}, 0.0, 0.0, [])
    return Quality(len(per), float(np.mean([q.loop for q in per])),
                   {n: float(np.mean([q.distinct[n] for q in per])) for n in ORDERS},
                   float(np.mean([q.words for q in per])), float(np.mean([q.longest_repeat for q in per])), per)


def as_dict(q: TextQuality) -> dict:
    return {**{f"distinct_{k}": v for k, v in q.distinct.items()}, **{k: v for k, v in asdict(q).items()
                                                                       if k != "distinct"}}
