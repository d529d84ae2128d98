"""End-to-end decode comparison on ML-100K user-knowledge prompts, one run, same prompts.

    python benchmarks/e2e_decode.py [--prompts 10] [--warm 16] [--new 160] [--device cpu] [--acceptance]
        [--model M] [--no-repeat-ngram N] [--repetition-penalty R] [--paper-rule] [--llamacpp]

Methods: HF greedy, HF prompt lookup (prompt_lookup_num_tokens=10), LASER with no drafts
(its own forward, one token per step: what the faster CPU forward alone gives), LASER
strict, LASER relaxed (k=2, p=0.1; rule "fresh", and with --paper-rule also the paper's rule), all drafting by pool shares (acceptance=None, the paper's
drafting and `laser generate`'s without --acceptance). Each mode's shared pool is warmed with the knowledge texts the
model wrote in that mode for *other* users, as that mode's job pools hold (strict: LASER strict,
which equals greedy; relaxed: LASER relaxed). Prints, per method, tokens/s, the ratio to
greedy (total and median per prompt), the mean number of tokens committed per step and of
new tokens per prompt (EOS may end a text early: its prefill then weighs more per token),
and per LASER method the milliseconds of each step's phases. Speculation alone is each LASER
method against LASER with no drafts, whole runs and decode steps alone (the prefill, the same
in both, excluded). --acceptance adds LASER strict and relaxed drafting as laser.generate does
by default (an AcceptanceModel, DraftConfig's default matches: 1-8 tokens, 3 levels), at draft
depth 30 over depth-32 pools, each mode's model learned online from its own warm-up texts on.
Loop control (--no-repeat-ngram, --repetition-penalty) applies to every method, HF's
included (its own processors). --llamacpp adds llama.cpp (llama-cpp-python, the benchmark
extra `pip install .[bench]`, an sdist that compiles llama.cpp in ~5 min on 2 cores; on the
Intel Xeon VM its native build crashed in its first forward, so build it with
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON") decoding greedily from the same GGUF, with
its own quantised weights, on the same prompts and threads (it has no n-gram ban: its row
runs without loop control; its KV cache is reset before each prompt, as every method's). Beside each method's speed: its texts' loop share and mean
distinct 4-gram share (laser.quality).
--pool-corpus first fills each mode's pool with the texts a whole-dataset job of that mode
wrote for the other users (benchmarks/knowledge), as a job's pools hold them late in its run;
without it the pools hold the warm-up texts alone, as at a job's start.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import laser
from laser.data import chat_ids, load_dataset, user_prompt
from laser.job import JobConfig
from laser.quality import quality
from laser.repeats import hf_processors
from laser.replay import corpus_records


def hf(model, ids, n, **kw):
    x = torch.tensor([ids], device=model.device)
    t = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, **kw)
    return out[0, len(ids):].tolist(), time.perf_counter() - t


def llama_cpp(model: str | None):
    """llama.cpp on the GGUF LASER loaded `model` from (the default's, a packaged one's, or a .gguf)."""
    from llama_cpp import Llama

    from laser.model import default_gguf, resolve

    path = resolve(model) or default_gguf()
    if not str(path).endswith(".gguf"):
        raise SystemExit(f"--llamacpp needs a GGUF model, not {path}")
    return Llama(model_path=str(path), n_ctx=4096, n_threads=torch.get_num_threads(), verbose=False)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--warm", type=int, default=16, help="other users whose texts warm the pool")
    ap.add_argument("--new", type=int, default=160)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--acceptance", action="store_true", help="also LASER with an AcceptanceModel")
    ap.add_argument("--model", help="default: SmolLM2-135M-Instruct")
    ap.add_argument("--no-repeat-ngram", type=int, default=JobConfig.no_repeat_ngram, help="default: the job's")
    ap.add_argument("--repetition-penalty", type=float, default=JobConfig.repetition_penalty, help="default: the job's")
    ap.add_argument("--loop-scope", default=JobConfig.loop_scope, help="default: the job's")
    ap.add_argument("--paper-rule", action="store_true", help="also LASER relaxed with the paper's rule")
    ap.add_argument("--llamacpp", action="store_true", help="also llama.cpp greedy on the same GGUF")
    ap.add_argument("--pool-corpus", metavar="PATTERN",
                    help="first put into each mode's pool the texts a `laser generate` job of that mode wrote for every "
                         "user but the evaluated and warm-up ones ({mode} in the path: strict / relaxed), as a job's "
                         "pools hold them late in a run, e.g. benchmarks/knowledge/ml-100k-users-{mode}.jsonl.gz")
    args = ap.parse_args(argv)
    from laser.job import JOB_DRAFT

    torch.manual_seed(0)
    model, tok = laser.load_model(args.model, device=args.device)
    loops = {"no_repeat_ngram_size": args.no_repeat_ngram, "repetition_penalty": args.repetition_penalty,
             "loop_scope": args.loop_scope}

    def hf_loops(ids):  # HF's processors of the same loop control
        return {"logits_processor": hf_processors(**loops, prompt_len=len(ids))}
    ds = load_dataset("ml-100k")
    users = sorted(ds.users, key=int)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(users))
    eval_users = [users[i] for i in order[: args.prompts]]
    warm_users = [users[i] for i in order[args.prompts : args.prompts + args.warm]]
    prompts = {u: chat_ids(tok, user_prompt(ds, u)) for u in eval_users + warm_users}

    cost = laser.calibrate(model, context_len=int(np.mean([len(p) for p in prompts.values()])),
                           sizes=(0, 1, 2, 4, 8, 16, 32, 64))
    print("verify cost (ms) for 0/1/2/4/8/16/32/64 nodes:", " ".join(f"{cost[b] * 1e3:.0f}" for b in (0, 1, 2, 4, 8, 16, 32, 64)))
    # strict / relaxed: drafting by pool shares (acceptance=None), as `laser generate` without --acceptance
    cfg = laser.DraftConfig(budget=args.budget, max_depth=10, cost=cost, **JOB_DRAFT)

    am_cfg = laser.DraftConfig(budget=args.budget, max_depth=30, cost=cost)
    models = {"strict": laser.AcceptanceModel(), "relaxed": laser.AcceptanceModel()} if args.acceptance else {}
    # depth 32 holds the deep contexts the acceptance rows draft from; the others draft as before
    pools = {}
    for mode in ("strict", "relaxed"):
        pool = pools[mode] = laser.RetrievalPool(max_depth=32 if args.acceptance else 12, vocab_size=len(tok))
        t = time.perf_counter()
        if args.pool_corpus:
            path = args.pool_corpus.format(mode=mode)
            texts = [r["tokens"] for r in corpus_records(path) if r["id"] not in prompts]
            for tokens in texts:
                pool.insert(np.asarray(tokens, dtype=np.int64))
            print(f"{mode} pool: {len(texts)} texts from {path}")
        for u in warm_users:
            laser.generate(model, prompts[u], pool=pool, max_new_tokens=args.new, mode=mode,
                           draft=am_cfg if models else cfg, acceptance=models.get(mode), **loops)
        print(f"warmed the {mode} pool with {len(warm_users)} users' {mode} texts in {time.perf_counter() - t:.0f} s: "
              f"{len(pool)} nodes")

    llm = llama_cpp(args.model) if args.llamacpp else None
    methods = ["hf_greedy", "hf_prompt_lookup", "laser_no_drafts", "laser_strict", "laser_relaxed"]
    methods += ["laser_relaxed_paper"] if args.paper_rule else []
    methods += ["laser_strict_am", "laser_relaxed_am"] if models else []
    rows = {m: {"tokens": [], "time": [], "per_step": [], "stats": [], "texts": []} for m in methods}
    if llm is not None:
        rows["llama_cpp"] = {"tokens": [], "time": [], "per_step": [], "stats": [], "texts": []}
    runs = [("strict", "", "fresh"), ("relaxed", "", "fresh")] + ([("relaxed", "_paper", "paper")] if args.paper_rule else [])
    runs += [(m, "_am", "fresh") for m in models]
    mismatches = 0
    for u in eval_users:
        ids = prompts[u]
        ref, dt = hf(model, ids, args.new, **hf_loops(ids))
        rows["hf_greedy"]["tokens"].append(len(ref)); rows["hf_greedy"]["time"].append(dt)
        rows["hf_greedy"]["texts"].append(tok.decode(ref, skip_special_tokens=True))
        pl, dt = hf(model, ids, args.new, prompt_lookup_num_tokens=10, **hf_loops(ids))
        rows["hf_prompt_lookup"]["tokens"].append(len(pl)); rows["hf_prompt_lookup"]["time"].append(dt)
        rows["hf_prompt_lookup"]["texts"].append(tok.decode(pl, skip_special_tokens=True))
        if llm is not None:
            llm.reset()
            t = time.perf_counter()
            out = llm.create_completion(prompt=ids, max_tokens=args.new, temperature=0.0, top_k=1, repeat_penalty=1.0)
            r = rows["llama_cpp"]
            r["time"].append(time.perf_counter() - t)
            r["tokens"].append(out["usage"]["completion_tokens"])
            r["texts"].append(out["choices"][0]["text"])
        # LASER's own forward (same linears and attention) with no drafts: one token per step
        t = time.perf_counter()
        out = laser.generate(model, ids, max_new_tokens=args.new, draft=laser.DraftConfig(budget=0, prompt_weight=0),
                             acceptance=None, **loops)
        r = rows["laser_no_drafts"]
        r["texts"].append(tok.decode(out.sequences[0, len(ids):].tolist(), skip_special_tokens=True))
        r["tokens"].append(out.stats.new_tokens); r["time"].append(time.perf_counter() - t); r["per_step"].append(1.0)
        r["stats"].append(out.stats)
        for mode, name, rule in runs:
            # each method starts from the same warmed pool: no online update across eval prompts
            am = name == "_am"
            t = time.perf_counter()
            out = laser.generate(model, ids, pool=pools[mode], max_new_tokens=args.new, mode=mode,
                                 draft=am_cfg if am else cfg, update_pool=False,
                                 acceptance=models[mode] if am else None, relaxed_rule=rule, **loops)
            dt = time.perf_counter() - t
            got = out.sequences[0, len(ids):].tolist()
            if mode == "strict" and got != ref:
                mismatches += 1
            r = rows[f"laser_{mode}{name}"]
            r["tokens"].append(len(got)); r["time"].append(dt); r["per_step"].append(out.stats.mean_accepted)
            r["stats"].append(out.stats)
            r["texts"].append(tok.decode(got, skip_special_tokens=True))

    g = rows["hf_greedy"]
    g_tps = sum(g["tokens"]) / sum(g["time"])
    pl_tps = sum(rows["hf_prompt_lookup"]["tokens"]) / sum(rows["hf_prompt_lookup"]["time"])
    print(f"\n{len(eval_users)} prompts x {args.new} new tokens, {args.model or 'SmolLM2-135M'} fp32 on {args.device}, "
          f"loop control {loops}")
    print(f"{'method':20s} {'tok/s':>8s} {'x greedy':>9s} {'median x':>9s} {'x PLD':>7s} {'tok/step':>9s} {'tokens':>7s} "
          f"{'loops':>6s} {'dist-4':>7s}")
    for name, r in rows.items():
        tps = sum(r["tokens"]) / sum(r["time"])
        per = np.median([(gt / gn) / (t / n) for t, n, gt, gn in zip(r["time"], r["tokens"], g["time"], g["tokens"])])
        step = f"{np.mean(r['per_step']):9.2f}" if r["per_step"] else f"{'-':>9s}"
        q = quality(r["texts"])
        print(f"{name:20s} {tps:8.1f} {tps / g_tps:9.2f} {per:9.2f} {tps / pl_tps:7.2f} {step} {np.mean(r['tokens']):7.1f} "
              f"{100 * q.loop_share:5.0f}% {q.distinct[4]:7.3f}")
    if "llama_cpp" in rows:
        lc = sum(rows["llama_cpp"]["tokens"]) / sum(rows["llama_cpp"]["time"])
        print("x llama.cpp greedy: " + ", ".join(f"{m} {sum(rows[m]['tokens']) / sum(rows[m]['time']) / lc:.2f}"
                                                for m in methods[2:]))

    def decode_tps(r):  # tokens per second of the decode steps: the run less its prefills
        return sum(r["tokens"]) / (sum(r["time"]) - sum(s.time_prefill for s in r["stats"]))

    nd = rows["laser_no_drafts"]
    nd_tps = sum(nd["tokens"]) / sum(nd["time"])
    for name in methods[3:]:
        r = rows[name]
        print(f"speculation alone ({name}): {sum(r['tokens']) / sum(r['time']) / nd_tps:.2f}x LASER with no drafts; "
              f"decode steps alone (prefills excluded) {decode_tps(r) / decode_tps(nd):.2f}x")
    print("per step, ms (prefill: per prompt): draft / verify / accept / cache, nodes; prefill")
    for name in methods[2:]:
        st = rows[name]["stats"]
        steps = sum(s.steps for s in st)
        each = [1e3 * sum(getattr(s, f"time_{k}") for s in st) / steps for k in ("draft", "verify", "accept", "cache")]
        nodes = sum(sum(s.tree_sizes) for s in st) / steps
        prefill = 1e3 * sum(s.time_prefill for s in st) / len(st)
        print(f"  {name:18s} {' / '.join(f'{x:.1f}' for x in each)}, {nodes:.1f} nodes; {prefill:.0f}")
    print(f"strict outputs differing from HF greedy (same loop control): {mismatches}/{len(eval_users) * (1 + bool(models))}")


if __name__ == "__main__":
    main()
