"""CPU verification costs, at the row counts a verification runs:

- test_forward_linears: every product of laser/cpu.py over the linears of one SmolLM2-135M-shaped
  forward (30 layers of q, k, v, o, gate, up, down; 7 x 30 distinct random weights, 423 MB, so they
  stream from memory as in a real forward); baseline "linear" (torch's F.linear, what HF's forward runs).
- test_verify_forward: the real SmolLM2-135M forward over 1 / 9 / 17 tokens at context 300, through
  the model's own modules ("model", LASER's linear routes and attention) and through LASER's direct
  forward ("direct", laser/forward.py: the same routes and attention, no module calls).
- test_attention: one layer's attention of 1 / 9 / 17 / 33 tokens over a 300-token cache row
  (SmolLM2's 9 query and 3 key/value heads of 64): SDPA with grouped-query heads as the model's
  attention runs it (laser.cpu.sdpa_gqa_forward, "sdpa") against the direct forward's C++
  attention over the cache (laser._C.attention_at, "cpp").
- test_row_stats: relaxed acceptance's statistics over 1 / 9 / 17 / 33 rows of 49,152 logits: the
  torch reference against the C++ pass (laser._C.row_stats_at).

Run: pytest benchmarks/bench_cpu.py --benchmark-only
The summary prints each entry's median per group and its ratio to the group's baseline ("linear",
"model", "sdpa", "reference": the baseline on the same footing). Issue #18 asks for speculation that pays on
this CPU: a 1 + 8-token forward should cost little more than a one-token forward.
"""

import pytest
import torch

from laser.cpu import _ONEDNN, _PACKED, PackedWeights, split_linear

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down
LAYERS = 30
THREADS = torch.get_num_threads()


@pytest.fixture(scope="module")
def weights():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, k, generator=g) * 0.02 for _ in range(LAYERS) for n, k in SHAPES]
    packs = PackedWeights()
    for w in ws:  # copies are made once per weight, outside the timing
        packs.get(w, "tiled")
        if _PACKED:
            packs.get(w, "packed")
    return ws, packs


@pytest.mark.parametrize("rows", [1, 9, 17])
@pytest.mark.parametrize("product", ["linear", "split", "onednn", "packed", "tiled"])
def test_forward_linears(benchmark, weights, product, rows):
    if product in ("onednn", "packed") and not (_PACKED if product == "packed" else _ONEDNN):
        pytest.skip(f"this torch has no {product} product")
    ws, packs = weights
    x = {576: torch.randn(rows, 576), 1536: torch.randn(rows, 1536)}
    benchmark.group = f"{rows} rows"
    benchmark.name = product

    def forward():
        with torch.no_grad():
            for w in ws:
                split_linear(x[w.shape[1]], w, None, 2 * THREADS, product, packs)

    benchmark.pedantic(forward, rounds=15, warmup_rounds=2)


@pytest.fixture(scope="module")
def smol():
    """SmolLM2-135M prepared by LASER, its cache holding a 300-token context."""
    import laser
    from laser.cache import TreeCache

    model, _ = laser.load_model()
    engine = laser.Engine(model)
    cache = TreeCache.for_model(model, 1, 400)
    L = 300
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), cache.filling([0], [L]):
        engine.forward(False, input_ids=torch.randint(0, 49152, (1, L), generator=g),
                       position_ids=torch.arange(L)[None], attention_mask=torch.ones(1, L, dtype=torch.long),
                       **{engine.kv: cache}, use_cache=True)
    return engine, cache


@pytest.mark.parametrize("rows", [1, 9, 17])
@pytest.mark.parametrize("path", ["model", "direct"])
def test_verify_forward(benchmark, smol, path, rows):
    engine, cache = smol
    W = cache.begin_block()  # every call writes the same block columns [300, 300 + rows)
    mask = torch.zeros(1, 1, rows, W + rows)
    mask[..., W:] = torch.triu(torch.full((rows, rows), torch.finfo(torch.float32).min), 1)  # a chain
    ids = torch.randint(0, 49152, (1, rows), generator=torch.Generator().manual_seed(rows))
    pos = (W + torch.arange(rows))[None]
    benchmark.group = f"forward {rows} tok"
    benchmark.name = path

    def model():
        with torch.no_grad():
            engine.forward(False, input_ids=ids, position_ids=pos, attention_mask=mask, **{engine.kv: cache},
                           use_cache=True)

    def direct():
        with torch.no_grad():
            engine.verify(False, ids, pos, mask, cache)

    benchmark.pedantic(model if path == "model" else direct, rounds=15, warmup_rounds=2)


@pytest.mark.parametrize("rows", [1, 9, 17, 33])
@pytest.mark.parametrize("how", ["sdpa", "cpp"])
def test_attention(benchmark, how, rows):
    import numpy as np

    from laser import _C
    from laser.cpu import sdpa_gqa_forward

    g = torch.Generator().manual_seed(rows)
    Hq, Hkv, D, W = 9, 3, 64, 300
    T = W + rows
    cache_k, cache_v = torch.randn(1, Hkv, 400, D, generator=g), torch.randn(1, Hkv, 400, D, generator=g)
    k, v = cache_k[:, :, :T], cache_v[:, :, :T]  # the cache's views, as the layers get them
    tokens = torch.randn(1, rows, Hq * D, generator=g)  # the q projection's output
    mask = torch.zeros(1, 1, rows, T)
    mask[..., W:] = torch.triu(torch.full((rows, rows), torch.finfo(torch.float32).min), 1)  # a chain
    out, slot = torch.empty_like(tokens), np.arange(rows)
    benchmark.group = f"attention {rows} tok"
    benchmark.name = how

    def sdpa():
        sdpa_gqa_forward(None, tokens.view(1, rows, Hq, D).transpose(1, 2), k, v, mask, scaling=D ** -0.5)

    def cpp():
        _C.attention_at(tokens.data_ptr(), rows, Hq, D, k.data_ptr(), v.data_ptr(), Hkv, 1, k.stride(0), k.stride(1), T,
                        mask.data_ptr(), rows, slot, slot * 0, D ** -0.5, out.data_ptr(), THREADS)

    benchmark.pedantic(sdpa if how == "sdpa" else cpp, rounds=200, warmup_rounds=10)


@pytest.mark.parametrize("rows", [1, 9, 17, 33])
@pytest.mark.parametrize("how", ["reference", "cpp"])
def test_row_stats(benchmark, how, rows):
    from laser.accept import row_stats, row_stats_reference

    g = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, 49152, generator=g) * 3
    parent_row = torch.randint(0, rows, (max(rows - 1, 1),), generator=g)
    tokens = torch.randint(0, 49152, parent_row.shape, generator=g)
    benchmark.group = f"row stats {rows} rows"
    benchmark.name = how
    run = row_stats_reference if how == "reference" else row_stats
    benchmark.pedantic(lambda: run(logits, parent_row, tokens, 2), rounds=30, warmup_rounds=2)
