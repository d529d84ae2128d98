"""The acceptance model (C++ AcceptanceModel): bins, learning, calibrated drafts, and exactness
of strict decoding with it (engine and replay agree step for step)."""

import threading

import numpy as np
import pytest

import laser
from laser import AcceptanceModel, RetrievalPool, cut_trees, draft_union
from laser.batch import Request, generate_batch
from laser.config import GLOBAL, OWN, SHARED

TEXT = [1, 2, 3, 4, 5, 1, 2, 3, 6, 1, 2, 3, 4, 7, 8, 1, 2, 9]


def pool_of(*texts, depth=8):
    pool = RetrievalPool(max_depth=depth)
    for t in texts:
        pool.insert(np.asarray(t, dtype=np.int32))
    return pool


def test_bins_cover_the_table_and_separate_sources():
    m = AcceptanceModel()
    size = int(np.prod(AcceptanceModel.shape))
    assert m.q.shape == m.hits.shape == m.tries.shape == (size,)
    corners = [AcceptanceModel.bin(s, c, n, v, longest) for s in (0, 3) for c in (1, 500) for n in (1, 1e6)
               for longest in (False, True) for v in (0.0, 1.0)]
    assert min(corners) == 0 and max(corners) == size - 1 and len(set(corners)) == len(corners)
    assert AcceptanceModel.bin(SHARED, 3, 5, 0.5) != AcceptanceModel.bin(OWN, 3, 5, 0.5)
    assert AcceptanceModel.bin(SHARED, 3, 5, 0.5) == AcceptanceModel.bin(SHARED, 3, 5, 0.5, True)
    assert AcceptanceModel.bin(SHARED, 3, 5, 0.5, False) != AcceptanceModel.bin(SHARED, 3, 5, 0.5, True)
    # with no observations q is the bin's share (mid-point), nondecreasing in the share
    q = m.q.reshape(AcceptanceModel.shape)
    assert np.allclose(q[0, 0, 0, 0], (np.arange(10) + 0.5) / 10)
    assert np.all(np.diff(q, axis=-1) >= 0)


def test_a_calibrated_draft_scores_each_node_by_the_product_of_q_along_its_path():
    pool, m = pool_of(TEXT), AcceptanceModel()
    t = pool.draft([9, 1, 2], budget=8, min_match=1, acceptance=m)
    assert len(t) == 8 and t.root_count == 1.0 and np.all(t.bins >= 0)
    q = m.q
    for i in range(len(t)):
        parent = 1.0 if t.parents[i] < 0 else t.counts[t.parents[i]]
        assert t.counts[i] == pytest.approx(parent * q[t.bins[i]], rel=1e-6)
    order = np.argsort(t.rank)  # best-first selection: chances never increase
    assert np.all(np.diff(t.counts[order]) <= 1e-7)
    # the first node: 3 follows 3 of the 4 windows [1, 2] (context 2, parent count 4, share 0.75)
    assert t.tokens[0] == 3 and t.bins[0] == AcceptanceModel.bin(0, 2, 4, 0.75)
    plain = pool.draft([9, 1, 2], budget=8, min_match=1)  # without a model: counts and no bins
    assert np.all(plain.bins == -1) and plain.root_count == 4.0


def test_observe_counts_only_nodes_whose_parent_was_accepted():
    pool, m = pool_of(TEXT), AcceptanceModel()
    t = pool.draft([9, 1, 2], budget=8, min_match=1, acceptance=m)
    path = [0, 1]  # 3, then 4 accepted
    tried = [i for i in range(len(t)) if t.parents[i] < 0 or t.parents[i] in path]
    m.observe(t, path)
    assert m.tries.sum() == len(tried) and m.hits.sum() == len(path)
    for i in tried:
        assert m.tries[t.bins[i]] >= 1
    with pytest.raises(ValueError, match="out of range"):
        m.observe(t, [len(t)])


def test_learning_moves_q_toward_what_is_accepted():
    pool = pool_of(TEXT)
    m = AcceptanceModel(prior=2.0)
    t = pool.draft([9, 1, 2], budget=8, min_match=1, acceptance=m)
    first = t.bins[0]
    before = m.q[first]
    for _ in range(50):
        m.observe(t, [])  # nothing accepted: every child of the context was wrong
    assert m.q[first] < before / 3
    again = pool.draft([9, 1, 2], budget=8, min_match=1, acceptance=m)
    assert again.counts.max() < t.counts.max()  # the same tree now looks unlikely
    q = m.q.reshape(AcceptanceModel.shape)
    assert np.all(np.diff(q, axis=-1) >= 0)  # still nondecreasing in the share


def test_state_round_trips_and_bad_state_is_refused():
    pool, m = pool_of(TEXT), AcceptanceModel()
    t = pool.draft([9, 1, 2], budget=8, min_match=1, acceptance=m)
    m.observe(t, [0])
    copy = AcceptanceModel()
    copy.set_state(m.hits, m.tries)
    assert np.array_equal(copy.q, m.q)
    with pytest.raises(ValueError, match="length"):
        copy.set_state(m.hits[:5], m.tries[:5])
    with pytest.raises(ValueError, match="hits <= tries"):
        copy.set_state(m.tries + 1, m.tries)
    with pytest.raises(ValueError, match="prior"):
        AcceptanceModel(prior=0.0)


def test_min_chance_keeps_only_likely_nodes():
    pool, m = pool_of(TEXT), AcceptanceModel()
    full = pool.draft([9, 1, 2], budget=16, min_match=1, acceptance=m)
    cut = pool.draft([9, 1, 2], budget=16, min_match=1, acceptance=m, min_chance=0.3)
    assert 0 < len(cut) < len(full) and cut.counts.min() >= 0.3
    kept = sorted(zip(full.tokens.tolist(), full.depth.tolist(), full.counts.tolist()), key=lambda x: -x[2])
    assert sorted(zip(cut.tokens.tolist(), cut.depth.tolist(), cut.counts.tolist()), key=lambda x: -x[2]) == \
        [k for k in kept if k[2] >= 0.3]
    with pytest.raises(ValueError, match="min_chance"):
        pool.draft([1], acceptance=m, min_chance=1.0)


def test_min_nodes_is_a_floor_below_which_min_chance_does_not_cut():
    pool, m = pool_of(TEXT), AcceptanceModel()
    full = pool.draft([9, 1, 2], budget=16, min_match=1, acceptance=m)
    likely = int((full.counts >= 0.3).sum())
    assert 0 < likely < 8 < len(full)
    best_first = sorted(zip(full.rank.tolist(), full.tokens.tolist(), full.depth.tolist()))
    for floor in (0, likely, 8, 16, 40):
        t = pool.draft([9, 1, 2], budget=16, min_match=1, acceptance=m, min_chance=0.3, min_nodes=floor)
        n = min(len(full), max(floor, likely))  # the first `floor` nodes, then those of chance >= 0.3
        assert sorted(zip(t.rank.tolist(), t.tokens.tolist(), t.depth.tolist())) == best_first[:n]
    assert len(pool.draft([9, 1, 2], budget=16, min_match=1, min_chance=0.3, min_nodes=2)) == len(
        pool.draft([9, 1, 2], budget=16, min_match=1))  # both only apply to calibrated drafts
    with pytest.raises(ValueError, match="min_nodes"):
        pool.draft([1], acceptance=m, min_nodes=-1)
    with pytest.raises(ValueError, match="min_nodes"):
        laser.DraftConfig(min_nodes=-1)


def test_match_levels_add_the_continuations_of_shorter_contexts():
    pool = pool_of([5, 1, 2, 3], [7, 2, 4], [7, 2, 4])  # after [5, 1, 2]: 3; after [2] alone: 3 or 4
    m = AcceptanceModel()
    one = pool.draft([5, 1, 2], budget=4, min_match=1, acceptance=m)
    two = pool.draft([5, 1, 2], budget=4, min_match=1, acceptance=m, match_levels=3)  # [5, 1, 2], [1, 2], [2]
    assert set(one.tokens[one.depth == 1].tolist()) == {3}
    assert set(two.tokens[two.depth == 1].tolist()) == {3, 4}
    for kw in ({}, {"acceptance": m}):  # match_levels 1 is the plain draft
        a = pool.draft([5, 1, 2], budget=4, min_match=1, **kw)
        b = pool.draft([5, 1, 2], budget=4, min_match=1, match_levels=1, **kw)
        assert a.tokens.tolist() == b.tokens.tolist() and a.counts.tolist() == b.counts.tolist()
    with pytest.raises(ValueError, match="match_levels"):
        pool.draft([1], match_levels=0)
    # 3 continues the longest matched context [5, 1, 2]; 4 only the shortest, [2] (count 3, share 2/3)
    four = int(np.flatnonzero((two.tokens == 4) & (two.depth == 1))[0])
    three = int(np.flatnonzero((two.tokens == 3) & (two.depth == 1))[0])
    assert two.bins[four] == AcceptanceModel.bin(SHARED, 1, 3, 2 / 3, False)
    assert two.bins[three] % (2 * 10) >= 10  # longest = True: the upper half of its (longest, share) row


def test_sources_name_a_slot_per_pool():
    a, b, m = pool_of(TEXT), pool_of([1, 2, 3, 4]), AcceptanceModel()
    t = draft_union([a, b], [1.0, 8.0], [9, 1, 2], budget=6, min_match=1, acceptance=m, sources=[SHARED, OWN])
    assert len(t) == 6 and np.all(t.bins >= 0)
    with pytest.raises(ValueError, match="one source slot per pool"):
        draft_union([a, b], [1.0, 1.0], [1, 2], acceptance=m, sources=[0])
    with pytest.raises(ValueError, match="sources must be in"):
        draft_union([a, b], [1.0, 1.0], [1, 2], acceptance=m, sources=[0, 9])


def test_calibrated_trees_cut_together_by_their_chances():
    pool, m = pool_of(TEXT), AcceptanceModel()
    trees = [pool.draft(ctx, budget=8, min_match=1, acceptance=m) for ctx in ([9, 1, 2], [4, 7])]
    flat = cut_trees(trees + [None], np.ones(9))  # free verification: nothing is cut
    assert [len(t) for t in flat[:2]] == [len(t) for t in trees] and flat[2] is None
    steep = cut_trees(trees, 1.0 + 10.0 * np.arange(9))
    assert all(len(t) == 0 for t in steep)
    mid = cut_trees(trees, np.array([1.0] + [1.0 + 0.05 * b for b in range(1, 9)]))
    for t, c in zip(trees, mid):  # a prefix in best-first order, bins carried along
        assert len(c) <= len(t) and set(c.bins.tolist()) <= set(t.bins.tolist())


def test_observe_and_draft_from_two_threads():
    pool, m, errors = pool_of(TEXT * 3), AcceptanceModel(), []

    def work(ctx):
        try:
            for _ in range(300):
                t = pool.draft(ctx, budget=8, min_match=1, acceptance=m)
                m.observe(t, [0] if len(t) else [])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(c,)) for c in ([9, 1, 2], [4, 7])]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and m.tries.sum() >= 600


def test_strict_with_an_acceptance_model_is_greedy_and_the_replay_takes_the_same_steps(peaked_model):
    """The engine learns online (one model over many requests) drafting from each request's
    group pool and a global pool (pool=[group, global]); strict output stays greedy, and
    laser.replay with its own fresh model takes exactly the engine's steps."""
    from test_decode import greedy

    from laser.data import chat_ids
    from laser.groups import PoolSet
    from laser.job import JobConfig, make_plan
    from laser.replay import replay

    model, tok = laser.load_model(peaked_model)
    plan = make_plan(JobConfig(dataset="ml-100k", target="users", pool="attribute", max_depth=14, pool_depth=16,
                               global_pool=True))
    keys = plan.all_keys[:8]
    prompts = {k: chat_ids(tok, plan.template.render(plan.ds, "users", k)) for k in keys}
    pools = PoolSet("attribute", max_depth=16, vocab_size=len(tok), with_global=True)
    # a hard node budget, as the replay drafts (no cost cut: auto_cost=False)
    draft = laser.DraftConfig(budget=12, max_depth=14, min_match=1, max_match=10, match_levels=2, min_chance=0.02,
                              auto_cost=False)
    learned = AcceptanceModel()
    records, steps = [], 0
    for i, k in enumerate(keys):
        group = plan.group(k)
        res = laser.generate(model, prompts[k], pool=pools.draft_pools(group), max_new_tokens=32, draft=draft,
                             update_pool=False, acceptance=learned)
        assert res.sequences[0].tolist() == greedy(model, prompts[k], 32)
        new = res.sequences[0, len(prompts[k]):].numpy()
        records.append({"id": k, "group": group, "tokens": new.tolist()})
        pools.insert(group, new)
        if i >= 3:
            steps += res.stats.steps
    assert len(pools.pools) > 1 and pools.everything.count([]) == sum(p.count([]) for p in pools.pools.values())
    assert learned.tries.sum() > 0 and learned.hits.reshape(4, -1)[GLOBAL].sum() > 0  # the global pool's drafts
    fresh = AcceptanceModel()
    out = replay(records, prompts, plan, budget=12, warm=3, n_eval=5, draft=draft, acceptance=fresh, learn_warm=True)
    assert out["steps"] == steps
    assert np.array_equal(fresh.hits, learned.hits) and np.array_equal(fresh.tries, learned.tries)


def test_pool_lists_are_checked_and_each_pool_receives_the_output(peaked_model):
    model, tok = laser.load_model(peaked_model)
    a, b = laser.RetrievalPool(max_depth=8), laser.RetrievalPool(max_depth=8)
    a.insert([5, 6, 7])
    ids = tok("Tell me about films.")["input_ids"]
    out = laser.generate(model, ids, pool=[a, b], max_new_tokens=12, eos_token_id=None)
    assert a.count([]) == 3 + 12 and b.count([]) == 12  # the output's windows entered both
    with pytest.raises(TypeError, match="pool must be a RetrievalPool"):
        laser.generate(model, ids, pool=[a, "b"], max_new_tokens=4)
    with pytest.raises(ValueError, match="twice"):
        laser.generate(model, ids, pool=[a, a], max_new_tokens=4)
    with pytest.raises(TypeError, match="pool must be"):
        list(generate_batch(model, [Request(ids, pool=3)], max_new_tokens=4))
    assert out.sequences.shape[1] == len(ids) + 12


def test_the_decoder_drafts_with_its_engines_model_by_default(peaked_model):
    """acceptance="auto" (generate's and generate_batch's default): the engine keeps one model per
    AcceptConfig, learning across calls; None drafts by pool shares and teaches no model."""
    from test_decode import greedy

    model, tok = laser.load_model(peaked_model)
    engine = laser.Engine(model)
    ids = tok("Tell me about films.")["input_ids"]
    ref = greedy(model, ids, 24)
    pool = RetrievalPool(max_depth=12)
    pool.insert(np.asarray(ref[len(ids):], dtype=np.int32))
    shares = laser.DraftConfig(min_match=2, max_match=4)
    out = laser.generate(model, ids, pool=pool, max_new_tokens=24, eos_token_id=None, draft=shares, acceptance=None,
                         update_pool=False)
    assert out.sequences[0].tolist() == ref and out.stats.mean_accepted > 1
    strict = engine.acceptance("auto", laser.AcceptConfig())
    assert strict.tries.sum() == 0  # drafting by shares taught nothing

    out = laser.generate(model, ids, pool=pool, max_new_tokens=24, eos_token_id=None, update_pool=False)
    assert out.sequences[0].tolist() == ref and out.stats.mean_accepted > 1
    taught = strict.tries.sum()
    assert taught > 0 and strict.hits.sum() > 0
    relaxed = engine.acceptance("auto", laser.AcceptConfig("relaxed"))
    assert relaxed is not strict and relaxed.tries.sum() == 0
    laser.generate(model, ids, pool=pool, max_new_tokens=24, mode="relaxed", update_pool=False)
    assert relaxed.tries.sum() > 0 and strict.tries.sum() == taught  # each mode learns on its own
    assert engine.acceptance("auto", laser.AcceptConfig()) is strict  # one per configuration, kept across calls
    res = list(generate_batch(model, [Request(ids, pool)] * 2, batch_size=2, max_new_tokens=24, eos_token_id=None,
                              update_pool=False))
    assert all(r.tokens.tolist() == ref[len(ids):] for r in res) and strict.tries.sum() > taught
    with pytest.raises(TypeError, match="acceptance must be an AcceptanceModel, 'auto' or None"):
        laser.generate(model, ids, pool=pool, max_new_tokens=4, acceptance="learned")
