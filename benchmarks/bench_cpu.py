"""CPU linear products: every product of laser/cpu.py over the linears of one SmolLM2-135M-shaped
forward (30 layers of q, k, v, o, gate, up, down; 7 x 30 distinct random weights, 423 MB, so they
stream from memory as in a real forward), at the row counts a verification runs.

Run: pytest benchmarks/bench_cpu.py --benchmark-only
The summary prints each product's median per row count and its ratio to "linear" (torch's
F.linear, what HF's forward runs: the baseline on the same footing). Issue #18 asks for speculation that pays on
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
