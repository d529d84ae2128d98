"""The engine's parts: TreeCache, the shared budget cut, configuration, sliding windows, refusals."""

import numpy as np
import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LogitsProcessorList, Qwen2Config, Qwen2ForCausalLM
from transformers import RepetitionPenaltyLogitsProcessor, StoppingCriteria

import laser
from laser.batch import Request, generate_batch
from laser.cache import TreeCache
from test_decode import V, greedy, greedy_case, tiny


def sliding(arch: str):
    """Tiny models whose windows (6 and 5 positions) are far shorter than what they decode."""
    torch.manual_seed(0)
    if arch == "gemma3":
        cfg = Gemma3TextConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                               sliding_window=6, layer_types=["sliding_attention", "sliding_attention",
                                                              "full_attention", "sliding_attention"])
        return Gemma3ForCausalLM(cfg).eval()
    cfg = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, max_position_embeddings=256, use_sliding_window=True, sliding_window=5,
                      max_window_layers=1)
    return Qwen2ForCausalLM(cfg).eval()


def _decodes_like_greedy(model):
    """Strict == greedy for three prompts, one row at a time and as one (ragged) batch of three;
    returns the prompts, their greedy outputs and the pool they drafted from."""
    prompts, wants, pool = greedy_case(model, 1, 3, 3, 12, 30)
    for p, w in zip(prompts, wants):
        assert laser.generate(model, p, pool=pool, max_new_tokens=30, eos_token_id=None,
                              update_pool=False).sequences[0].tolist() == w
    rows = laser.generate(model, prompts, pool=pool, max_new_tokens=30, eos_token_id=None, update_pool=False)
    assert [r[-30:] for r in rows.sequences.tolist()] == [w[-30:] for w in wants]
    return prompts, wants, pool


@pytest.mark.parametrize("arch", ["gemma3", "qwen2"])
def test_sliding_window_models_decode_exactly(arch):
    """Strict == greedy on models with sliding-window layers, one row and a ragged batch: the
    cache keeps every position, and the sliding layers' mask hides what their window does not
    reach (without it the outputs differ: checked below)."""
    model = sliding(arch)
    assert "sliding_attention" in model.config.layer_types
    prompts, wants, pool = _decodes_like_greedy(model)
    engine = laser.Engine(model)
    window, engine.window = engine.window, None
    try:
        blind = [laser.generate(model, p, max_new_tokens=30, eos_token_id=None).sequences[0].tolist() for p in prompts]
    finally:
        engine.window = window
    assert blind != wants, "the window must matter for this test to mean something"


def test_unsupported_layer_types_are_refused():
    model = tiny("llama", 0)
    model.config.layer_types = ["linear_attention", "full_attention"]
    with pytest.raises(ValueError, match="linear_attention"):
        laser.Engine(model)


def test_tree_cache_is_allocated_once_and_written_in_place(monkeypatch):
    """Every forward of a decode (prefill, verification) writes into the same buffers; the
    model sees them through HF's Cache interface; commit moves exactly the accepted columns."""
    model = tiny("llama", 4)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    want = greedy(model, prompt, 24, eos_token_id=None)
    pool = laser.RetrievalPool(max_depth=8, vocab_size=V)
    pool.insert(want[len(prompt):])
    seen = []
    real = TreeCache.commit

    def spy(cache, rows, src, dst):
        seen.append(tuple(cache.data_ptrs()))
        real(cache, rows, src, dst)

    monkeypatch.setattr(TreeCache, "commit", spy)
    out = laser.generate(model, prompt, pool=pool, max_new_tokens=24, eos_token_id=None, update_pool=False)
    assert out.sequences[0].tolist() == want
    assert len(seen) == out.stats.steps > 1 and len(set(seen)) == 1 and len(seen[0]) == 2 * model.config.num_hidden_layers

    cache = TreeCache(n_layers=1, rows=2, capacity=8)
    assert isinstance(cache, laser.cache.Cache) and cache.get_seq_length() == 0
    k = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).reshape(2, 1, 3, 2)
    with cache.filling([0, 1], [3, 2]):
        assert cache.get_seq_length() == 0
        keys, _ = cache.update(k, -k, 0)
    assert keys is k and cache.lens.tolist() == [3, 2]
    assert cache.begin_block() == 3 and cache.get_seq_length() == 3 and cache.get_mask_sizes(2, 0)[0] == 5
    block = 100 + torch.arange(8, dtype=torch.float32).reshape(2, 1, 2, 2)  # every column its own values
    keys, values = cache.update(block, -block, 0)
    assert keys.shape == (2, 1, 5, 2) and keys.data_ptr() == cache.layers[0].keys.data_ptr()  # a view
    buf = cache.layers[0].keys
    cache.commit(np.array([0, 1, 1]), np.array([3, 3, 4]), np.array([3, 2, 3]))  # row 0's column stays put
    assert cache.lens.tolist() == [4, 4]
    assert torch.equal(buf[0, 0, 3], block[0, 0, 0]) and torch.equal(buf[1, 0, 2:4], block[1, 0])
    cache.commit(np.array([0]), np.array([4]), np.array([3]))  # a column onto the past
    assert cache.lens.tolist() == [4, 4] and torch.equal(buf[0, 0, 3], block[0, 0, 1])
    assert torch.equal(buf[0, 0, :3], k[0, 0])
    cache.keep_rows([1])
    assert cache.rows == 1 and cache.lens.tolist() == [4, 0] and torch.equal(buf[0, 0, 2:4], block[1, 0])
    cache.begin_block()
    with pytest.raises(RuntimeError, match="capacity"):
        cache.update(torch.zeros(1, 1, 5, 2), torch.zeros(1, 1, 5, 2), 0)
    tracked = torch.zeros(1, 1, 1, 2, requires_grad=True)
    with pytest.raises(RuntimeError, match="no_grad"):  # its in-place buffers would keep every graph alive
        cache.update(tracked, tracked, 0)
    with torch.no_grad():
        cache.update(tracked, tracked, 0)


def test_cut_trees_is_the_drafts_own_cut_and_one_budget_for_a_batch():
    rng = np.random.default_rng(0)
    pool = laser.RetrievalPool(max_depth=8)
    for _ in range(60):
        pool.insert(rng.integers(0, 5, 50))
    cost = 1.0 + 0.15 * np.arange(33)
    contexts = [[1, 2], [3, 3], [0, 4, 1]]
    full = [pool.draft(c, budget=32) for c in contexts]
    for c, t in zip(contexts, full):  # one tree: the cut draft() makes with the same cost
        (alone,) = laser.cut_trees([t], cost)
        want = pool.draft(c, budget=32, cost=cost)
        assert alone.tokens.tolist() == want.tokens.tolist() and alone.parents.tolist() == want.parents.tolist()
    cut = laser.cut_trees(full + [None], cost)
    assert cut[-1] is None
    sizes = {len(t) for t in cut[:-1]}

    def score(b):  # sum over rows of (1 + expected accepted in the first b nodes) / cost[b]
        total = 0.0
        for t in full:
            chance = np.zeros(len(t))
            chance[t.rank] = np.minimum(1.0, t.counts / t.root_count)
            total += 1.0 + chance[:b].sum()
        return total / cost[b]

    b = max(range(33), key=lambda b: (score(b), -b))
    assert all(len(c) == min(b, len(t)) for c, t in zip(cut, full))
    assert len(sizes) >= 1 and 0 < b < 32
    for c, t in zip(cut, full):  # a best-first prefix, in DFS order, with consistent buffers
        keep = np.flatnonzero(t.rank < b)
        assert c.tokens.tolist() == t.tokens[keep].tolist() and c.depth.tolist() == t.depth[keep].tolist()
        assert (c.parents < np.arange(len(c))).all()
        assert all(c.mask[i, i] and (c.parents[i] < 0 or (c.mask[i] >= c.mask[c.parents[i]]).all()) for i in range(len(c)))
        assert sorted(c.rank.tolist()) == list(range(len(c)))


def test_ragged_cut_sizes_each_tree_by_chance_and_never_scores_below_one_budget():
    """cut_trees(ragged=True): each row keeps a best-first prefix of its own size; the sizes are
    those of a brute-force search over every merge of the rows' ranked chances (best first,
    each row in rank order) at cost[m / rows], and score at least the padded cut's best."""
    rng = np.random.default_rng(1)
    pool = laser.RetrievalPool(max_depth=8)
    for _ in range(60):
        pool.insert(rng.integers(0, 5, 50))
    pool.insert(np.array([7, 8, 9, 10, 11, 12, 13, 14] * 6))  # a loop: one row with a long sure chain
    cost = 1.0 + 0.15 * np.arange(33)
    full = [pool.draft(c, budget=32) for c in ([1, 2], [9, 10], [0, 4, 1], [42])]
    chances = []
    for t in full:
        ch = np.zeros(len(t))
        ch[t.rank] = np.minimum(1.0, t.counts / t.root_count) if len(t) else 0.0
        chances.append(ch)
    cut = laser.cut_trees(full + [None], cost, ragged=True)
    assert cut[-1] is None
    sizes = [len(c) for c in cut[:-1]]
    rows = len(full)
    at = lambda m: np.interp(m / rows, np.arange(33), cost)  # noqa: E731
    # brute force: the merge by chance, then the best m
    nxt, taken, gain, best, best_sizes = [0] * rows, [], rows, rows / at(0), [0] * rows
    while True:
        live = [r for r in range(rows) if nxt[r] < len(chances[r])]
        if not live:
            break
        r = max(live, key=lambda r: (chances[r][nxt[r]], -r))
        gain += chances[r][nxt[r]]
        nxt[r] += 1
        if gain / at(sum(nxt)) > best:
            best, best_sizes = gain / at(sum(nxt)), list(nxt)
    assert sizes == best_sizes and len(set(sizes)) > 1, sizes
    padded = max((rows + sum(ch[:b].sum() for ch in chances)) / cost[b] for b in range(33))
    assert best >= padded - 1e-12
    for c, t in zip(cut, full):  # a best-first prefix, in DFS order
        keep = np.flatnonzero(t.rank < len(c))
        assert c.tokens.tolist() == t.tokens[keep].tolist() and c.depth.tolist() == t.depth[keep].tolist()


def _layouts(model, prompts, pool, mode, cost, ragged):
    """generate_batch at B = 4 with the ragged layout allowed or not; (outputs, (input shape, ragged?)
    per forward, tree sizes per cut)."""
    from laser.engine import _Loop

    shapes, sizes = [], []
    real_cut, orig = laser.engine.cut_trees, _Loop.__init__

    def spy(trees, *a, **kw):
        out = real_cut(trees, *a, **kw)
        sizes.append([len(t) for t in out if t is not None])
        return out

    def init(self, *a, **kw):
        orig(self, *a, **kw)
        self.ragged = self.ragged and ragged

    hook = model.register_forward_pre_hook(lambda m, a, kw: shapes.append((tuple(kw["input_ids"].shape),
                                                                            "laser_ragged" in kw)), with_kwargs=True)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_Loop, "__init__", init)
            mp.setattr(laser.engine, "cut_trees", spy)
            res = sorted(generate_batch(model, [Request(p, pool) for p in prompts], batch_size=4, max_new_tokens=24,
                                        eos_token_id=None, update_pool=False, mode=mode,
                                        draft=laser.DraftConfig(budget=16, max_depth=6, cost=cost)),
                         key=lambda r: r.index)
    finally:
        hook.remove()
    return [r.tokens.tolist() for r in res], shapes, sizes


def _ragged_case(arch, dtype=torch.float32):
    model = tiny(arch, 5).to(dtype)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, V, int(rng.integers(3, 20))).tolist() for _ in range(6)]
    outs = [greedy(model, p, 24, eos_token_id=None) for p in prompts]
    pool = laser.RetrievalPool(max_depth=8, vocab_size=V)
    for p, o in zip(prompts[::2], outs[::2]):
        pool.insert(o[len(p):])
    return model, prompts, outs, pool


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_ragged_verification_with_the_ragged_cut_equals_greedy(arch):
    """Several rows on a CPU verify back to back ([1, N]), each row's tree sized by the ragged
    cut: every row's strict output is its greedy output."""
    model, prompts, outs, pool = _ragged_case(arch)
    got, shapes, sizes = _layouts(model, prompts, pool, "strict", 1.0 + 0.05 * np.arange(17), ragged=True)
    assert got == [o[len(p):] for p, o in zip(prompts, outs)]
    assert any(r and shape[0] == 1 for shape, r in shapes), "a ragged verification ran"
    assert any(len(set(s)) > 1 for s in sizes), "rows kept trees of different sizes"


@pytest.mark.parametrize("mode", ["strict", "relaxed"])
def test_ragged_and_padded_layouts_commit_the_same(mode):
    """The same trees (no cost cut) verified padded [B, q] or ragged [1, N] commit the same tokens
    (fp64, so the layouts' different summation orders cannot flip a decision)."""
    model, prompts, outs, pool = _ragged_case("llama", torch.float64)
    ragged, shapes, _ = _layouts(model, prompts, pool, mode, None, ragged=True)
    padded, pshapes, _ = _layouts(model, prompts, pool, mode, None, ragged=False)
    assert ragged == padded and all(len(t) == 24 for t in ragged)
    assert any(r for _, r in shapes) and not any(r for _, r in pshapes)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("products", ["linear", "tiled"])
def test_direct_forward_equals_the_models_own_forward(arch, products, monkeypatch):
    """Every verification (one row, then ragged rows) through DirectForward gives the logits of
    the model's own forward on the same inputs and routes, up to fp32 rounding, and every prefill
    (one prompt, then several right-padded) fills the cache as the model's own does; strict still
    equals greedy. "linear": every product routed to F.linear, so the layers run step by step in
    Python; "tiled": every product routed to the tiled one, so each layer is one C++ step that
    writes the cache block itself. A model with a hook, or of another architecture, runs through
    its own forward."""
    from laser.cpu import ROW_BUCKETS, LinearRoutes
    from laser.forward import DirectForward

    model = tiny(arch, 0)
    engine = laser.Engine(model)
    assert engine.direct is not None
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    engine._routes[torch.get_num_threads()] = LinearRoutes(2, {s: [products] * len(ROW_BUCKETS) for s in shapes},
                                                           engine.packs)
    direct, layers, checked, tiled, filled = DirectForward.__call__, DirectForward._tiled_layers, [], [], []

    def both(self, routes, ids, pos, mask, cache, **extra):
        if not extra.get("logits", True):  # a prefill: the rows it fills hold what the model's own prefill wrote
            engine.forward(False, input_ids=ids, position_ids=pos, attention_mask=mask, **{engine.kv: cache},
                           use_cache=True)
            want = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
            assert direct(self, routes, ids, pos, mask, cache, **extra) is None
            real = (mask[:, 0, -1] == 0).sum(-1).tolist()  # row j's real tokens: what its last position sees
            for (k, v), layer in zip(want, cache.layers):
                for j, row in enumerate(cache.fill_rows.tolist()):
                    torch.testing.assert_close(layer.keys[row, :, : real[j]], k[row, :, : real[j]], rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(layer.values[row, :, : real[j]], v[row, :, : real[j]], rtol=1e-5,
                                               atol=1e-5)
            filled.append(ids.shape)
            return None
        want = engine.forward(False, input_ids=ids, position_ids=pos, attention_mask=mask, **{engine.kv: cache},
                              use_cache=True, **extra).logits  # writes the cache columns the direct forward rewrites
        keys = [layer.keys.clone() for layer in cache.layers]
        got = direct(self, routes, ids, pos, mask, cache, **extra)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for before, layer in zip(keys, cache.layers):  # the same block written where update() wrote it
            torch.testing.assert_close(layer.keys, before, rtol=1e-5, atol=1e-5)
        checked.append((tuple(ids.shape), "laser_ragged" in extra))
        return got

    monkeypatch.setattr(DirectForward, "__call__", both)
    monkeypatch.setattr(DirectForward, "_tiled_layers", lambda self, *a: tiled.append(1) or layers(self, *a))
    gather, gathered = laser.forward._C.make_direct_layers, []
    monkeypatch.setattr(laser.forward._C, "make_direct_layers", lambda *a: gathered.append(1) or gather(*a))
    prompts, wants, pool = _decodes_like_greedy(model)
    assert any(shape[1] > 1 and not ragged for shape, ragged in checked), "a tree verified on one row"
    assert any(ragged for _, ragged in checked), "a ragged batch verified"
    assert any(shape[0] > 1 and shape[1] > 1 for shape in filled), "prompts prefilled together"
    assert len(tiled) == (len(checked) if products == "tiled" else 0)
    assert len(gathered) == (1 if products == "tiled" else 0), "the C++ layers' parameters gathered once"
    checked.clear()
    filled_before = len(filled)
    hooked = []
    hook = model.model.layers[0].register_forward_hook(lambda *a: hooked.append(1))
    try:
        assert laser.generate(model, prompts[0], pool=pool, max_new_tokens=30, eos_token_id=None,
                              update_pool=False).sequences[0].tolist() == wants[0]
    finally:
        hook.remove()
    assert hooked and not checked and len(filled) == filled_before, "with a hook, every forward runs through the model"
    # the parameters change (one in place, one replaced by another tensor): the next verifications use them
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight.mul_(0.5)
    norm = model.model.layers[0].input_layernorm
    norm.weight = torch.nn.Parameter(norm.weight.detach() * 1.5, requires_grad=False)
    checked.clear()
    laser.generate(model, prompts[0], pool=pool, max_new_tokens=12, eos_token_id=None, update_pool=False)
    assert checked and len(gathered) == (2 if products == "tiled" else 0)
    monkeypatch.setattr(laser.engine, "FILL_MASK_MAX", 0)  # a prefill whose mask would be too large
    filled_before = len(filled)
    assert laser.generate(model, prompts[0], max_new_tokens=4, eos_token_id=None).sequences.shape[1] == len(prompts[0]) + 4
    assert len(filled) == filled_before, "it runs through the model"
    assert laser.Engine(tiny("gpt2", 0)).direct is None and laser.Engine(sliding("qwen2")).direct is None


def test_direct_layers_are_gathered_again_whenever_a_parameter_changes():
    """The C++ layers' parameters (tiled copies, norm and bias addresses, epsilons) are reused
    while nothing changed, and gathered again after an in-place change, a replaced parameter, a
    changed epsilon or cleared copies."""
    model = tiny("qwen2", 0)  # q / k / v biases
    engine = laser.Engine(model)
    direct, packs, cfg = engine.direct, engine.packs, model.config
    D = cfg.hidden_size // cfg.num_attention_heads
    shapes = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, D, cfg.intermediate_size)
    layer = model.model.layers[1]

    def post(x):
        layer.post_attention_layernorm.weight = torch.nn.Parameter(x, requires_grad=False)

    changes = {"a bias in place": lambda: layer.self_attn.k_proj.bias.add_(1.0),
               "a weight in place": lambda: layer.mlp.up_proj.weight.mul_(2.0),
               "a norm replaced": lambda: post(torch.ones(cfg.hidden_size)),
               "an epsilon": lambda: setattr(layer.input_layernorm, "variance_epsilon", 1e-3),
               "the copies cleared": packs.clear}
    for what, change in changes.items():
        last = direct._direct_layers(packs, shapes)
        assert direct._direct_layers(packs, shapes) is last, "nothing changed"
        with torch.no_grad():
            change()
        assert direct._direct_layers(packs, shapes) is not last, what
    assert len(packs) == 7 * cfg.num_hidden_layers


def test_configs_are_validated_where_they_are_built():
    with pytest.raises(ValueError, match="budget"):
        laser.DraftConfig(budget=-1)
    with pytest.raises(ValueError, match="min_match"):
        laser.DraftConfig(min_match=3, max_match=2)
    with pytest.raises(ValueError, match="cost"):
        laser.DraftConfig(cost=np.array([1.0, 0.0]))
    with pytest.raises(TypeError, match="max_depth"):
        laser.DraftConfig(max_depth=2.5)
    with pytest.raises(ValueError, match="mode"):
        laser.AcceptConfig(mode="greedy")
    with pytest.raises(ValueError, match="top_k"):
        laser.AcceptConfig(top_k=0)
    assert laser.DraftConfig(cost=[1.0, 2.0]) == laser.DraftConfig(cost=np.array([1.0, 2.0]))


def test_processors_and_stopping_criteria_apply_to_every_row_of_a_batch():
    """A ragged batch with a repetition penalty and a stop-on-token criterion: each row is what
    HF's generate gives that row alone with the same processor and criterion."""
    model = tiny("qwen2", 6)
    rows = [[5, 6, 7, 8], [11, 12], [30, 31, 32, 33, 34]]
    proc = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)])
    alone = [greedy(model, r, 20, eos_token_id=None, repetition_penalty=1.5) for r in rows]
    stop_token = alone[0][len(rows[0]) + 5]

    class StopAt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == stop_token

    pool = laser.RetrievalPool(max_depth=8, vocab_size=V)
    for r, a in zip(rows, alone):
        pool.insert(a[len(r):])
    got = laser.generate(model, rows, pool=pool, max_new_tokens=20, eos_token_id=None, update_pool=False,
                         logits_processor=proc, stopping_criteria=[StopAt()], pad_token_id=0).sequences.tolist()
    width = max(map(len, rows))
    for r, a, g in zip(rows, alone, got):
        new = a[len(r):]
        if stop_token in new:
            new = new[: new.index(stop_token) + 1]
        assert g[width : width + len(new)] == new and all(t == 0 for t in g[width + len(new):])


def test_nothing_of_laser_is_active_between_results_or_after_a_call():
    """The route is set around LASER's forwards only: the consumer of a result stream, and
    two interleaved streams, run outside it."""
    import laser.engine as engine_mod
    from laser.batch import Request, generate_batch

    model = tiny("llama", 2)
    a = generate_batch(model, [Request([1, 2, 3]), Request([4, 5])], batch_size=1, max_new_tokens=5)
    b = generate_batch(model, [Request([7, 8]), Request([9])], batch_size=1, max_new_tokens=5)
    seen = []
    for ra, rb in zip(a, b):
        seen += [engine_mod._CALL.get(), ra.tokens.size, rb.tokens.size]
    assert seen == [None, 5, 5] * 2
    laser.generate(model, [1, 2], max_new_tokens=3)
    assert engine_mod._CALL.get() is None
