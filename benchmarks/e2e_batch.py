"""Batched throughput: LASER continuous batching vs HF batched greedy, same prompts, one run.

    python benchmarks/e2e_batch.py [--prompts 16] [--new 128] [--batch 1 4 8 16] [--rounds 1] [--acceptance [--deep]]
        [--model M] [--no-repeat-ngram N] [--repetition-penalty R]

Prompts are the ML-100K user-knowledge prompts of benchmarks/e2e_decode.py; each mode's
shared pools are warmed with the texts written in that mode for other users (as that mode's
job pools hold: strict rows draft from strict texts, relaxed rows from relaxed texts). Each batch size gets its own
verification cost curve (laser.calibrate(batch=B)): a tree node costs B tokens there. Prints tokens/s per method and
batch size, and LASER's ratio to HF batched greedy at the same batch size (with --rounds R, every
method runs R times in turn, and each figure is the median over rounds: a ratio is the median of
the rounds' side-by-side ratios, as this VM's speed drifts by 20% between minutes). The "no drafts"
row is LASER's own loop and forward (same linears, attention, cache) with no tree, one
token per row and step: strict or relaxed over it is what speculation alone buys.
--acceptance adds strict and relaxed with an AcceptanceModel, drafting as `laser generate
--acceptance` does (matches of 1-8 tokens, 3 levels, the depth-12 pool), each mode's model
learned online; --deep adds both modes drafting as `laser generate --acceptance --global-pool
--pool-depth 32 --max-depth 30 --max-match 16` does (a depth-32 pool of the same warm texts,
which plays the global pool here: every prompt drafts from the one pool). --pool-corpus first
fills each mode's pools with the texts a whole-dataset job of that mode wrote for the other
users (benchmarks/knowledge), as a job's pools hold them late in its run. Loop control
(--no-repeat-ngram, --repetition-penalty) applies to every method, HF's included; each
method's texts (last round) come with their loop share and mean distinct 4-gram share.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import laser
from laser.batch import Request, generate_batch
from laser.data import chat_ids, load_dataset, user_prompt
from laser.job import JobConfig
from laser.quality import quality
from laser.repeats import hf_processors
from laser.replay import corpus_records


def hf_batched(model, tok, prompts, B, new, loops):
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tokens, t0 = 0, time.perf_counter()
    for i in range(0, len(prompts), B):
        chunk = prompts[i : i + B]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        out = model.generate(ids.to(model.device), attention_mask=attn.to(model.device), max_new_tokens=new,
                             do_sample=False, pad_token_id=pad, logits_processor=hf_processors(**loops, prompt_len=width))
        gen = out[:, width:]
        for row in gen.tolist():  # count up to and including the first EOS, like LASER
            tokens += next((j + 1 for j, t in enumerate(row) if t == tok.eos_token_id), len(row))
    return tokens / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--warm", type=int, default=16)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=1, help="run every method this many times in turn; medians")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--acceptance", action="store_true", help="also LASER with an AcceptanceModel")
    ap.add_argument("--deep", action="store_true", help="also the acceptance model with a depth-32 pool, depth-30 drafts")
    ap.add_argument("--model", help="default: SmolLM2-135M-Instruct")
    ap.add_argument("--no-repeat-ngram", type=int, default=JobConfig.no_repeat_ngram, help="default: the job's")
    ap.add_argument("--repetition-penalty", type=float, default=JobConfig.repetition_penalty, help="default: the job's")
    ap.add_argument("--loop-scope", default=JobConfig.loop_scope, help="default: the job's")
    ap.add_argument("--pool-corpus", metavar="PATTERN",
                    help="first put into each mode's pools the texts a `laser generate` job of that mode wrote for every "
                         "user but the evaluated and warm-up ones ({mode} in the path: strict / relaxed), as a job's "
                         "pools hold them late in a run, e.g. benchmarks/knowledge/ml-100k-users-{mode}.jsonl.gz")
    args = ap.parse_args(argv)
    from laser.job import JOB_DRAFT, JOB_DRAFT_ACCEPTANCE

    torch.manual_seed(0)
    model, tok = laser.load_model(args.model, device=args.device)
    loops = {"no_repeat_ngram_size": args.no_repeat_ngram, "repetition_penalty": args.repetition_penalty,
             "loop_scope": args.loop_scope}
    ds = load_dataset("ml-100k")
    users = sorted(ds.users, key=int)
    order = np.random.default_rng(0).permutation(len(users))
    eval_users = [users[i] for i in order[: args.prompts]]
    warm_users = [users[i] for i in order[args.prompts : args.prompts + args.warm]]
    prompts = [chat_ids(tok, user_prompt(ds, u)) for u in eval_users]
    ctx_len = int(np.mean([len(p) for p in prompts]))
    cost_at = {B: laser.calibrate(model, context_len=ctx_len, sizes=(0, 1, 2, 4, 8, 16, 32), batch=B) for B in set(args.batch) | {8}}
    # strict / relaxed: drafting by pool shares, as `laser generate` without --acceptance
    cfg_at = {B: laser.DraftConfig(budget=32, max_depth=10, cost=c, **JOB_DRAFT) for B, c in cost_at.items()}
    pools, am_rows = {}, {}  # by mode: the depth-12 pool; the acceptance rows' (pool, drafting)
    for mode in ("strict", "relaxed"):
        pool = pools[mode] = laser.RetrievalPool(max_depth=12, vocab_size=len(tok))
        texts = []
        if args.pool_corpus:
            path, skip = args.pool_corpus.format(mode=mode), set(eval_users) | set(warm_users)
            texts = [np.asarray(r["tokens"], dtype=np.int64) for r in corpus_records(path) if r["id"] not in skip]
            for t in texts:
                pool.insert(t)
            print(f"{mode} pools: {len(texts)} texts from {path}")
        warm = [Request(chat_ids(tok, user_prompt(ds, u)), pool) for u in warm_users]
        texts += [r.tokens for r in generate_batch(model, warm, batch_size=8, max_new_tokens=args.new, mode=mode,
                                                   draft=cfg_at[8], acceptance=None, **loops)]
        print(f"{mode} pool warmed with {len(warm)} users' {mode} texts: {len(pool)} nodes")
        deep_pool = laser.RetrievalPool(max_depth=32, vocab_size=len(tok))
        for t in texts:
            deep_pool.insert(t.astype(np.int64))
        am_rows[mode] = {"am": (pool, dict(JOB_DRAFT_ACCEPTANCE, max_depth=10)),
                         "deep": (deep_pool, dict(JOB_DRAFT_ACCEPTANCE, max_depth=30, max_match=16))}

    for B in args.batch:  # untimed: first calls at a batch size compile kernels and pick GEMM algorithms
        hf_batched(model, tok, prompts[:B], B, 8, loops)
        for mode in ("strict", "relaxed"):
            list(generate_batch(model, [Request(p, pools[mode]) for p in prompts[:B]], batch_size=B, max_new_tokens=32,
                                mode=mode, draft=cfg_at[B], update_pool=False, acceptance=None, **loops))
    no_drafts = laser.DraftConfig(budget=0, prompt_weight=0)
    modes = ("none", "strict", "relaxed") + (("strict_am", "relaxed_am") if args.acceptance or args.deep else ()) + (
        ("strict_deep", "relaxed_deep") if args.deep else ())

    def timed(B, mode):  # tok/s, mean tokens per row-step, per-step phase times (ms), texts of one LASER run
        kind, _, suffix = mode.partition("_")
        am = bool(suffix)
        use_pool, extra = am_rows[kind][suffix] if am else (None if mode == "none" else pools[kind], None)
        draft = no_drafts if mode == "none" else laser.DraftConfig(budget=32, cost=cost_at[B], **extra) if am else \
            cfg_at[B]
        t0 = time.perf_counter()
        res = list(generate_batch(model, [Request(p, use_pool) for p in prompts], batch_size=B, max_new_tokens=args.new,
                                  mode="strict" if mode == "none" else kind, draft=draft, update_pool=False,
                                  acceptance=laser.AcceptanceModel() if am else None, **loops))
        speed = sum(len(r.tokens) for r in res) / (time.perf_counter() - t0)
        # every row's stats hold each batch step's phase times: per step, averaged over rows
        per = {k: 1e3 * float(np.mean([getattr(r.stats, "time_" + k) / r.stats.steps for r in res]))
               for k in ("draft", "verify", "accept", "cache")}
        texts = [tok.decode(r.tokens.tolist(), skip_special_tokens=True) for r in res]
        return speed, float(np.mean([r.stats.mean_accepted for r in res])), per, texts

    rows = []
    for B in args.batch:
        rounds = []  # per round: {"hf": tok/s, mode: tok/s, mode + "_step": tokens/row-step, mode + "_phases": ...}
        for k in range(args.rounds):  # each round runs every method once, HF first
            line = {"hf": hf_batched(model, tok, prompts, B, args.new, loops)}
            for mode in modes:
                line[mode], line[mode + "_step"], line[mode + "_phases"], line[mode + "_texts"] = timed(B, mode)
            rounds.append(line)
            print(f"B={B:2d} round {k + 1}: HF {line['hf']:6.1f} tok/s; " + ", ".join(
                f"{m} {line[m]:6.1f} ({line[m] / line['hf']:.2f}x)" for m in modes), flush=True)
        # medians over rounds; a ratio is the median of the rounds' side-by-side ratios
        med = {"B": B, "hf": float(np.median([r["hf"] for r in rounds]))}
        for mode in modes:
            med[mode] = float(np.median([r[mode] for r in rounds]))
            med[mode + "_x"] = float(np.median([r[mode] / r["hf"] for r in rounds]))
            med[mode + "_alone"] = float(np.median([r[mode] / r["none"] for r in rounds]))
            med[mode + "_step"] = float(np.median([r[mode + "_step"] for r in rounds]))
            med[mode + "_q"] = quality(rounds[-1][mode + "_texts"])
        rows.append(med)
        for mode in ("strict", "relaxed"):
            phases = {k: float(np.median([r[mode + "_phases"][k] for r in rounds])) for k in rounds[0][mode + "_phases"]}
            print(f"      {mode} ms per step: " + " ".join(f"{k} {v:.1f}" for k, v in phases.items()))
        for mode in modes[3:]:
            print(f"      {mode}: {med[mode]:6.1f} tok/s ({med[mode + '_x']:.2f}x HF, {med[mode + '_alone']:.2f}x no "
                  f"drafts), {med[mode + '_step']:.2f} tokens/row-step", flush=True)

    print(f"\n{len(prompts)} ML-100K user prompts x {args.new} new tokens, {args.model or 'SmolLM2-135M'} on "
          f"{args.device}, loop control {loops}")
    print(f"{'B':>3s} {'HF greedy tok/s':>16s} {'no drafts':>10s} {'x HF':>6s} {'strict tok/s':>13s} {'x HF':>6s} "
          f"{'relaxed tok/s':>14s} {'x HF':>6s} {'tok/step s/r':>13s} {'spec. alone s/r':>16s} {'loops s/r':>10s} "
          f"{'dist-4 s/r':>12s}")
    for r in rows:
        qs, qr = r["strict_q"], r["relaxed_q"]
        print(f"{r['B']:3d} {r['hf']:16.1f} {r['none']:10.1f} {r['none_x']:6.2f} {r['strict']:13.1f} "
              f"{r['strict_x']:6.2f} {r['relaxed']:14.1f} {r['relaxed_x']:6.2f} "
              f"{r['strict_step']:6.2f}/{r['relaxed_step']:.2f} {r['strict_alone']:9.2f}/{r['relaxed_alone']:.2f} "
              f"{100 * qs.loop_share:4.0f}/{100 * qr.loop_share:.0f}% {qs.distinct[4]:.3f}/{qr.distinct[4]:.3f}")


if __name__ == "__main__":
    main()
