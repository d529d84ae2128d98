"""Batched decoding: per-row strict == greedy, ragged lengths, refills, EOS, relaxed rule."""

import numpy as np
import pytest
import torch

import laser
from laser.batch import Request, generate_batch
from test_decode import V, greedy, greedy_case, tiny


def run_batch(*args, **kwargs) -> list:
    """generate_batch's stream, collected in request order."""
    return sorted(generate_batch(*args, **kwargs), key=lambda r: r.index)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("batch_size", [1, 4, 8])
def test_each_row_equals_its_greedy_output(arch, batch_size):
    model = tiny(arch, 21)
    rng = np.random.default_rng(batch_size)
    prompts = [rng.integers(1, V, int(rng.integers(2, 25))).tolist() for _ in range(7)]  # ragged
    outs = [greedy(model, p, 28, eos_token_id=None) for p in prompts]
    pool = laser.RetrievalPool(max_depth=8, vocab_size=V)
    for p, o in zip(prompts[::2], outs[::2]):
        pool.insert(o[len(p):])
    reqs = [Request(p, pool if i % 3 else None, tag=i) for i, p in enumerate(prompts)]
    res = run_batch(model, reqs, batch_size=batch_size, max_new_tokens=28, eos_token_id=None, update_pool=False,
                         draft=laser.DraftConfig(budget=12, max_depth=6))
    assert [r.tag for r in res] == list(range(7))
    for p, o, r in zip(prompts, outs, res):
        assert r.tokens.tolist() == o[len(p):]
        assert r.stats.new_tokens == 28 and r.stats.steps <= 28


def test_rows_finish_independently_at_eos_and_are_refilled():
    model = tiny("llama", 22)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, V, 6).tolist() for _ in range(6)]
    outs = [greedy(model, p, 30, eos_token_id=None) for p in prompts]
    eos = outs[0][6 + 4]  # a token the first row emits early
    want = [greedy(model, p, 30, eos_token_id=eos) for p in prompts]
    stream = list(generate_batch(model, [Request(p, tag=i) for i, p in enumerate(prompts)], batch_size=2,
                                 max_new_tokens=30, eos_token_id=eos))
    finished = [r.tag for r in stream]
    assert sorted(finished) == list(range(6)) and finished[0] == 0  # streamed as rows finish: row 0 stops first
    res = sorted(stream, key=lambda r: r.index)
    for p, w, r in zip(prompts, want, res):
        assert r.tokens.tolist() == w[len(p):]
    assert len(res[0].tokens) <= 5


def test_finished_rows_leave_the_batch_once_the_queue_is_empty():
    from laser.hf import cache_kwarg

    model = tiny("llama", 22)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, V, 6).tolist() for _ in range(3)]
    outs = [greedy(model, p, 30, eos_token_id=None) for p in prompts]
    eos = outs[0][6 + 4]  # the first row stops early
    want = [greedy(model, p, 30, eos_token_id=eos) for p in prompts]
    widths = []
    # rows in the batch at each forward: the KV cache's (a ragged verification's input is one sequence)
    hook = model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw[cache_kwarg(model)].rows),
                                           with_kwargs=True)
    try:
        res = run_batch(model, [Request(p) for p in prompts], batch_size=3, max_new_tokens=30, eos_token_id=eos)
    finally:
        hook.remove()
    for p, w, r in zip(prompts, want, res):
        assert r.tokens.tolist() == w[len(p):]
    lengths = sorted(len(r.tokens) for r in res)
    assert widths[0] == 3 and widths[-1] == 1 and widths == sorted(widths, reverse=True)
    assert lengths[0] < lengths[-1] and 2 in widths  # the batch shrank as rows finished


def test_prompt_weight_zero_turns_prompt_lookup_off_in_batches():
    """Same draft sources as laser.generate: prompt_weight=0 leaves the request's own pool out."""
    model = tiny("llama", 26)
    prompt = [1, 2, 3] * 4  # the prompt pool alone would draft after "... 2 3"
    cfg = laser.DraftConfig(budget=8, prompt_weight=0.0)
    res = run_batch(model, [Request(prompt, laser.RetrievalPool()), Request(prompt)], batch_size=2,
                         max_new_tokens=10, eos_token_id=None, draft=cfg, update_pool=False)
    want = greedy(model, prompt, 10, eos_token_id=None)[len(prompt):]
    for r in res:
        assert r.tokens.tolist() == want and set(r.stats.tree_sizes) == {0}
    on = run_batch(model, [Request(prompt, laser.RetrievalPool())], max_new_tokens=10, eos_token_id=None,
                        draft=laser.DraftConfig(budget=8), update_pool=False)
    assert max(on[0].stats.tree_sizes) > 0


def test_relaxed_rows_obey_the_rule():
    model = tiny("qwen2", 23)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, V, 8).tolist() for _ in range(4)]
    pool = laser.RetrievalPool(max_depth=8)
    torch.manual_seed(0)
    for p in prompts:
        ids = torch.tensor([p])
        s = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=True, top_k=3,
                           pad_token_id=0, eos_token_id=None)
        pool.insert(s[0, 8:].numpy())
    k, p_min = 3, 0.005
    res = run_batch(model, [Request(p, pool) for p in prompts], batch_size=4, max_new_tokens=40,
                         mode="relaxed", top_k=k, min_prob=p_min, eos_token_id=None)
    for prompt, r in zip(prompts, res):
        seq = torch.tensor([prompt + r.tokens.tolist()])
        with torch.no_grad():
            logits = model(seq).logits[0].float()
        for t in range(len(prompt), seq.shape[1]):
            row, tok = logits[t - 1], int(seq[0, t])
            ok = tok == int(row.argmax()) or (int((row > row[tok]).sum()) < k and torch.softmax(row, -1)[tok] >= p_min - 1e-5)
            assert ok


def test_batch_bad_input():
    model = tiny("llama", 24)
    with pytest.raises(ValueError, match="batch_size"):
        generate_batch(model, [Request([1, 2])], batch_size=0)
    with pytest.raises(ValueError, match="out of range"):
        generate_batch(model, [Request([1, 2]), Request([1, V])])
    with pytest.raises(ValueError, match="context window"):
        generate_batch(model, [Request([1] * 250)], max_new_tokens=10)


def test_common_budget_cut_keeps_rows_exact():
    """With a cost curve every row's tree is cut to one best-first prefix; outputs stay greedy."""
    model = tiny("llama", 25)
    prompts, outs, pool = greedy_case(model, 5, 5, 3, 15, 24)
    cost = 1.0 + 0.2 * np.arange(17)  # each node costs a fifth of a step: trees get cut
    res = run_batch(model, [Request(p, pool) for p in prompts], batch_size=4, max_new_tokens=24,
                         eos_token_id=None, update_pool=False, draft=laser.DraftConfig(budget=16, cost=cost))
    for p, o, r in zip(prompts, outs, res):
        assert r.tokens.tolist() == o[len(p):]
    assert max(max(r.stats.tree_sizes) for r in res) < 16
