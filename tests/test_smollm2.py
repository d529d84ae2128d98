"""End-to-end on the real default model: strict LASER == HF greedy on ML-100K prompts."""

import pytest
import torch

import laser
from laser.data import chat_ids, item_prompt, load_dataset, user_prompt


@pytest.fixture(scope="module")
def smol():
    return laser.load_model()


@pytest.mark.slow
def test_strict_equals_greedy_on_smollm2(smol):
    model, tok = smol
    ds = load_dataset("ml-100k")
    texts = [user_prompt(ds, u) for u in ("1", "2", "3")] + [item_prompt(ds, i) for i in ("1", "50")]
    pool = laser.RetrievalPool(max_depth=12, vocab_size=len(tok))
    for text in texts:  # 5 real prompts; the pool fills online as it would in a job
        ids = chat_ids(tok, text)
        x = torch.tensor([ids])
        want = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=48, do_sample=False)[0].tolist()
        got = laser.generate(model, ids, pool=pool, max_new_tokens=48)
        assert got.sequences[0].tolist() == want
        assert got.stats.steps <= 48
    assert len(pool) > 1
