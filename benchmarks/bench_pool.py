"""Retrieval pool micro-benchmarks: the C++ pool against the same algorithm in Python.

Run: pytest benchmarks/bench_pool.py --benchmark-only
Targets (issue 2): draft+flatten of 64 nodes <= 10 us median, insert of a 200-token text
<= 100 us, both >= 20x the Python version. The cyclic GC is off while timing (as in
timeit): the Python reference keeps ~10^6 objects alive, whose collections would
otherwise land on whichever call happens to trigger them.
"""

import numpy as np
import pytest

from laser import RetrievalPool
from reference_pool import RefPool, draft as ref_draft

VOCAB, DEPTH = 49_152, 12


def zipf_text(rng, n):
    """Token stream with a Zipf-like unigram law and repeated phrases, like knowledge texts."""
    phrases = [rng.integers(0, 2_000, rng.integers(3, 12)) for _ in range(300)]
    out = []
    while len(out) < n:
        if rng.random() < 0.5:
            out.extend(phrases[min(int(rng.zipf(1.3)) - 1, len(phrases) - 1)].tolist())
        else:
            out.extend((np.minimum(rng.zipf(1.2, 4), VOCAB) - 1).tolist())
    return np.asarray(out[:n], dtype=np.int32)


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    return zipf_text(rng, 170_000), [zipf_text(rng, 200) for _ in range(64)]


@pytest.fixture(scope="module")
def big_pools(corpus):
    stream, _ = corpus
    native, ref = RetrievalPool(max_depth=DEPTH, vocab_size=VOCAB, max_nodes=1 << 22), RefPool(DEPTH)
    for i in range(0, len(stream), 1000):
        native.insert(stream[i : i + 1000])
        ref.insert(stream[i : i + 1000].tolist())
    assert len(native) >= 1_000_000, len(native)
    # contexts whose draft fills the whole 64-node budget
    ctxs = [stream[i : i + 4] for i in range(0, 20_000, 97)]
    ctxs = [c for c in ctxs if len(native.draft(c, budget=64, max_depth=DEPTH, min_match=1)) == 64][:32]
    assert ctxs
    return native, ref, ctxs


def cycle(items):
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]

    return nxt


@pytest.mark.benchmark(group="insert-200", disable_gc=True)
def test_insert_native(benchmark, corpus):
    _, texts = corpus
    pool, nxt = RetrievalPool(max_depth=DEPTH, vocab_size=VOCAB), cycle(texts)
    benchmark(lambda: pool.insert(nxt()))


@pytest.mark.benchmark(group="insert-200", disable_gc=True)
def test_insert_python(benchmark, corpus):
    _, texts = corpus
    pool, lists = RefPool(DEPTH), [t.tolist() for t in texts]
    nxt = cycle(lists)
    benchmark.pedantic(lambda: pool.insert(nxt()), rounds=200, iterations=1)


@pytest.mark.benchmark(group="draft-64", disable_gc=True)
def test_draft_native(benchmark, big_pools):
    native, _, ctxs = big_pools
    nxt = cycle(ctxs)
    tree = benchmark(lambda: native.draft(nxt(), budget=64, max_depth=DEPTH, min_match=1))  # as ref_draft
    assert len(tree) == 64 and tree.mask.shape == (64, 64)


@pytest.mark.benchmark(group="draft-64", disable_gc=True)
def test_draft_python(benchmark, big_pools):
    native, ref, ctxs = big_pools
    lists = [c.tolist() for c in ctxs]
    nxt = cycle(lists)
    out = benchmark.pedantic(lambda: ref_draft([ref], [1.0], nxt(), 64, DEPTH), rounds=200, iterations=1)
    assert len(out[0]) == 64
