"""Triton kernels (run under TRITON_INTERPRET=1 on CPU, natively on CUDA) against their references."""

import numpy as np
import pytest
import torch

import laser
from laser.accept import accept_flags, accept_trees, longest_path, row_stats_reference
from laser.kernels.accept import fused_row_stats
from laser.kernels.bits import mask_to_bits
from laser.kernels.tree_attention import tree_attention, tree_attention_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def random_tree(n_target, seed):
    rng = np.random.default_rng(seed)
    pool = laser.RetrievalPool(max_depth=8)
    for _ in range(40):
        pool.insert(rng.integers(0, 6, 60))
    t = pool.draft([1, 2], budget=n_target)
    assert len(t) > 0
    return t


def rows_of(tree):
    return torch.from_numpy(tree.parents + 1).long()


# ---------------------------------------------------------------- fused acceptance

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("R,V,splits,k", [(3, 97, 1, 1), (9, 1000, 3, 2), (17, 4099, None, 3), (5, 2000, 2, 4)])
def test_fused_accept_matches_reference(dtype, R, V, splits, k):
    g = torch.Generator().manual_seed(R * V)
    logits = (torch.randn(R, V, generator=g) * 3).to(dtype)
    n = 2 * R
    parent_row = torch.randint(0, R, (n,), generator=g)
    tokens = torch.randint(0, V, (n,), generator=g)
    tokens[: R] = logits.float().argmax(-1)[parent_row[:R]]  # some nodes are the argmax
    top = logits.float().sort(-1, descending=True).indices  # and some are 2nd .. 5th
    tokens[R : 2 * R] = top[parent_row[R:], torch.arange(R) % 5]
    got = fused_row_stats(logits.to(DEV), parent_row.to(DEV), tokens.to(DEV), k, splits=splits)
    want = row_stats_reference(logits, parent_row, tokens, k)
    assert set(want.rank.tolist()) >= set(range(k + 1)) - {k} and int(want.rank.max()) <= k
    assert torch.equal(got.argmax.cpu(), want.argmax)
    assert torch.equal(got.rank.cpu(), want.rank)
    torch.testing.assert_close(got.prob.cpu(), want.prob, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("R,V,k", [(1, 5, 1), (3, 97, 1), (9, 1000, 2), (17, 4099, 3), (30, 49152, 2)])
def test_cpu_row_stats_match_reference(R, V, k):
    """laser._C.row_stats_at (the CPU path of row_stats and row_argmax): argmax (first of tied
    maxima) and capped ranks exact, probabilities to fp32 rounding; out-of-range nodes refused."""
    from laser import _C
    from laser.accept import row_argmax, row_stats

    g = torch.Generator().manual_seed(R * V)
    logits = torch.randn(R, V, generator=g) * 3
    logits[-1, :] = 0.5  # a flat row: every logit ties
    logits[0, V // 2] = logits[0, V - 1] = logits[0].max() + 1  # a tie, the first index wins
    n = 3 * R
    parent_row = torch.randint(0, R, (n,), generator=g)
    tokens = torch.randint(0, V, (n,), generator=g)
    tokens[:R] = logits.argmax(-1)[parent_row[:R]]
    top = logits.sort(dim=-1, descending=True, stable=True).indices
    tokens[R : 2 * R] = top[parent_row[R : 2 * R], torch.arange(R) % min(V, 5)]
    got = row_stats(logits, parent_row, tokens, k)
    want = row_stats_reference(logits, parent_row, tokens, k)
    assert int(want.argmax[0]) == V // 2
    assert torch.equal(got.argmax, want.argmax) and torch.equal(row_argmax(logits), want.argmax)
    assert torch.equal(got.rank, want.rank)
    torch.testing.assert_close(got.prob, want.prob, rtol=2e-6, atol=1e-7)
    with pytest.raises(ValueError, match="parent_row"):
        _C.row_stats_at(logits.data_ptr(), R, V, np.array([R]), np.array([0]), k, 1)
    with pytest.raises(ValueError, match="tokens"):
        _C.row_stats_at(logits.data_ptr(), R, V, np.array([0]), np.array([V]), k, 1)


def test_reference_matches_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 500, generator=g) * 4
    parent_row, tokens = torch.randint(0, 6, (10,), generator=g), torch.randint(0, 500, (10,), generator=g)
    ref = row_stats_reference(logits, parent_row, tokens)
    x = logits.double()
    p64 = torch.softmax(x, -1)[parent_row, tokens]
    r64 = (x[parent_row] > x[parent_row, tokens][:, None]).sum(-1)
    torch.testing.assert_close(ref.prob.double(), p64, rtol=1e-6, atol=1e-9)
    assert torch.equal(ref.rank, r64) and torch.equal(ref.argmax, x.argmax(-1))
    assert torch.equal(row_stats_reference(logits, parent_row, tokens, 3).rank, r64.clamp(max=3))


def test_known_ranks_and_ties_at_kth_place():
    V = 300
    logits = torch.zeros(2, V)
    logits[0, 5], logits[0, 6], logits[0, 7], logits[0, 8] = 9.0, 7.0, 7.0, 5.0  # tie at 2nd/3rd place
    logits[1, 100] = logits[1, 50] = 3.0  # tie for the argmax: the first index wins
    parent_row = torch.tensor([0, 0, 0, 0, 1, 1])
    tokens = torch.tensor([5, 6, 7, 8, 50, 100])
    assert row_stats_reference(logits, parent_row, tokens).rank.tolist() == [0, 1, 1, 3, 0, 0]
    for stats in (row_stats_reference(logits, parent_row, tokens, 2),
                  fused_row_stats(logits.to(DEV), parent_row.to(DEV), tokens.to(DEV), 2, splits=2)):
        assert stats.rank.cpu().tolist() == [0, 1, 1, 2, 0, 0]  # capped at top_k
        assert stats.argmax.cpu().tolist() == [5, 50]
        flags = accept_flags(stats, parent_row.to(stats.rank.device), tokens.to(stats.rank.device), "relaxed", 2, 0.0)
        assert flags.cpu().tolist() == [True, True, True, False, True, True]  # both tied tokens are within top-2
        strict = accept_flags(stats, parent_row.to(stats.rank.device), tokens.to(stats.rank.device), "strict", 2, 0.0)
        assert strict.cpu().tolist() == [True, False, False, False, True, False]


@pytest.mark.parametrize("splits", [1, 3, None])
def test_fused_argmax_ties_within_a_lane_and_across_chunks(splits):
    """The kernel keeps a running max per lane (columns j, j + BLOCK, ...) and per chunk:
    equal maxima in one lane, in other lanes and in other chunks all resolve to the first."""
    V = 5000
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(3))
    for c in (4000, 7 + 1024, 7 + 128, 7):  # 128 <= BLOCK <= 1024, powers of two: 7 + BLOCK shares 7's lane
        logits[0, c] = 50.0
    logits[1, 4999] = logits[1, 2500] = 60.0
    parent_row, tokens = torch.tensor([0, 0, 1]), torch.tensor([7, 4000, 4999])
    got = fused_row_stats(logits.to(DEV), parent_row.to(DEV), tokens.to(DEV), 2, splits=splits)
    assert got.argmax.cpu().tolist() == [7, 2500]
    assert got.rank.cpu().tolist() == [0, 0, 0]
    torch.testing.assert_close(got.prob.cpu(), row_stats_reference(logits, parent_row, tokens).prob, rtol=2e-5, atol=1e-7)


def test_row_stats_routes_large_k_to_the_reference(monkeypatch):
    """The kernel keeps MAX_K running values per lane; a larger top_k takes the torch reference."""
    from laser.accept import row_stats
    from laser.kernels.accept import MAX_K

    monkeypatch.setenv("LASER_FORCE_KERNELS", "1")
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 300, generator=g)
    parent_row, tokens = torch.randint(0, 4, (9,), generator=g), torch.randint(0, 300, (9,), generator=g)
    for k in (MAX_K, MAX_K + 3):
        got = row_stats(logits.to(DEV), parent_row.to(DEV), tokens.to(DEV), k)
        want = row_stats_reference(logits, parent_row, tokens, k)
        assert torch.equal(got.rank.cpu(), want.rank) and torch.equal(got.argmax.cpu(), want.argmax)


def test_longest_path_from_flags():
    t = random_tree(20, 1)
    mask, depth = t.mask, t.depth
    flags = np.ones(len(t), dtype=bool)
    best = longest_path(flags, mask, depth)
    assert depth[best] == depth.max() and best == int(np.flatnonzero(depth == depth.max())[0])
    flags[:] = False
    assert longest_path(flags, mask, depth) == -1
    flags[0] = True  # only the first node: path of length 1
    assert longest_path(flags, mask, depth) == 0
    kid = int(np.flatnonzero(t.parents == 0)[0]) if (t.parents == 0).any() else None
    if kid is not None:
        flags[kid] = True
        assert longest_path(flags, mask, depth) == kid
        flags[0] = False  # an accepted child of a rejected parent does not count
        assert longest_path(flags, mask, depth) == -1


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("mode", ["strict", "relaxed"])
def test_accept_trees_batch_equals_rows_alone(mode, kernels, monkeypatch):
    """A padded batch (with an idle row) judges every row as that row's tree alone would.

    kernels=True runs the fused Triton statistics (interpreted on the CPU, native on CUDA).
    """
    if kernels:
        monkeypatch.setenv("LASER_FORCE_KERNELS", "1")
    trees = [random_tree(12, 7), None, random_tree(5, 8), random_tree(20, 9)]
    q, V = 1 + max(len(t) for t in trees if t is not None), 8
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(len(trees), q, V, generator=g) * 2
    for r, t in enumerate(trees):  # make the drafted tokens likely winners, so paths get long
        if t is not None:
            logits[r, t.parents + 1, torch.from_numpy(t.tokens).long()] += 3.0
    eos, rooms = np.array([5]), [100, 0, 3, 100]
    batch = accept_trees(logits.to(DEV), trees, mode, 2, 0.1, eos, rooms)
    assert batch[1] is None
    for r, t in enumerate(trees):
        if t is None:
            continue
        path, out, stop = batch[r]
        alone = accept_trees(logits[r : r + 1, : len(t) + 1].to(DEV), [t], mode, 2, 0.1, eos, [rooms[r]])[0]
        assert np.array_equal(path, alone[0]) and np.array_equal(out, alone[1]) and stop == alone[2]
        # the committed path is a root path of accepted nodes, then the bonus = argmax after it
        x = logits[r].double()
        for j, node in enumerate(path[: out.size - 1]):
            row = x[t.parents[node] + 1]
            tok = int(t.tokens[node])
            rank, prob = int((row > row[tok]).sum()), float(torch.softmax(row, 0)[tok])
            assert tok == int(row.argmax()) or (mode == "relaxed" and rank < 2 and prob >= 0.1)
            assert j == 0 or t.parents[node] == path[j - 1]
        if out.size == len(path) + 1:
            assert out[-1] == int(x[path[-1] + 1 if len(path) else 0].argmax())
        assert out.size <= rooms[r] and (stop == bool(np.isin(out, eos).any()))


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("mode", ["strict", "relaxed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_accept_trees_reads_half_logits_as_their_fp32_values(dtype, mode, kernels, monkeypatch):
    """The decoders hand acceptance the model's own logits dtype (no fp32 copy): judging
    bf16/fp16 logits must equal judging the same values cast to fp32."""
    if kernels:
        monkeypatch.setenv("LASER_FORCE_KERNELS", "1")
    trees = [random_tree(12, 7), random_tree(20, 9)]
    q, V = 21, 8
    logits = (torch.randn(2, q, V, generator=torch.Generator().manual_seed(2)) * 2).to(dtype)
    for r, t in enumerate(trees):
        logits[r, t.parents + 1, torch.from_numpy(t.tokens).long()] += 3.0
    eos, rooms = np.array([5]), [100, 100]
    half = accept_trees(logits.to(DEV), trees, mode, 2, 0.1, eos, rooms)
    full = accept_trees(logits.float().to(DEV), trees, mode, 2, 0.1, eos, rooms)
    for a, b in zip(half, full):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


# ---------------------------------------------------------------- tree attention

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hkv,D", [(4, 4, 64), (4, 2, 128), (6, 1, 64)])
@pytest.mark.parametrize("n_target,past,splits", [(5, 0, None), (19, 37, 1), (19, 300, 3), (70, 13, None)])
def test_tree_attention_matches_reference(dtype, Hq, Hkv, D, n_target, past, splits):
    t = random_tree(n_target, n_target + past)
    n = len(t)
    g = torch.Generator().manual_seed(n + past)
    q = torch.randn(1, Hq, n, D, generator=g).to(dtype)
    k = torch.randn(1, Hkv, past + n, D, generator=g).to(dtype)
    v = torch.randn(1, Hkv, past + n, D, generator=g).to(dtype)
    out = tree_attention(q.to(DEV), k.to(DEV), v.to(DEV), mask_to_bits(t.mask), splits=splits).cpu()
    ref = tree_attention_reference(q, k, v, torch.from_numpy(t.mask))
    tol = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("shared_bits", [False, True])
def test_tree_attention_per_row_past_lengths(shared_bits):
    """Rows of one batch see different past lengths (lens[b]) and have their own tree masks."""
    B, Hq, Hkv, D, past = 3, 4, 2, 32, 21
    trees = [random_tree(9, 4 + b) for b in range(B)]
    n = max(len(t) for t in trees)
    masks = np.zeros((B, n, n), dtype=bool)
    for b, t in enumerate(trees):
        masks[b, : len(t), : len(t)] = t.mask
        masks[b, len(t):, len(t):] |= np.eye(n - len(t), dtype=bool)
    if shared_bits:
        masks[:] = masks[0]
    lens = torch.tensor([21, 0, 7])
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, Hq, n, D, generator=g)
    k, v = torch.randn(B, Hkv, past + n, D, generator=g), torch.randn(B, Hkv, past + n, D, generator=g)
    bits = mask_to_bits(masks[0] if shared_bits else masks)
    out = tree_attention(q.to(DEV), k.to(DEV), v.to(DEV), bits, lens=lens).cpu()
    ref = tree_attention_reference(q, k, v, torch.from_numpy(masks), lens=lens)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    garbage = k.clone()
    garbage[1, :, :past] = 1e4  # row 1 sees no past: what is there must not matter
    again = tree_attention(q.to(DEV), garbage.to(DEV), v.to(DEV), bits, lens=lens).cpu()
    torch.testing.assert_close(again[1], out[1], rtol=0, atol=0)


def test_reference_attention_matches_float64():
    t = random_tree(12, 3)
    n, past = len(t), 9
    q, k, v = torch.randn(1, 2, n, 16), torch.randn(1, 1, past + n, 16), torch.randn(1, 1, past + n, 16)
    ref = tree_attention_reference(q, k, v, torch.from_numpy(t.mask))
    visible = torch.ones(n, past + n, dtype=torch.bool)
    visible[:, past:] = torch.from_numpy(t.mask)
    s = (q.double() @ k.double().transpose(-1, -2)) / 4.0
    want = torch.softmax(s.masked_fill(~visible, float("-inf")), -1) @ v.double()
    torch.testing.assert_close(ref.double(), want, rtol=1e-5, atol=1e-6)


def test_bits_round_trip():
    t = random_tree(70, 5)
    bits = mask_to_bits(t.mask).numpy().view(np.uint8)
    back = np.unpackbits(bits, axis=1, bitorder="little")[:, : len(t)].astype(bool)
    assert (back == t.mask).all()


def test_launchers_reject_bad_input():
    with pytest.raises(ValueError):
        tree_attention(torch.randn(1, 3, 4, 64), torch.randn(1, 2, 4, 64), torch.randn(1, 2, 4, 64), torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="head dim"):
        tree_attention(torch.randn(1, 2, 4, 24), torch.randn(1, 2, 4, 24), torch.randn(1, 2, 4, 24), torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(TypeError):
        fused_row_stats(torch.zeros(2, 5, dtype=torch.float64), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="top_k"):
        fused_row_stats(torch.zeros(2, 5), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), 5)


# ---------------------------------------------------------------- decoder wiring (both paths)

def test_decoder_kernel_path_equals_reference_path(monkeypatch):
    """Strict decoding through the kernels (attention + acceptance) equals the torch path and greedy."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval().to(DEV)
    prompt = torch.tensor([[3, 4, 5, 6, 7]], device=DEV)
    want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0].tolist()
    pool = laser.RetrievalPool()
    pool.insert(want[5:])
    plain = laser.generate(model, prompt, pool=pool, max_new_tokens=24, eos_token_id=None, use_kernels=False, update_pool=False)
    monkeypatch.setenv("LASER_FORCE_KERNELS", "1")
    fused = laser.generate(model, prompt, pool=pool, max_new_tokens=24, eos_token_id=None, update_pool=False)
    assert plain.sequences[0].tolist() == want == fused.sequences[0].tolist()
    # a ragged batch through the kernel: per-row past lengths and tree masks
    rows = [[3, 4, 5, 6, 7], [9, 10], [11, 12, 13]]
    wants = [model.generate(torch.tensor([r], device=DEV), max_new_tokens=16, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0].tolist() for r in rows]
    got = laser.generate(model, rows, pool=pool, max_new_tokens=16, eos_token_id=None, update_pool=False).sequences
    assert [g[-16:] for g in got.tolist()] == [w[-16:] for w in wants]
