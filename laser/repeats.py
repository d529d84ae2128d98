"""Loop control inside tree verification, equal to HF's processors and paid per committed token.

HF's RepetitionPenaltyLogitsProcessor and NoRepeatNGramLogitsProcessor rescan the whole
sequence for every scored position; run at every node of a draft tree that is a rescan per
node. Here each row keeps an index of its own text that grows as tokens commit:

  NgramIndex(n)  (n-1)-token key -> the tokens that followed it, over every n-gram of the text
  seen           bool [V]: tokens anywhere in the text (the prompt included, as in HF)

and a tree is judged against the index plus what its own root paths add (at most depth
tokens per node). Position 0 of a row's verification continues the committed text; position
i + 1 continues it with the root path to node i (tree.parents precede their children, DFS).

RowText.apply() changes a row's logits [m + 1, V] (fp32, in place) exactly as HF's two
processors would change each position's scores, in HF's order: the penalty, then the bans.
NgramIndex.repeats() tells, per node, whether its token would repeat an n-gram already in
its prefix: the relaxed rule "fresh" accepts no such token unless it is the argmax.
"""

from __future__ import annotations

import numpy as np
import torch


def hf_processors(no_repeat_ngram_size: int = 0, repetition_penalty: float = 1.0, loop_scope: str = "all",
                  prompt_len: int = 0):
    """HF's own processors for the same loop control, in HF's order, for `logits_processor=` of HF
    generate (a reference, and HF's side of a benchmark). loop_scope "output": they read the ids
    after the first prompt_len (a left-padded batch: its padded width) only."""
    from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    skip = prompt_len if loop_scope == "output" else None
    out = LogitsProcessorList()
    if repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(float(repetition_penalty), prompt_ignore_length=skip))
    if no_repeat_ngram_size:
        ngrams = NoRepeatNGramLogitsProcessor(no_repeat_ngram_size)
        out.append(ngrams if skip is None else _After(ngrams, skip))
    return out


class _After:
    """An HF logits processor that reads only the ids from column `start` on."""

    def __init__(self, inner, start: int):
        self.inner, self.start = inner, start

    def __call__(self, input_ids, scores):
        return self.inner(input_ids[:, self.start :], scores)


class NgramIndex:
    """Every n-gram of a growing token text, as (n-1)-token key -> set of next tokens."""

    def __init__(self, n: int, ids):
        if n < 1:
            raise ValueError(f"NgramIndex needs n >= 1, got {n}")
        self.n = n
        self.text: list[int] = []
        self.follow: dict[tuple, set] = {}
        self.extend(ids)

    def extend(self, tokens) -> None:
        start, n = len(self.text), self.n
        self.text += [int(t) for t in tokens]
        t = self.text
        for j in range(max(start, n - 1), len(t)):  # the n-grams ending at each new token
            self.follow.setdefault(tuple(t[j - n + 1 : j]), set()).add(t[j])

    def _tail(self, ctx: list) -> list:
        return ctx[max(0, len(ctx) - (self.n - 1)):] if self.n > 1 else []

    def _walk(self, tree):
        """Per position (0: after the text; i + 1: after the path to node i): (key, the path's own
        n-grams as (key, token)). key is None where the prefix holds fewer than n - 1 tokens."""
        n = self.n
        ctx = [self._tail(self.text)]
        extra: list[list] = [[]]
        for tok, parent in zip(tree.tokens.tolist(), tree.parents.tolist()):
            p = parent + 1
            c = ctx[p]
            extra.append(extra[p] + [(tuple(c), tok)] if len(c) == n - 1 else extra[p])
            ctx.append(self._tail(c + [tok]))
        keys = [tuple(c) if len(c) == n - 1 else None for c in ctx]
        return keys, extra

    def _banned(self, key, extra) -> set:
        if key is None:
            return set()
        own = {tok for k, tok in extra if k == key}
        base = self.follow.get(key)
        return own | base if base else own

    def bans(self, tree) -> tuple[np.ndarray, np.ndarray]:
        """(positions, tokens): the tokens that would repeat an n-gram at each position, [k] each."""
        keys, extra = self._walk(tree)
        pos, tok = [], []
        for p, (key, ex) in enumerate(zip(keys, extra)):
            banned = self._banned(key, ex)
            pos += [p] * len(banned)
            tok += banned
        return np.asarray(pos, dtype=np.int64), np.asarray(tok, dtype=np.int64)

    def repeats(self, tree) -> np.ndarray:
        """[m] bool: node i's token repeats an n-gram already in its prefix (text + path to its parent)."""
        keys, extra = self._walk(tree)
        return np.array([tok in self._banned(keys[p + 1], extra[p + 1])
                         for tok, p in zip(tree.tokens.tolist(), tree.parents.tolist())], dtype=bool)


class RowText:
    """One row's committed text as the loop-control processors see it (see the module docstring).
    no_repeat_ngram: HF's no_repeat_ngram_size (0: off); repetition_penalty: HF's (1.0: off)."""

    def __init__(self, ids: np.ndarray, vocab: int, no_repeat_ngram: int, repetition_penalty: float):
        self.ngrams = NgramIndex(no_repeat_ngram, []) if no_repeat_ngram > 0 else None
        self.penalty = float(repetition_penalty)
        self.seen = np.zeros(vocab, dtype=bool) if self.penalty != 1.0 else None
        self.seen_ids = torch.zeros(0, dtype=torch.long)  # np.flatnonzero(seen), kept up to date
        self.extend(ids)

    def extend(self, tokens) -> None:
        if self.ngrams is not None:
            self.ngrams.extend(tokens)
        if self.seen is not None:
            fresh = np.unique(np.asarray(tokens, dtype=np.int64))
            fresh = fresh[~self.seen[fresh]]
            if fresh.size:
                self.seen[fresh] = True
                self.seen_ids = torch.from_numpy(np.flatnonzero(self.seen))

    def _penalise(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x < 0, x * self.penalty, x / self.penalty)

    def apply(self, logits: torch.Tensor, tree) -> None:
        """logits [m + 1, V] fp32 of this row's verification, changed in place."""
        if self.seen is not None:
            cols = self.seen_ids.to(logits.device)
            logits[:, cols] = self._penalise(logits[:, cols])  # every position sees the committed text
            pos, tok = self._path_tokens(tree)  # and its own path's tokens not yet seen, once each
            if pos.size:
                p, t = torch.from_numpy(pos).to(logits.device), torch.from_numpy(tok).to(logits.device)
                logits[p, t] = self._penalise(logits[p, t])
        if self.ngrams is not None:
            pos, tok = self.ngrams.bans(tree)
            if pos.size:
                logits[torch.from_numpy(pos).to(logits.device), torch.from_numpy(tok).to(logits.device)] = -float("inf")

    def _path_tokens(self, tree) -> tuple[np.ndarray, np.ndarray]:
        """(positions, tokens): for each node position, the distinct tokens of its root path not in seen."""
        own: list[frozenset] = []
        pos, tok = [], []
        for i, (t, parent) in enumerate(zip(tree.tokens.tolist(), tree.parents.tolist())):
            s = own[parent] if parent >= 0 else frozenset()
            if not self.seen[t]:
                s = s | {t}
            own.append(s)
            pos += [i + 1] * len(s)
            tok += s
        return np.asarray(pos, dtype=np.int64), np.asarray(tok, dtype=np.int64)
