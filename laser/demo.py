"""`make demo`: LASER on a small ML-100K slice with the default model, against HF greedy.

Writes knowledge for a few users with LASER (strict, pool warmed online), then times HF
greedy and LASER on the next users' prompts and prints the speedup.
"""

from __future__ import annotations

import time

import torch

import laser
from laser.data import chat_ids, load_dataset, user_prompt

WARM, EVAL, NEW = 6, 3, 128


def main():
    torch.manual_seed(0)
    print("loading SmolLM2-135M-Instruct (first run converts the GGUF once) and ML-100K ...", flush=True)
    model, tok = laser.load_model()
    ds = load_dataset("ml-100k")
    users = sorted(ds.users, key=int)[: WARM + EVAL]
    prompts = [chat_ids(tok, user_prompt(ds, u)) for u in users]
    cost = laser.calibrate(model, context_len=len(prompts[0]), sizes=(0, 1, 4, 16, 32), repeats=2)
    cfg = laser.DraftConfig(budget=32, max_depth=10, cost=cost)
    pool = laser.RetrievalPool(max_depth=12, vocab_size=len(tok))
    for u, ids in zip(users[:WARM], prompts[:WARM]):
        out = laser.generate(model, ids, pool=pool, max_new_tokens=NEW, draft=cfg)
        print(f"user {u}: {out.stats.new_tokens} tokens in {out.stats.steps} steps", flush=True)
    print(f"pool: {len(pool)} nodes, {pool.memory_bytes() / 1e6:.1f} MB\n")

    t_hf = t_strict = t_relaxed = 0.0
    for u, ids in zip(users[WARM:], prompts[WARM:]):
        x = torch.tensor([ids])
        t = time.perf_counter()
        ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False)[0, len(ids):]
        t_hf += time.perf_counter() - t
        t = time.perf_counter()
        strict = laser.generate(model, ids, pool=pool, max_new_tokens=NEW, draft=cfg, update_pool=False)
        t_strict += time.perf_counter() - t
        t = time.perf_counter()
        relaxed = laser.generate(model, ids, pool=pool, max_new_tokens=NEW, draft=cfg, mode="relaxed", update_pool=False)
        t_relaxed += time.perf_counter() - t
        same = strict.sequences[0, len(ids):].tolist() == ref.tolist()
        print(f"user {u}: strict == greedy: {same}; {strict.stats.mean_accepted:.2f} tokens/step strict, "
              f"{relaxed.stats.mean_accepted:.2f} relaxed")
        print("  " + tok.decode(strict.sequences[0, len(ids):], skip_special_tokens=True)[:300].replace("\n", " "))
    print(f"\nspeedup over HF greedy on {EVAL} users: strict {t_hf / t_strict:.2f}x, relaxed {t_hf / t_relaxed:.2f}x")


if __name__ == "__main__":
    main()
