"""End-to-end on the real default model: strict LASER == HF greedy on ML-100K prompts, B = 1, 4, 8."""

import pytest
import torch

import laser
from laser.batch import Request, generate_batch
from laser.data import chat_ids, item_prompt, load_dataset, user_prompt


@pytest.fixture(scope="module")
def smol():
    return laser.load_model()


@pytest.mark.slow
def test_strict_equals_greedy_on_smollm2(smol):
    model, tok = smol
    assert laser.Engine(model).direct is not None, "verifications run LASER's direct forward"
    ds = load_dataset("ml-100k")
    texts = [user_prompt(ds, u) for u in ("1", "2", "3", "4", "5", "6")] + [item_prompt(ds, i) for i in ("1", "50")]
    prompts = [chat_ids(tok, text) for text in texts]
    wants = []
    for ids in prompts:
        x = torch.tensor([ids])
        wants.append(model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=48, do_sample=False)[0, len(ids):].tolist())
    pool = laser.RetrievalPool(max_depth=12, vocab_size=len(tok))
    for ids, want in zip(prompts, wants):  # one row at a time; the pool fills online as it would in a job
        got = laser.generate(model, ids, pool=pool, max_new_tokens=48)
        assert got.sequences[0, len(ids):].tolist() == want
        assert got.stats.steps <= 48
    assert len(pool) > 1
    for B in (4, 8):  # ragged rows verified together, each from a fresh pool filling online
        pool = laser.RetrievalPool(max_depth=12, vocab_size=len(tok))
        res = sorted(generate_batch(model, [Request(p, pool) for p in prompts], batch_size=B, max_new_tokens=48),
                     key=lambda r: r.index)
        assert [r.tokens.tolist() for r in res] == wants, B
