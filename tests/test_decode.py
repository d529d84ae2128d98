"""Decode loop: strict == greedy, relaxed obeys its rule, EOS/length/empty pool/bad input/no leaks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import laser
from laser.cache import TreeCache
from laser.decode import DraftConfig, generate

V = 96
TIE_GAP = 1e-4  # a divergence is allowed only where greedy's top-2 logit gap is below this


def tiny(arch: str, seed: int):
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        return LlamaForCausalLM(cfg).eval()
    if arch == "qwen2":
        cfg = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256)
        return Qwen2ForCausalLM(cfg).eval()
    cfg = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def greedy(model, ids, n, **kw):
    ids = torch.as_tensor(ids)[None]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=0, **kw)
    return out[0].tolist()


def greedy_case(model, seed: int, count: int, lo: int, hi: int, new: int):
    """count random prompts of lo..hi-1 tokens, their greedy outputs (new tokens, no EOS), and a
    pool holding every output's new tokens."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, V, int(rng.integers(lo, hi))).tolist() for _ in range(count)]
    outs = [greedy(model, p, new, eos_token_id=None) for p in prompts]
    pool = laser.RetrievalPool(max_depth=8, vocab_size=V)
    for p, o in zip(prompts, outs):
        pool.insert(o[len(p):])
    return prompts, outs, pool


def assert_same_or_near_tie(model, want, got, prompt_len):
    """Token-identical, except a divergence where greedy's top-2 gap < TIE_GAP (returns 1 then)."""
    if want == got:
        return 0
    i = next(i for i, (a, b) in enumerate(zip(want, got)) if a != b)
    assert i >= prompt_len
    with torch.no_grad():
        top2 = model(torch.tensor([want[:i]])).logits[0, -1].float().topk(2).values
    gap = float(top2[0] - top2[1])
    assert gap < TIE_GAP, f"diverged at {i} with top-2 gap {gap}"
    return 1


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_strict_equals_greedy_tiny(arch, seed):
    model = tiny(arch, seed)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, V, int(rng.integers(3, 20))).tolist() for _ in range(4)]
    outs = [greedy(model, p, 40, eos_token_id=None) for p in prompts]
    pool = laser.RetrievalPool(max_depth=8, vocab_size=V)
    for p, o in zip(prompts[1:], outs[1:]):  # warm with other requests' outputs
        pool.insert(o[len(p):])
    ties = 0
    for p, want in zip(prompts, outs):
        for budget in (0, 5, 24):
            res = generate(model, p, pool=pool, max_new_tokens=40, eos_token_id=None, update_pool=False,
                           draft=DraftConfig(budget=budget, max_depth=6))
            ties += assert_same_or_near_tie(model, want, res.sequences[0].tolist(), len(p))
            assert res.stats.new_tokens == 40
    assert ties <= 1


def test_pool_drafts_are_accepted():
    model = tiny("llama", 3)
    prompt = [5, 6, 7, 8]
    want = greedy(model, prompt, 48, eos_token_id=None)
    pool = laser.RetrievalPool(max_depth=10)
    pool.insert(want[len(prompt):])
    res = generate(model, prompt, pool=pool, max_new_tokens=48, eos_token_id=None)
    assert res.sequences[0].tolist() == want
    assert res.stats.steps < 20 and res.stats.mean_accepted > 2.5
    hist = res.stats.histogram
    assert hist.sum() == res.stats.steps and (np.arange(len(hist)) * hist).sum() + res.stats.steps == 48


def test_relaxed_tokens_obey_rule():
    model = tiny("llama", 4)
    rng = np.random.default_rng(4)
    prompt = rng.integers(0, V, 10).tolist()
    pool = laser.RetrievalPool(max_depth=8)
    torch.manual_seed(4)
    ids = torch.tensor([prompt])
    for _ in range(10):  # texts the model could have written: sampled from its own top-3
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=60, do_sample=True,
                             top_k=3, pad_token_id=0, eos_token_id=None)
        pool.insert(out[0, len(prompt):].numpy())
    k, p = 3, 0.005  # a random tiny model is nearly flat: top tokens hold ~1-3% each
    res = generate(model, prompt, pool=pool, max_new_tokens=60, mode="relaxed", top_k=k, min_prob=p, eos_token_id=None)
    seq = res.sequences[0]
    with torch.no_grad():
        logits = model(seq[None]).logits[0].float()  # reference: one plain causal forward
    relaxed_only = 0
    for t in range(len(prompt), len(seq)):
        row, tok = logits[t - 1], int(seq[t])
        prob = torch.softmax(row, -1)[tok]
        rank = int((row > row[tok]).sum())
        is_argmax = tok == int(row.argmax())
        assert is_argmax or (rank < k and prob >= p - 1e-5), (t, tok, rank, float(prob))
        relaxed_only += not is_argmax
    assert relaxed_only > 0, "relaxed mode accepted nothing beyond greedy on a noisy pool"


def test_eos_stops_inside_accepted_path():
    model = tiny("llama", 5)
    prompt = [3, 4, 5]
    full = greedy(model, prompt, 40, eos_token_id=None)
    gen = full[len(prompt):]
    eos = gen[17]
    first = gen.index(eos)
    pool = laser.RetrievalPool(max_depth=12)
    pool.insert(gen)  # drafts run straight through the EOS
    res = generate(model, prompt, pool=pool, max_new_tokens=40, eos_token_id=eos)
    got = res.sequences[0].tolist()
    assert got == full[: len(prompt) + first + 1]
    assert got == greedy(model, prompt, 40, eos_token_id=eos)


@pytest.mark.parametrize("n", [1, 2, 7, 33])
def test_max_new_tokens_is_exact(n):
    model = tiny("qwen2", 6)
    prompt = [9, 8, 7, 6, 5]
    want = greedy(model, prompt, 40, eos_token_id=None)
    pool = laser.RetrievalPool(max_depth=12)
    pool.insert(want[len(prompt):])
    res = generate(model, prompt, pool=pool, max_new_tokens=n, eos_token_id=None)
    assert res.sequences[0].tolist() == want[: len(prompt) + n]


def test_empty_pool_one_token_per_step():
    model = tiny("llama", 7)
    prompt = list(range(10, 20))
    res = generate(model, prompt, pool=laser.RetrievalPool(), max_new_tokens=12, eos_token_id=None,
                   update_pool=False, draft=DraftConfig(prompt_weight=0))
    assert res.stats.steps == 12 and set(res.stats.accepted) == {0}
    assert res.sequences[0].tolist() == greedy(model, prompt, 12, eos_token_id=None)
    res = generate(model, prompt, pool=None, max_new_tokens=12, eos_token_id=None)  # no pool at all
    assert res.sequences[0].tolist() == greedy(model, prompt, 12, eos_token_id=None)


def test_bad_input_raises_clear_errors():
    model = tiny("llama", 8)
    with pytest.raises(ValueError, match="context window"):
        generate(model, [1] * 250, max_new_tokens=10)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, [1, 2], mode="relaxed", top_k=0)
    with pytest.raises(ValueError, match="min_prob"):
        generate(model, [1, 2], mode="relaxed", min_prob=1.5)
    with pytest.raises(ValueError, match="min_prob"):
        generate(model, [1, 2], mode="relaxed", min_prob=-0.1)
    with pytest.raises(ValueError, match="mode"):
        generate(model, [1, 2], mode="greedy")
    with pytest.raises(ValueError, match="out of range"):
        generate(model, [1, V], max_new_tokens=3)
    with pytest.raises(ValueError, match="out of range"):
        generate(model, [-1, 2], max_new_tokens=3)
    with pytest.raises(TypeError, match="integers"):
        generate(model, torch.tensor([1.0, 2.0]), max_new_tokens=3)
    with pytest.raises(ValueError, match="out of range"):  # each row of a batch is checked
        generate(model, torch.tensor([[1, 2], [1, V]]), max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1, 2], max_new_tokens=0)
    with pytest.raises(ValueError, match="min_match"):
        generate(model, [1, 2], max_new_tokens=3, draft=DraftConfig(min_match=5, max_match=4))


def test_cache_length_is_checked_every_step(monkeypatch):
    model = tiny("llama", 9)
    prompt = [1, 2, 3, 4]
    want = greedy(model, prompt, 30, eos_token_id=None)
    pool = laser.RetrievalPool()
    pool.insert(want[len(prompt):])
    generate(model, prompt, pool=pool, max_new_tokens=30, eos_token_id=None)  # invariant holds

    real = TreeCache.commit
    monkeypatch.setattr(TreeCache, "commit", lambda cache, rows, src, dst: real(cache, rows[:-1], src[:-1], dst[:-1]))
    with pytest.raises(RuntimeError, match="KV cache"):
        generate(model, prompt, pool=pool, max_new_tokens=30, eos_token_id=None)


def test_no_state_leaks_between_calls():
    model = tiny("llama", 10)
    pool = laser.RetrievalPool(max_depth=8)
    a, b = [11, 12, 13, 14, 15, 16], [40, 41, 42, 43]
    first = generate(model, a, pool=pool, max_new_tokens=20, eos_token_id=None, update_pool=False)
    size = len(pool)
    generate(model, b, pool=pool, max_new_tokens=20, eos_token_id=None, update_pool=False)
    again = generate(model, a, pool=pool, max_new_tokens=20, eos_token_id=None, update_pool=False)
    assert again.sequences.tolist() == first.sequences.tolist()
    assert len(pool) == size == 1, "update_pool=False leaves the shared pool untouched"
    generate(model, b, pool=pool, max_new_tokens=20, eos_token_id=None)
    assert pool.count(b[:3]) == 0, "the prompt never enters the shared pool"
    assert len(pool) > 1, "generated tokens do"


def test_logits_processors_apply_inside_verification():
    from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    model = tiny("llama", 11)
    prompt = [7, 7, 8, 9]
    kw = dict(repetition_penalty=1.3, no_repeat_ngram_size=3, eos_token_id=None)
    want = greedy(model, prompt, 40, **kw)
    pool = laser.RetrievalPool(max_depth=8)
    pool.insert(greedy(model, [7, 8, 9], 40, **kw))
    proc = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3), NoRepeatNGramLogitsProcessor(3)])
    res = generate(model, prompt, pool=pool, max_new_tokens=40, eos_token_id=None, logits_processor=proc)
    assert res.sequences[0].tolist() == want


def test_hf_custom_generate_entry_point():
    model = tiny("llama", 12)
    prompt = torch.tensor([[4, 5, 6, 7]])
    want = greedy(model, prompt[0], 25, eos_token_id=None)
    pool = laser.RetrievalPool()
    pool.insert(want[4:])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=25, do_sample=False,
                         eos_token_id=None, pad_token_id=0, custom_generate=laser.hf_generate, pool=pool)
    assert out[0].tolist() == want


def test_calibrated_cost_curve_drives_budget():
    model = tiny("llama", 13)
    cost = laser.calibrate(model, context_len=32, sizes=(16, 0, 4), repeats=2)
    assert cost.shape == (17,) and (cost > 0).all() and (np.diff(cost) >= 0).all()
    with pytest.raises(ValueError):
        laser.calibrate(model, sizes=(-1, 4))
    prompt = [1, 2, 3]
    want = greedy(model, prompt, 20, eos_token_id=None)
    pool = laser.RetrievalPool()
    pool.insert(want[3:])
    res = generate(model, prompt, pool=pool, max_new_tokens=20, eos_token_id=None,
                   draft=DraftConfig(budget=64, cost=cost))
    assert res.sequences[0].tolist() == want
    assert max(res.stats.tree_sizes) <= 16


# ---------------------------------------------------------------- CPU split linears

# split: 1-4 rows weight-major bmm, 5 and up row-major; onednn; packed; tiled; linear (laser/cpu.py)
@pytest.mark.parametrize("product", ["split", "onednn", "packed", "tiled", "linear"])
@pytest.mark.parametrize("rows,bias", [(1, False), (3, True), (4, False), (5, True), (33, False)])
def test_every_cpu_product_equals_linear(rows, bias, product):
    from laser.cpu import PackedWeights, split_linear

    g = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, 24, generator=g)
    w = torch.randn(40, 24, generator=g)
    b = torch.randn(40, generator=g) if bias else None
    got = split_linear(x, w, b, 4, product, PackedWeights())
    assert got.shape == (1, rows, 40) and got.is_contiguous()
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    strided = torch.randn(1, 24, rows, generator=g).transpose(1, 2)  # a view: not [rows, K] in memory
    torch.testing.assert_close(split_linear(strided, w, b, 4, product, PackedWeights()),
                               torch.nn.functional.linear(strided, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["packed", "tiled"])
def test_weight_copies_follow_their_weight(kind):
    """A copy is made once per weight and kind, made again after the weight changes in place or
    its data is replaced, and freed with the weight (or by clear())."""
    import gc

    from laser.cpu import PackedWeights, split_linear

    if kind == "packed" and not laser.cpu._PACKED:
        pytest.skip("this torch has no oneDNN weight packing")
    packs = PackedWeights()
    lin = torch.nn.Linear(24, 40, bias=False)
    x = torch.randn(3, 24)
    with torch.no_grad():
        first = packs.get(lin.weight, kind)
        assert packs.get(lin.weight, kind) is first and len(packs) == 1
        lin.weight.mul_(2)  # in place: the version counter moves
        torch.testing.assert_close(split_linear(x, lin.weight, None, 4, kind, packs), x @ lin.weight.t())
        assert packs.get(lin.weight, kind) is not first
        lin.weight.data = torch.randn(40, 24)  # new storage, same Parameter
        torch.testing.assert_close(split_linear(x, lin.weight, None, 4, kind, packs), x @ lin.weight.t())
    w = torch.randn(8, 24)
    packs.get(w, kind)
    assert len(packs) == 2
    del w
    gc.collect()
    assert len(packs) == 1, "a dead weight's copy goes with it"
    packs.clear()
    assert len(packs) == 0


def _isas():
    """The tiled kernels this CPU runs: its best and every one below it (generic runs anywhere)."""
    order = ["avx512", "avx2", "generic"]
    return order[order.index(laser._C.tiled_isa()):]


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_tiled_product_equals_linear_on_every_kernel(isa):
    """laser._C.tiled_linear over tile_weight's copy equals x @ w.T + b for every row count
    around the kernel's rows per pass (14 / 3 / 1), features that are not a whole block (32),
    odd K, any thread count; rows = 0 gives an empty result."""
    from laser import _C

    if isa not in _isas():
        pytest.skip(f"this CPU cannot run the {isa} kernel")
    g = torch.Generator().manual_seed(0)
    for N, K in [(1, 1), (33, 7), (64, 24), (100, 129)]:
        w = torch.randn(N, K, generator=g)
        b = torch.randn(N, generator=g)
        tiled = np.empty(_C.tiled_size(N, K), dtype=np.float32)
        _C.tile_weight(w.numpy(), tiled, threads=2)
        for M in (0, 1, 2, 3, 4, 13, 14, 15, 29):
            x = torch.randn(M, K, generator=g)
            for bias, threads in ((None, 1), (b, 2), (b, 3)):
                y = np.full((M, N), np.nan, dtype=np.float32)
                _C.tiled_linear(x.numpy(), tiled, N, None if bias is None else bias.numpy(), y, threads=threads, isa=isa)
                torch.testing.assert_close(torch.from_numpy(y), torch.nn.functional.linear(x, w, bias),
                                           rtol=1e-5, atol=1e-5)


def test_direct_forward_steps_equal_transformers_modules():
    """The C++ elementwise steps of the direct forward: add_rms_norm is LlamaRMSNorm on h + y (and
    leaves h + y in h), rope is apply_rotary_pos_emb, both up to fp32 rounding; bad sizes are refused."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

    from laser import _C

    torch.manual_seed(0)
    rows, C, heads, D = 7, 48, 3, 16
    norm = LlamaRMSNorm(C, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
        h, y = torch.randn(rows, C) * 3, torch.randn(rows, C)
        for add in (None, y):
            want_h = h + (0 if add is None else add)
            out = torch.empty(rows, C)
            got_h = h.clone()
            _C.add_rms_norm_at(got_h.data_ptr(), 0 if add is None else add.data_ptr(), rows, C, norm.weight.data_ptr(),
                               norm.variance_epsilon, out.data_ptr())
            assert torch.equal(got_h, want_h)
            torch.testing.assert_close(out, norm(want_h), rtol=1e-6, atol=1e-6)
        cfg = LlamaConfig(hidden_size=heads * D, num_attention_heads=heads, max_position_embeddings=64)
        pos = torch.tensor([[3, 9, 10, 10, 11, 40, 63]])
        x = torch.randn(1, rows, heads * D)
        cos, sin = LlamaRotaryEmbedding(cfg)(x, pos)  # [1, rows, D]
        q = x.view(1, rows, heads, D).transpose(1, 2)
        want, _ = apply_rotary_pos_emb(q, q, cos, sin)
        got = x.clone()
        _C.rope_at(got.data_ptr(), rows, heads, D, cos.contiguous().data_ptr(), sin.contiguous().data_ptr())
        torch.testing.assert_close(got.view(1, rows, heads, D).transpose(1, 2), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="even D"):
        _C.rope_at(got.data_ptr(), rows, heads, 15, cos.data_ptr(), sin.data_ptr())
    with pytest.raises(ValueError, match="rows >= 0"):
        _C.add_rms_norm_at(h.data_ptr(), 0, -1, C, norm.weight.data_ptr(), 1e-5, out.data_ptr())
    with pytest.raises(ValueError, match="threads >= 1"):
        _C.add_rms_norm_at(h.data_ptr(), 0, rows, C, norm.weight.data_ptr(), 1e-5, out.data_ptr(), 0)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_elementwise_steps_split_over_threads_equal_one_thread_bit_for_bit(isa):
    """add_rms_norm, rope and silu_mul (from PARALLEL_MIN = 2048 elements on) split their rows
    or elements over threads: every element comes out as on one thread (each row's sum in one
    order; silu_mul's chunks whole vectors, the scalar tail where it was)."""
    from laser import _C

    if isa not in _isas():
        pytest.skip(f"this CPU cannot run the {isa} kernel")
    g = torch.Generator().manual_seed(0)
    rows, C, heads, D = 301, 96, 4, 32  # 28,896 elements a step; silu_mul: 301 x 161 = 48,461 (no whole vector)
    h, y, w = torch.randn(rows, C, generator=g) * 3, torch.randn(rows, C, generator=g), torch.randn(C, generator=g)
    x, cos, sin = torch.randn(rows, heads * D, generator=g), torch.randn(rows, D, generator=g), torch.randn(rows, D, generator=g)
    gate, up = torch.randn(rows * 161, generator=g) * 8, torch.randn(rows * 161, generator=g)
    got = {}
    for threads in (1, 2, 3):
        hh, out, xx, gg = h.clone(), torch.empty(rows, C), x.clone(), gate.clone()
        _C.add_rms_norm_at(hh.data_ptr(), y.data_ptr(), rows, C, w.data_ptr(), 1e-5, out.data_ptr(), threads)
        _C.rope_at(xx.data_ptr(), rows, heads, D, cos.data_ptr(), sin.data_ptr(), threads)
        _C.silu_mul_at(gg.data_ptr(), up.data_ptr(), gg.numel(), isa, threads)
        got[threads] = (hh, out, xx, gg)
    for threads in (2, 3):
        for one, many in zip(got[1], got[threads]):
            assert torch.equal(one, many)
    torch.testing.assert_close(got[1][3], F.silu(gate) * up, rtol=1e-6, atol=1e-30)
    with pytest.raises(ValueError, match="cannot run the 'sse9' kernel"):
        _C.silu_mul_at(gate.data_ptr(), up.data_ptr(), gate.numel(), "sse9", 2)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_direct_forward_attention_and_silu_equal_torch(isa):
    """The direct forward's C++ attention over cache rows equals SDPA with grouped-query heads on
    the padded layout and on ragged blocks (tokens back to back, mask slots and cache rows by
    token), for several head groupings and head sizes, up to fp32 rounding, on every kernel
    build this CPU runs; hidden columns weigh exactly 0 (huge values there change nothing), and
    a causal prefill's later columns, which the kernel skips, too. silu_mul equals silu(gate) * up. Bad rows, head counts and kernels are refused by name."""
    from laser import _C

    if isa not in _isas():
        pytest.skip(f"this CPU cannot run the {isa} kernel")

    g = torch.Generator().manual_seed(0)
    low = torch.finfo(torch.float32).min
    for B, q, Hq, Hkv, D, W in [(1, 1, 9, 3, 64, 40), (1, 12, 9, 3, 64, 300), (3, 5, 4, 2, 8, 20), (2, 7, 64, 1, 5, 9),
                                (2, 17, 8, 8, 16, 30), (2, 45, 9, 3, 64, 0)]:
        T = W + q
        cache_k, cache_v = torch.randn(B + 1, Hkv, T + 8, D, generator=g), torch.randn(B + 1, Hkv, T + 8, D, generator=g)
        k, v = cache_k[:B, :, :T], cache_v[:B, :, :T]  # the cache's views: row and head strides of the buffer
        query = torch.randn(B, Hq, q, D, generator=g)
        visible = torch.rand(B, q, T, generator=g) > 0.3
        visible[:, :, W] = True  # every token sees its pending column
        if W == 0:  # a causal prefill, the second row right-padded after 31 tokens (its later columns hidden)
            visible = torch.ones(q, T, dtype=torch.bool).tril().expand(B, q, T).clone()
            visible[1, :, 31:] = False
            visible[1, 31:, 0] = True  # padding tokens see one column
        mask = torch.zeros(B, 1, q, T).masked_fill_(~visible[:, None], low)
        v.masked_fill_(~visible.any(1)[:, None, :, None], 1e30)  # hidden from every token of the row
        clean = v.masked_fill(~visible.any(1)[:, None, :, None], 0.0)
        want = F.scaled_dot_product_attention(query, k, clean, attn_mask=mask, scale=0.3, enable_gqa=True)
        want = want.transpose(1, 2)  # [B, q, Hq, D]
        counts = torch.randint(1, q + 1, (B,), generator=g).numpy()
        for ragged in (False, True):
            slot = np.concatenate([r * q + np.arange(c) for r, c in enumerate(counts)]) if ragged else np.arange(B * q)
            tokens = query.transpose(1, 2).reshape(B * q, Hq, D)[torch.from_numpy(slot)].contiguous()  # [N, Hq, D]
            out = torch.full_like(tokens, float("nan"))
            _C.attention_at(tokens.data_ptr(), len(slot), Hq, D, k.data_ptr(), v.data_ptr(), Hkv, B, k.stride(0),
                            k.stride(1), T, mask.data_ptr(), B * q, slot, slot // q, 0.3, out.data_ptr(), 2, isa)
            torch.testing.assert_close(out, want.reshape(B * q, Hq, D)[torch.from_numpy(slot)], rtol=1e-5, atol=1e-5)
    gate, up = torch.linspace(-100, 100, 1001), torch.randn(1001, generator=g)
    want = F.silu(gate) * up
    _C.silu_mul_at(gate.data_ptr(), up.data_ptr(), gate.numel(), isa)
    torch.testing.assert_close(gate, want, rtol=1e-6, atol=1e-30)
    with pytest.raises(ValueError, match="cannot run the 'sse9' kernel"):
        _C.silu_mul_at(gate.data_ptr(), up.data_ptr(), gate.numel(), "sse9")
    rows = np.zeros(1, dtype=np.int64)
    with pytest.raises(ValueError, match="Hkv dividing Hq"):
        _C.attention_at(tokens.data_ptr(), 1, 9, D, k.data_ptr(), v.data_ptr(), 2, B, 1, 1, T, mask.data_ptr(), 1, rows,
                        rows, 1.0, out.data_ptr(), 1)
    with pytest.raises(ValueError, match=r"cache_row\[0\] is outside"):
        _C.attention_at(tokens.data_ptr(), 1, Hq, D, k.data_ptr(), v.data_ptr(), Hkv, B, 1, 1, T, mask.data_ptr(), 1,
                        rows, rows + B, 1.0, out.data_ptr(), 1)


def test_tiled_product_refuses_bad_arrays():
    """Wrong dtypes, layouts and shapes are refused with the argument named, never copied or
    read out of bounds; an ISA the CPU lacks or an unknown one is refused by name."""
    from laser import _C

    w = np.ones((40, 24), dtype=np.float32)
    tiled = np.empty(_C.tiled_size(40, 24), dtype=np.float32)
    _C.tile_weight(w, tiled)
    x, y = np.ones((3, 24), dtype=np.float32), np.empty((3, 40), dtype=np.float32)
    with pytest.raises(TypeError):
        _C.tiled_linear(x.astype(np.float64), tiled, 40, None, y)
    with pytest.raises(TypeError):
        _C.tiled_linear(np.asfortranarray(np.ones((3, 24), dtype=np.float32)), tiled, 40, None, y)
    with pytest.raises(ValueError, match="tiled must be"):  # another block count (N is not stored: 33-64 share one)
        _C.tiled_linear(x, tiled, 65, None, np.empty((3, 65), dtype=np.float32))
    with pytest.raises(ValueError, match="tiled must be"):
        _C.tiled_linear(np.ones((3, 25), dtype=np.float32), tiled, 40, None, y)
    with pytest.raises(ValueError, match="out must be"):
        _C.tiled_linear(x, tiled, 40, None, np.empty((2, 40), dtype=np.float32))
    with pytest.raises(ValueError, match="bias must be"):
        _C.tiled_linear(x, tiled, 40, np.ones(39, dtype=np.float32), y)
    with pytest.raises(ValueError, match="x must have 2"):
        _C.tiled_linear(np.ones(24, dtype=np.float32), tiled, 40, None, y)
    with pytest.raises(ValueError, match="out must hold"):
        _C.tile_weight(w, np.empty(10, dtype=np.float32))
    frozen = np.empty((3, 40), dtype=np.float32)
    frozen.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        _C.tiled_linear(x, tiled, 40, None, frozen)
    with pytest.raises(ValueError, match="'sse9'"):
        _C.tiled_linear(x, tiled, 40, None, y, isa="sse9")
    # on addresses: the tiled copy and the sizes are still checked
    with pytest.raises(ValueError, match="tiled must be"):
        _C.tiled_linear_at(x.ctypes.data, 3, 25, tiled, 40, 0, y.ctypes.data, 1)
    with pytest.raises(ValueError, match="addresses"):
        _C.tiled_linear_at(0, 3, 24, tiled, 40, 0, y.ctypes.data, 1)
    _C.tiled_linear_at(x.ctypes.data, 3, 24, tiled, 40, 0, y.ctypes.data, 2)
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-6)
    assert _C.tiled_isa() in ("avx512", "avx2", "generic")


def test_split_linear_leaves_other_shapes_to_torch():
    from laser.cpu import split_linear

    for x, w in [(torch.randn(5, 24), torch.randn(42, 24)),  # 42 features: no 4 equal blocks
                 (torch.randn(5, 24, dtype=torch.float64), torch.randn(40, 24, dtype=torch.float64))]:
        torch.testing.assert_close(split_linear(x, w, None, 4), torch.nn.functional.linear(x, w), rtol=0, atol=0)


def test_a_bucket_goes_to_another_product_only_when_it_beats_the_tiled_one_by_the_margin():
    """winner(): the fastest product, but the tiled one keeps a bucket it loses by at most
    TILED_MARGIN (ties that swap between measurements; each tiled bucket spares a weight copy)."""
    from laser.cpu import TILED_MARGIN, winner

    assert winner({"linear": 3.0, "packed": 1.0, "tiled": 1.0 * TILED_MARGIN}) == "tiled"
    assert winner({"linear": 3.0, "packed": 1.0, "tiled": 1.01 * TILED_MARGIN}) == "packed"
    assert winner({"linear": 1.0, "split": 1.0, "tiled": 2.0}) == "linear"  # equal times: PRODUCTS' order
    assert winner({"linear": 2.0, "onednn": 1.0}) == "onednn"  # no tiled product measured (no copies)


def test_routes_are_measured_once_per_machine_and_kept(tmp_path, monkeypatch):
    """routes_for times the products per shape and row bucket once, writes them to the cache,
    and a later call (another process) takes them from there without measuring."""
    import json

    import laser.cpu as cpu

    measured = []
    real = cpu.measure
    monkeypatch.setattr(cpu, "measure", lambda n, k, ways: measured.append((n, k)) or real(n, k, ways, reps=3))
    r = cpu.routes_for({(40, 24), (8, 24)}, 4, cache_dir=tmp_path)
    assert sorted(measured) == [(8, 24), (40, 24)]
    assert all(p in cpu.PRODUCTS for p in r.table[(40, 24)]) and len(r.table[(40, 24)]) == len(cpu.ROW_BUCKETS)
    data = json.loads((tmp_path / "cpu-routes.json").read_text())
    (key,) = data
    assert "threads" in key and set(data[key]) == {"40x24", "8x24"}
    assert f"stream {cpu.stream_bytes() >> 20} MiB" in key and 32 << 20 <= cpu.stream_bytes() <= 512 << 20
    data[key]["40x24"] = ["onednn"] * len(cpu.ROW_BUCKETS)  # what another process found
    (tmp_path / "cpu-routes.json").write_text(json.dumps(data))
    measured.clear()
    again = cpu.routes_for({(40, 24)}, 4, cache_dir=tmp_path)
    assert not measured and again.product(40, 24, 3) == "onednn"
    assert again.product(40, 24, 5000) == "onednn"  # above the last bucket: its winner
    assert again.product(7, 7, 1) == "linear"  # an unmeasured shape: torch's
    x = torch.randn(3, 24)
    w = torch.randn(40, 24)
    torch.testing.assert_close(again.linear(x, w, None), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)


_MEASURE_TOGETHER = """
import json, os, pathlib, socket, sys, time
import laser.cpu as cpu
folder, log = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
socket.gethostname = lambda: sys.argv[3]
real = cpu.measure
def measure(n, k, ways):
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {n}x{k}\\n")
    time.sleep(0.3)  # long enough for the other process to ask meanwhile
    return real(n, k, ways, reps=1)
cpu.measure = measure
(folder / f"ready-{os.getpid()}").touch()
while len(list(folder.glob("ready-*"))) < 2:  # both ask at the same moment
    time.sleep(0.01)
r = cpu.routes_for({(40, 24), (8, 24)}, 4, cache_dir=folder)
print(json.dumps(sorted((f"{n}x{k}", c) for (n, k), c in r.table.items())))
"""


@pytest.mark.parametrize("hosts", [("node", "node"), ("node-a", "node-b")])
def test_processes_started_together_measure_the_routes_once_per_host(tmp_path, hosts):
    """Two processes sharing a cache ask for routes at the same moment. On one host (a node's
    Ray workers) one measures and the other waits for its answer, so no measurement times a
    machine that another one is loading; on two hosts both measure side by side. Either way
    both take the same routes (the file keeps the first answer)."""
    import json
    import subprocess
    import sys

    log = tmp_path / "measured.log"
    procs = [subprocess.Popen([sys.executable, "-c", _MEASURE_TOGETHER, str(tmp_path), str(log), host],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for host in hosts]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    lines = [line.split() for line in log.read_text().split("\n")[:-1]]
    together = hosts[0] == hosts[1]
    assert sorted(shape for _, shape in lines) == ["40x24", "40x24", "8x24", "8x24"][:: 2 if together else 1], lines
    assert len({pid for pid, _ in lines}) == (1 if together else 2)
    assert outs[0][0] == outs[1][0] and outs[0][0].strip()
    assert json.loads(outs[0][0]) == sorted(
        [s, c] for s, c in next(iter(json.loads((tmp_path / "cpu-routes.json").read_text()).values())).items())


@pytest.mark.parametrize("kind,threads", [("packed", 2), ("tiled", 2), ("tiled", 1)])
def test_engine_prepares_once_routes_only_inside_laser_calls_and_closes(monkeypatch, kind, threads):
    """Inside engine.active() a tiny Llama's linears take the measured CPU routes (same logits
    up to fp32 order); outside they run F.linear, bit-identical to the unprepared model; close()
    gives the model back (class forwards, its own attention implementation), even after an error."""
    from laser.cpu import LinearRoutes

    model = tiny("llama", 0)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # one thread is routed too (Ray workers of one thread each)
    calls = []
    real = LinearRoutes.linear
    monkeypatch.setattr(LinearRoutes, "linear", lambda self, *a: calls.append(1) or real(self, *a))
    copies = kind == "tiled" or laser.cpu._PACKED
    if copies:  # every linear on its copy of this kind
        monkeypatch.setattr(LinearRoutes, "product", lambda self, N, K, rows: kind)
    try:
        ids = [torch.randint(0, V, (1, n), generator=torch.Generator().manual_seed(n)) for n in (1, 3, 9)]
        plain = [model(input_ids=x).logits for x in ids]
        engine = laser.Engine(model)
        assert model.config._attn_implementation == "laser"
        assert all("forward" in m.__dict__ for m in linears)
        for x, want in zip(ids, plain):
            assert torch.equal(model(input_ids=x).logits, want), "outside a LASER call: the model as it was"
            assert not calls
            with torch.no_grad(), engine.active():  # as LASER runs its forwards
                torch.testing.assert_close(model(input_ids=x).logits, want, rtol=1e-4, atol=1e-5)
            assert len(calls) == len(linears)
            calls.clear()
            with engine.active():  # with autograd on, a product that keeps no graph leaves it to torch
                got = model(input_ids=x).logits
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            assert got.requires_grad
            calls.clear()
        with pytest.raises(RuntimeError, match="boom"), engine.active():
            raise RuntimeError("boom")
        assert torch.equal(model(input_ids=ids[0]).logits, plain[0]) and not calls, "the error left the call"
        packs = engine.packs
        assert len(packs) == (len({id(m.weight) for m in linears}) if copies else 0)
        engine.close()
        assert len(packs) == 0, "close() frees the copies"
        assert not any("forward" in m.__dict__ for m in linears)
        assert model.config._attn_implementation == "sdpa"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("how,kind", [("memory", "packed"), ("env", "packed"), ("memory", "tiled")])
def test_engine_keeps_no_copies_without_the_memory(monkeypatch, how, kind):
    """Where the weight copies would take more than half of the free memory (or LASER_CPU_PACK=0),
    the engine warns once and its "packed"/"tiled" routes run oneDNN on the weights in place: no copy,
    the same logits up to fp32 order. LASER_CPU_PACK=1 packs whatever the memory; other values
    are refused, naming the variable."""
    import laser.cpu as cpu
    from laser.cpu import LinearRoutes

    if how == "memory":
        monkeypatch.setattr(cpu, "available_memory", lambda: 1000)  # bytes: far below any model
        monkeypatch.delenv("LASER_CPU_PACK", raising=False)
    else:
        monkeypatch.setenv("LASER_CPU_PACK", "0")
    monkeypatch.setattr(LinearRoutes, "product", lambda self, N, K, rows: kind)
    monkeypatch.setattr(LinearRoutes, "copy_kinds", lambda self: {kind})
    model = tiny("llama", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    try:
        x = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(9))
        want = model(input_ids=x).logits
        engine = laser.Engine(model)
        with pytest.warns(RuntimeWarning, match=f"no CPU copies \\({kind}\\)"), engine.active():
            got = model(input_ids=x).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert engine.routes().packs is None and len(engine.packs) == 0
        engine.close()
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("LASER_CPU_PACK", "1")
    assert cpu.may_pack(1 << 50)
    monkeypatch.setenv("LASER_CPU_PACK", "yes")
    with pytest.raises(ValueError, match="LASER_CPU_PACK"):
        cpu.may_pack(1)


def test_engine_keeps_one_copy_kind_where_only_one_fits(monkeypatch):
    """Routes that use both copy kinds ("packed" for long prefills, "tiled" for decode steps) keep
    one copy per weight, all "tiled", where the memory holds one kind but not two; the logits
    stay those of F.linear up to fp32 order."""
    import laser.cpu as cpu
    from laser.cpu import LinearRoutes

    model = tiny("llama", 2)
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    size = sum(w.numel() * 4 for w in weights.values())
    monkeypatch.delenv("LASER_CPU_PACK", raising=False)
    monkeypatch.setattr(cpu, "available_memory", lambda: 3 * size)  # one kind fits (2x <= 3x), two do not (4x)
    both = lambda shapes, ways, packs=None: LinearRoutes(  # noqa: E731
        ways, {s: ["tiled"] * 5 + ["packed"] * 5 for s in shapes}, packs)
    monkeypatch.setattr(laser.engine, "routes_for", both)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    try:
        x = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(40))  # 40 rows: a "packed" bucket
        want = model(input_ids=x).logits
        engine = laser.Engine(model)
        routes = engine.routes()
        assert routes.copy_kinds() == {"tiled"} and routes.packs is engine.packs
        with torch.no_grad(), engine.active():
            torch.testing.assert_close(model(input_ids=x).logits, want, rtol=1e-4, atol=1e-5)
        assert len(engine.packs) == len(weights), "one copy per weight"
        engine.close()
    finally:
        torch.set_num_threads(threads)


def test_two_threads_decode_on_one_model_while_hf_generates():
    """Two threads run laser.generate on one model at once (strict, relaxed), a third runs HF
    greedy on it: each gets what it gets alone. The preparation is shared, the calls are not."""
    import threading

    model = tiny("qwen2", 3)
    prompts = [[5, 6, 7, 8, 9], [20, 21, 22]]
    alone = [greedy(model, p, 40, eos_token_id=None) for p in prompts]
    pool = laser.RetrievalPool(max_depth=8, vocab_size=V)
    for p, o in zip(prompts, alone):
        pool.insert(o[len(p):])
    relaxed_alone = generate(model, prompts[1], pool=pool, max_new_tokens=40, eos_token_id=None, mode="relaxed",
                             update_pool=False).sequences[0].tolist()
    got, errors = {}, []

    def run(name, fn):
        try:
            for _ in range(3):
                got.setdefault(name, []).append(fn())
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    jobs = {
        "strict": lambda: generate(model, prompts[0], pool=pool, max_new_tokens=40, eos_token_id=None,
                                   update_pool=False).sequences[0].tolist(),
        "relaxed": lambda: generate(model, prompts[1], pool=pool, max_new_tokens=40, eos_token_id=None,
                                    mode="relaxed", update_pool=False).sequences[0].tolist(),
        "hf": lambda: greedy(model, prompts[1], 40, eos_token_id=None),
    }
    threads = [threading.Thread(target=run, args=kv) for kv in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert got["strict"] == [alone[0]] * 3
    assert got["relaxed"] == [relaxed_alone] * 3
    assert got["hf"] == [alone[1]] * 3


def test_sdpa_gqa_equals_transformers_sdpa():
    """Grouped-query heads read in place equal transformers' repeat_kv + SDPA; masks, shapes and
    the case it hands back (no mask) all agree, and decoding restores the model's
    attention implementation."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from laser.cpu import sdpa_gqa_forward

    model = tiny("llama", 0)
    attn = model.model.layers[0].self_attn  # 4 query heads over 2 KV heads
    g = torch.Generator().manual_seed(0)
    for B, q, T, Hkv, masked in [(1, 5, 12, 2, True), (3, 4, 9, 2, True), (2, 1, 7, 2, True), (1, 6, 6, 2, False)]:
        query = torch.randn(B, 4, q, 8, generator=g)
        key, value = torch.randn(B, Hkv, T, 8, generator=g), torch.randn(B, Hkv, T, 8, generator=g)
        mask = None
        if masked:
            mask = torch.zeros(B, 1, q, T).masked_fill_(torch.rand(B, 1, q, T, generator=g) < 0.3, torch.finfo(torch.float32).min)
            mask[..., -1] = 0  # every query sees something
        got, _ = sdpa_gqa_forward(attn, query, key, value, mask, scaling=0.3)
        want, _ = sdpa_attention_forward(attn, query, key, value, mask, scaling=0.3)
        assert got.shape == (B, q, 4, 8)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    prompt = [5, 6, 7, 8, 9]
    assert generate(model, prompt, max_new_tokens=6, eos_token_id=None).sequences[0].tolist() == greedy(model, prompt, 6)
    assert model.config._attn_implementation == "laser", "prepared once, kept for the next call"


def test_hf_entry_point_honours_stopping_criteria_and_streamer_and_refuses_what_it_cannot_do():
    from transformers import StoppingCriteria, StoppingCriteriaList

    model = tiny("llama", 12)
    prompt = torch.tensor([[4, 5, 6, 7]])
    want = greedy(model, prompt[0], 25, eos_token_id=None)
    pool = laser.RetrievalPool()
    pool.insert(want[4:])  # the whole continuation: steps commit many tokens at once

    class StopAfterToken(StoppingCriteria):
        def __init__(self, token):
            self.token = token

        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == self.token

    stop_token = want[4 + 9]
    first = want.index(stop_token, 4)  # the first time the stop token appears in the output
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=25, do_sample=False, eos_token_id=None,
              pad_token_id=0, custom_generate=laser.hf_generate, pool=pool)
    ref = model.generate(prompt, stopping_criteria=StoppingCriteriaList([StopAfterToken(stop_token)]),
                         **{k: v for k, v in kw.items() if k not in ("custom_generate", "pool")})
    out = model.generate(prompt, stopping_criteria=StoppingCriteriaList([StopAfterToken(stop_token)]), **kw)
    assert out[0].tolist() == want[: first + 1] == ref[0].tolist()

    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    rec = Recorder()
    out = model.generate(prompt, laser_streamer=rec, **kw)  # (transformers keeps streamer= for itself)
    assert rec.ended and rec.chunks[0] == [4, 5, 6, 7] and sum(rec.chunks[1:], []) == want[4:] == out[0, 4:].tolist()
    assert any(len(c) > 1 for c in rec.chunks[1:])  # a step streams all it commits
    rec = Recorder()
    assert laser.generate(model, prompt, pool=pool, max_new_tokens=25, eos_token_id=None,
                          streamer=rec).sequences[0].tolist() == want
    assert rec.ended and sum(rec.chunks, []) == want
    for bad in (dict(do_sample=True), dict(num_beams=2), dict(num_return_sequences=2, num_beams=2)):
        with pytest.raises(ValueError, match="does not support"):
            model.generate(prompt, **{**kw, **bad})


def test_batch_inputs_follow_hf_conventions():
    """[B, L] with left padding, or a list of sequences: [B, L + new] padded like HF's output."""
    model = tiny("llama", 14)
    rows = [[5, 6, 7, 8, 9], [11, 12], [3, 4, 5]]
    L = max(map(len, rows))
    x = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    m = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    outs = [greedy(model, r, 12, eos_token_id=None) for r in rows]
    eos = outs[1][len(rows[1]) + 3]  # row 1 stops early
    want = model.generate(x, attention_mask=m, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    got = laser.generate(model, x, attention_mask=m, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert got.sequences.tolist() == want.tolist()
    assert laser.generate(model, rows, max_new_tokens=12, eos_token_id=eos, pad_token_id=0).sequences.tolist() == want.tolist()
    with pytest.raises(ValueError, match="left padding"):
        laser.generate(model, x, attention_mask=m.flip(1), max_new_tokens=4)
    with pytest.raises(ValueError, match="one sequence only"):
        laser.generate(model, rows, max_new_tokens=4, streamer=object())
