"""Retrieval pool (C++ trie): agreement with the Python reference, tree invariants, limits."""

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from laser import PoolFormatError, RetrievalPool, draft_union
from laser._C import PoolIOError
from reference_pool import RefPool, draft as ref_draft

# Small alphabets make long shared n-grams (and ties) likely.
texts = st.lists(st.lists(st.integers(0, 7), min_size=0, max_size=40), min_size=1, max_size=6)
contexts = st.lists(st.integers(0, 7), min_size=0, max_size=8)


def all_paths(ref: RefPool):
    stack = [((), ref.root)]
    while stack:
        path, node = stack.pop()
        yield path, node[0]
        for tok, child in node[1].items():
            stack.append((path + (tok,), child))


def tree_tuple(t):
    return t.tokens.tolist(), t.parents.tolist(), t.depth.tolist(), t.counts.tolist(), t.match_len


def check_invariants(t, budget):
    n = len(t)
    assert n <= budget
    assert t.mask.shape == (n, n) and t.mask.dtype == np.bool_
    for i in range(n):
        p = t.parents[i]
        assert p < i, "DFS order: parent precedes child"
        assert t.depth[i] == (1 if p < 0 else t.depth[p] + 1)
        ancestors = set()
        j = i
        while j >= 0:
            ancestors.add(j)
            j = t.parents[j]
        assert set(np.flatnonzero(t.mask[i]).tolist()) == ancestors
    # DFS pre-order: each subtree is a contiguous block
    for i in range(n):
        sub = [j for j in range(n) if t.mask[j, i]]
        assert sub == list(range(i, i + len(sub)))
    leaves = [i for i in range(n) if i not in set(t.parents.tolist())]
    assert t.paths.shape[0] == len(leaves)
    for row, leaf in zip(t.paths, leaves):
        path = [int(x) for x in row if x >= 0]
        assert path[-1] == leaf and len(path) == t.depth[leaf]
        assert all(row[len(path) :] == -1)
        for a, b in zip(path, path[1:]):
            assert t.parents[b] == a
        assert t.parents[path[0]] == -1


@settings(max_examples=150, deadline=None)
@given(texts=texts, max_depth=st.integers(1, 6), weights=st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=6, max_size=6))
def test_counts_match_reference(texts, max_depth, weights):
    pool, ref = RetrievalPool(max_depth=max_depth), RefPool(max_depth)
    for text, w in zip(texts, weights):
        pool.insert(np.array(text, dtype=np.int32), w)
        ref.insert(text, w)
    assert len(pool) == len(ref)
    for path, count in all_paths(ref):
        assert pool.count(list(path)) == pytest.approx(count)


@settings(max_examples=150, deadline=None)
@given(text=st.lists(st.integers(0, 5), max_size=40), cuts=st.lists(st.integers(0, 40), max_size=5), max_depth=st.integers(1, 6))
def test_streaming_extend_equals_one_insert(text, cuts, max_depth):
    whole, stream = RetrievalPool(max_depth=max_depth), RetrievalPool(max_depth=max_depth)
    whole.insert(text)
    bounds = sorted({0, len(text), *[min(c, len(text)) for c in cuts]})
    stream.insert(text[: bounds[1]] if len(bounds) > 1 else [])
    for a, b in zip(bounds[1:], bounds[2:]):
        stream.extend(text[:a], text[a:b])
    ref = RefPool(max_depth)
    ref.insert(text)
    assert len(stream) == len(whole) == len(ref)
    for path, count in all_paths(ref):
        assert stream.count(list(path)) == whole.count(list(path)) == count


@settings(max_examples=200, deadline=None)
@given(texts=texts, ctx=contexts, budget=st.integers(0, 20), max_depth=st.integers(2, 7),
       depth_cap=st.integers(1, 7), min_match=st.integers(1, 2), extra=st.integers(0, 3))
def test_draft_matches_reference(texts, ctx, budget, max_depth, depth_cap, min_match, extra):
    pool, ref = RetrievalPool(max_depth=max_depth), RefPool(max_depth)
    for text in texts:
        pool.insert(text)
        ref.insert(text)
    max_match = min_match + extra
    t = pool.draft(ctx, budget=budget, max_depth=depth_cap, min_match=min_match, max_match=max_match)
    want = ref_draft([ref], [1.0], ctx, budget, depth_cap, min_match, max_match)
    assert tree_tuple(t) == want
    check_invariants(t, budget)


@settings(max_examples=100, deadline=None)
@given(a=texts, b=texts, ctx=contexts, budget=st.integers(0, 16), wb=st.sampled_from([0.5, 1.0, 3.0]))
def test_union_draft_matches_reference(a, b, ctx, budget, wb):
    pools, refs = [RetrievalPool(max_depth=5), RetrievalPool(max_depth=5)], [RefPool(5), RefPool(5)]
    for texts_, pool, ref in zip((a, b), pools, refs):
        for text in texts_:
            pool.insert(text)
            ref.insert(text)
    t = draft_union(pools, [1.0, wb], ctx, budget=budget, max_depth=5, min_match=1)
    assert tree_tuple(t) == ref_draft(refs, [1.0, wb], ctx, budget, 5, 1, 4)
    check_invariants(t, budget)


def test_budget_is_exact_under_ties():
    pool = RetrievalPool(max_depth=4)
    for tok in range(100):  # 100 children of token 7, all with count 1
        pool.insert([7, 1000 + tok, 2000 + tok])
    for budget in (0, 1, 5, 63, 64, 150):
        t = pool.draft([7], budget=budget, min_match=1)
        assert len(t) == min(budget, 200)
        check_invariants(t, budget)
    # ties break by depth, then token id: the first level is tokens 1000, 1001, ...
    t = pool.draft([7], budget=5, min_match=1)
    assert t.depth.tolist() == [1, 1, 1, 1, 1]
    assert t.tokens.tolist() == [1000, 1001, 1002, 1003, 1004]
    assert tree_tuple(pool.draft([7], budget=5, min_match=1)) == tree_tuple(t)  # deterministic


def test_empty_match_gives_empty_tree():
    pool = RetrievalPool()
    t = pool.draft([1, 2, 3])
    assert len(t) == 0 and t.match_len == 0 and t.tokens.shape == (0,) and t.mask.shape == (0, 0)
    assert t.paths.shape == (0, 0)
    pool.insert([1, 2, 3])
    assert len(pool.draft([], budget=8)) == 0
    assert len(pool.draft([9], budget=8)) == 0


def test_longest_suffix_wins():
    pool = RetrievalPool(max_depth=6)
    pool.insert([1, 2, 3, 10])
    pool.insert([5, 2, 3, 20])
    pool.insert([5, 2, 3, 20])
    pool.insert([9, 9, 3, 30, 31])
    t = pool.draft([1, 2, 3], budget=1)
    assert t.match_len == 3 and t.tokens.tolist() == [10]
    t = pool.draft([7, 3], budget=3)  # the default min_match 2: no 2-token suffix matches
    assert len(t) == 0
    t = pool.draft([7, 3], budget=3, min_match=1)  # only the 1-token suffix matches: all of 3's children
    assert t.match_len == 1 and sorted(t.tokens[t.depth == 1].tolist()) == [10, 20, 30]


def test_cost_curve_cuts_tree():
    pool = RetrievalPool(max_depth=8)
    pool.insert(list(range(8)) * 3)
    flat = pool.draft([0], budget=7, cost=np.ones(8), min_match=1)  # free verification: keep everything
    assert len(flat) == 7
    steep = pool.draft([0], budget=7, cost=1.0 + 10.0 * np.arange(8), min_match=1)  # every node costs a lot
    assert len(steep) == 0
    with pytest.raises(ValueError, match="positive"):
        pool.draft([0], cost=np.zeros(4))


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    pool = RetrievalPool(max_depth=5, vocab_size=50, max_nodes=5000, decay=0.75)
    for _ in range(20):
        pool.insert(rng.integers(0, 50, 60))
    path = tmp_path / "pool.bin"
    pool.save(str(path))
    back = RetrievalPool.load(str(path))
    assert (len(back), back.max_depth, back.vocab_size, back.max_nodes) == (len(pool), 5, 50, 5000)
    for ctx in rng.integers(0, 50, (30, 4)):
        assert tree_tuple(back.draft(ctx, budget=16)) == tree_tuple(pool.draft(ctx, budget=16))
    # the loaded pool keeps working
    back.insert([1, 2, 3])
    assert back.count([1, 2, 3]) == pool.count([1, 2, 3]) + 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "magic", "version", "empty", "foreign"])
def test_corrupt_file_raises_pool_format_error(tmp_path, damage):
    pool = RetrievalPool(max_depth=4)
    pool.insert([1, 2, 3, 4, 5, 6])
    path = tmp_path / "pool.bin"
    pool.save(str(path))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-20]
    elif damage == "flip":
        data[60] ^= 0x40
    elif damage == "magic":
        data[0:4] = b"PK\x03\x04"
    elif damage == "version":
        data[8] = 99
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"\x80\x04\x95" + b"pickle" * 20)
    path.write_bytes(bytes(data))
    with pytest.raises(PoolFormatError):
        RetrievalPool.load(str(path))
    assert issubclass(PoolFormatError, ValueError)


def test_missing_or_unwritable_file(tmp_path):
    with pytest.raises(PoolIOError, match="cannot open"):
        RetrievalPool.load(str(tmp_path / "nope.bin"))
    with pytest.raises(OSError):
        RetrievalPool().save(str(tmp_path / "no" / "such" / "dir.bin"))


def test_max_nodes_cap_over_a_million_windows():
    rng = np.random.default_rng(1)
    pool = RetrievalPool(max_depth=8, max_nodes=60_000, decay=0.5)
    frequent = rng.integers(0, 1000, 50).astype(np.int32)
    for step in range(1000):  # 1000 x 1000 tokens = 10^6 windows
        pool.insert(rng.integers(0, 30_000, 1000).astype(np.int32))
        if step % 2 == 0:  # a text seen often outlives the decay; one-off noise does not
            pool.insert(frequent, 5.0)
        assert len(pool) <= 60_000
    assert pool.prune_count > 0
    assert pool.memory_bytes() < 60_000 * 100
    assert pool.count(frequent[:4]) > 0
    assert len(pool.draft(frequent[:3], budget=8)) > 0


def test_draft_arguments_are_parsed_like_python():
    """draft/draft_union parse their own arguments (no pybind11 dispatcher): same rules as a def."""
    pool = RetrievalPool()
    pool.insert([1, 2, 3, 1, 2, 4])
    want = tree_tuple(pool.draft([1, 2], 8, 0, 1, 4, None))
    assert tree_tuple(pool.draft([1, 2], budget=8)) == want
    assert tree_tuple(pool.draft(context=[1, 2], min_chance=0.0, budget=np.int64(8))) == want
    assert tree_tuple(pool.draft(**{"context": [1, 2], "bud" + "get": 8})) == want  # non-interned names
    assert tree_tuple(draft_union([pool], [1.0], [1, 2], budget=8, max_depth=12)) == want
    assert tree_tuple(draft_union(pools=[pool], weights=[1.0], context=[1, 2], budget=8)) == want
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        pool.draft([1], bogus=1)
    with pytest.raises(TypeError, match="multiple values for argument 'budget'"):
        pool.draft([1], 4, budget=4)
    with pytest.raises(TypeError, match="missing required argument 'context'"):
        pool.draft(budget=4)
    with pytest.raises(TypeError, match="at most 11 arguments"):
        pool.draft([1], 1, 1, 1, 1, None, None, None, 0.0, 1, 0, 5)
    with pytest.raises(TypeError, match="acceptance must be an AcceptanceModel"):
        pool.draft([1], acceptance=5)
    with pytest.raises(TypeError, match="budget must be an int"):
        pool.draft([1], budget=2.5)
    with pytest.raises(TypeError, match="min_chance must be a float"):
        pool.draft([1], min_chance="high")
    with pytest.raises(ValueError, match="int32 range"):
        pool.draft([1], budget=2**40)
    with pytest.raises(ValueError, match="budget"):
        pool.draft([1], budget=-1)
    with pytest.raises(TypeError, match="RetrievalPool"):
        draft_union([pool, None], [1.0, 1.0], [1])
    with pytest.raises(TypeError):
        draft_union([pool, "pool"], [1.0, 1.0], [1])
    with pytest.raises(TypeError, match="missing required argument 'weights'"):
        draft_union([pool], context=[1])
    with pytest.raises(TypeError):  # still a method of RetrievalPool only
        RetrievalPool.draft("not a pool", [1])


def test_token_id_validation():
    pool = RetrievalPool(vocab_size=100)
    with pytest.raises(ValueError, match="out of range"):
        pool.insert([1, 2, 100])
    with pytest.raises(ValueError, match="out of range"):
        pool.insert([1, -1])
    with pytest.raises(ValueError, match="out of range"):
        pool.draft([5, 100])
    with pytest.raises(TypeError, match="integers"):
        pool.insert(np.array([1.5, 2.0]))
    with pytest.raises(ValueError, match="1-D"):
        pool.insert(np.zeros((2, 2), dtype=np.int32))
    assert len(pool) == 1, "rejected input leaves the pool untouched"
    big = RetrievalPool()  # vocab_size=0: any int32 id
    big.insert(np.array([2**31 - 1, 0], dtype=np.int64))
    assert big.count([2**31 - 1]) == 1
    with pytest.raises(ValueError):
        big.insert(np.array([2**31], dtype=np.int64))
    with pytest.raises(ValueError):
        big.insert(np.array([2**64 - 1], dtype=np.uint64))
    with pytest.raises(ValueError):
        RetrievalPool(max_depth=0)
    with pytest.raises(ValueError):
        pool.insert([1, 2], weight=0.0)


def test_concurrent_union_drafts_in_opposite_orders_finish():
    """Pools are locked in one global order: [a, b] and [b, a] drafting at once cannot deadlock."""
    a, b = RetrievalPool(), RetrievalPool()
    rng = np.random.default_rng(3)
    for _ in range(20):
        a.insert(rng.integers(0, 20, 50))
        b.insert(rng.integers(0, 20, 50))

    def work(pools):
        for _ in range(3000):
            draft_union(pools, [1.0, 2.0], [1, 2, 3], budget=16)

    threads = [threading.Thread(target=work, args=(order,), daemon=True) for order in ([a, b], [b, a], [a, b], [b, a])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "drafts deadlocked"


def test_concurrent_insert_and_draft():
    """Insert/draft release the GIL; a pool's own lock keeps concurrent use consistent."""
    pool = RetrievalPool(max_depth=6, max_nodes=5_000)
    rng = np.random.default_rng(2)
    data = [rng.integers(0, 200, 300).astype(np.int32) for _ in range(40)]
    errors = []

    def writer():
        for d in data:
            pool.insert(d)

    def reader():
        try:
            for d in data:
                check_invariants(pool.draft(d[:3], budget=16), 16)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and len(pool) <= 5_000


def test_draft_defaults_are_the_jobs_pinned_drafting():
    """DraftConfig's defaults are the job's --acceptance drafting (the decoder scores drafts with an
    AcceptanceModel by default); the pool primitives' defaults, in the binding and the stubs, are the
    job's drafting by pool shares (acceptance=None). Budget, depth and the model's floor agree."""
    import ast
    import inspect
    from pathlib import Path

    import laser
    from laser import DraftConfig
    from laser.job import JOB_DRAFT, JOB_DRAFT_ACCEPTANCE

    cfg = DraftConfig()
    assert all(getattr(cfg, k) == v for k, v in JOB_DRAFT_ACCEPTANCE.items())
    common = ("budget", "max_depth", "min_chance", "min_nodes")
    shares = {**{k: getattr(cfg, k) for k in common}, "match_levels": 1,
              **{k: v for k, v in JOB_DRAFT.items() if k != "prompt_weight"}}
    for fn in (RetrievalPool.draft, draft_union):
        params = inspect.signature(fn).parameters
        for name, want in shares.items():
            assert params[name].default == want, (fn.__name__, name)
    stubs = ast.parse((Path(laser.__file__).parent / "_C.pyi").read_text())
    seen = 0
    for node in ast.walk(stubs):  # the type stubs say the same
        if isinstance(node, ast.FunctionDef) and node.name in ("draft", "draft_union"):
            names = [a.arg for a in node.args.args][-len(node.args.defaults):]
            stub = dict(zip(names, (ast.literal_eval(d) for d in node.args.defaults)))
            assert all(stub[name] == want for name, want in shares.items()), node.name
            seen += 1
    assert seen == 2
