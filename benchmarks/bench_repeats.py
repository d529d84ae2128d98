"""Loop control's cost per verification step: LASER's index (laser.repeats) against HF's own
processors run at every tree position (what `logits_processor=` costs), and against the step.

Run: pytest benchmarks/bench_repeats.py --benchmark-only
One SmolLM2-sized step: a 400-token text (prompt + output so far), a 32-node draft tree of
depth <= 10, logits [33, 49,152] fp32; no_repeat_ngram_size 4 with repetition_penalty 1.1.
The verification forward it rides on costs ~20-60 ms here (laser calibrate): the index's
median is the share of a step that loop control adds at equal drafts.
"""

import numpy as np
import pytest
import torch
from test_repeats import Tree

from laser.engine import _process
from laser.repeats import RowText

VOCAB, N, PENALTY = 49_152, 4, 1.1


@pytest.fixture(scope="module")
def step():
    rng = np.random.default_rng(0)
    phrases = [rng.integers(0, 3_000, rng.integers(3, 9)) for _ in range(40)]
    text = np.concatenate([phrases[int(i)] for i in rng.integers(0, 40, 80)])[:400].astype(np.int32)
    parents = [-1]
    depth = [1]
    while len(parents) < 32:  # chains off earlier nodes, at most depth 10
        p = int(rng.integers(-1, len(parents)))
        if p < 0 or depth[p] < 10:
            parents.append(p)
            depth.append(1 if p < 0 else depth[p] + 1)
    tree = Tree(rng.integers(0, 3_000, 32), parents)
    logits = torch.randn(33, VOCAB)
    return text, tree, logits


def test_index(benchmark, step):
    text, tree, logits = step
    row = RowText(text, VOCAB, N, PENALTY)

    def run():
        x = logits.clone()
        row.apply(x, tree)

    benchmark.group = "loop control"
    benchmark(run)


def test_python_hf_processors_per_position(benchmark, step):
    """The baseline of the ratio table (conftest.py: a name holding "python")."""
    from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    text, tree, logits = step
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(PENALTY), NoRepeatNGramLogitsProcessor(N)])
    benchmark.group = "loop control"
    benchmark(lambda: _process(logits, text, text.size, tree, procs))


def test_clone_only(benchmark, step):
    """The logits copy both runs make: what either adds beyond it is its own."""
    _, _, logits = step
    benchmark.group = "loop control"
    benchmark(logits.clone)
