"""`laser report`: the paper's comparisons in one command, on ML-100K users and items.

For each target: texts of `warm` ids (written with LASER strict == greedy) warm the pools;
the next `prompts` ids are timed with HF greedy and with LASER under every pool mode in
strict and relaxed mode, plus a (k, p) sweep on routed pools, every run (HF greedy too) with
the job's default loop control. Writes report.md (a Markdown table: speedup vs greedy, tokens
per step, share of time in retrieval, and the texts' quality: loop share and mean distinct
4-gram share) and PNG plots (speedup, tokens per step, quality) into --out-dir. The drafting
is stated in the report: an acceptance model per configuration, learned from its first text
on, and the calibrated cost cut (`laser generate --acceptance`'s scoring, the report's own
budget and depth), not the job's default drafting by pool shares.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

import laser
from laser.data import chat_ids, item_prompt, load_dataset, user_prompt
from laser.errors import InputError
from laser.groups import MODES, PoolSet, Router, collaborative_groups, default_threshold, group_of
from laser.job import JobConfig
from laser.quality import quality
from laser.repeats import hf_processors

LOOPS = {"no_repeat_ngram_size": JobConfig.no_repeat_ngram, "repetition_penalty": JobConfig.repetition_penalty,
         "loop_scope": JobConfig.loop_scope}
DRAFTING = "an acceptance model per configuration (learned from its first text on), budget 32, depth 10, calibrated cost cut"

SWEEP = [(1, 0.3), (3, 0.05), (5, 0.02)]


def _configs():
    for pool in MODES:
        yield pool, "strict", 2, 0.1
        yield pool, "relaxed", 2, 0.1
    for k, p in SWEEP:
        yield "routed", "relaxed", k, p


def run_report(args) -> list[dict]:
    n_eval, n_warm, new = (10, 16, 160) if args.large else (args.prompts, args.warm, args.new)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if getattr(args, "replay_only", False):
        if not args.replay:
            raise InputError("--replay-only needs --replay CORPUS")
        return replay_section(args.replay, out_dir)
    rows = _comparisons(out_dir, n_eval, n_warm, new)
    if args.replay:
        replay_section(args.replay, out_dir)
    return rows


def replay_section(corpus: str, out_dir: Path, budget: int = 32, n_eval: int = 40) -> list[dict]:
    """Tokens/step against pool size (exact strict replay of a corpus, laser.replay): a table
    appended to report.md and replay.png."""
    from laser.replay import load_corpus, pool_size_curve

    records, prompts, plan = load_corpus(corpus, "ml-100k", plan_target(corpus))
    if len(records) < 8:
        raise InputError(f"{corpus}: {len(records)} records; the replay curve needs at least 8")
    n_eval = min(n_eval, len(records) // 2)
    curve = pool_size_curve(records, prompts, plan, budget, n_eval)
    lines = ["", f"## Drafting vs pool size (exact strict replay of `{corpus}`, budget {budget}, last {n_eval} records)",
             "", "| warm texts | tokens/step | nodes/step | accepted tokens per node |", "| --- | --- | --- | --- |"]
    lines += [f"| {c['warm']} | {c['tokens_per_step']:.2f} | {c['nodes_per_step']:.1f} | {c['accepted_per_node']:.3f} |"
              for c in curve]
    with open(out_dir / "report.md", "a") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([c["warm"] for c in curve], [c["tokens_per_step"] for c in curve], "o-")
    ax.set_xscale("log")
    ax.set_xlabel("texts in the pools before the replayed ones")
    ax.set_ylabel("tokens per verification step (strict)")
    fig.tight_layout()
    fig.savefig(out_dir / "replay.png", dpi=120)
    plt.close(fig)
    return curve


def plan_target(corpus: str) -> str:
    """The target of a corpus, from its manifest (users if it has none)."""
    import json

    man = Path(str(corpus) + ".manifest.json")
    return json.loads(man.read_text()).get("target", "users") if man.exists() else "users"


def _comparisons(out_dir: Path, n_eval: int, n_warm: int, new: int) -> list[dict]:
    torch.manual_seed(0)
    model, tok = laser.load_model()
    ds = load_dataset("ml-100k")
    rows = []
    for target in ("users", "items"):
        keys = sorted(ds.users if target == "users" else ds.items, key=int)
        rng = np.random.default_rng(0)
        keys = [keys[i] for i in rng.permutation(len(keys))[: n_warm + n_eval]]
        warm_keys, eval_keys = keys[:n_warm], keys[n_warm:]
        prompt_of = user_prompt if target == "users" else item_prompt
        prompts = {k: chat_ids(tok, prompt_of(ds, k)) for k in keys}
        cost = laser.calibrate(model, context_len=int(np.mean([len(p) for p in prompts.values()])),
                               sizes=(0, 1, 2, 4, 8, 16, 32), repeats=2)
        draft = laser.DraftConfig(budget=32, max_depth=10, cost=cost)
        warm_texts = {k: laser.generate(model, prompts[k], max_new_tokens=new, draft=draft, **LOOPS).sequences[
            0, len(prompts[k]):].numpy() for k in warm_keys}
        greedy, greedy_texts = 0.0, []
        for k in eval_keys:
            x = torch.tensor([prompts[k]])
            t = time.perf_counter()
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                                 logits_processor=hf_processors(**LOOPS, prompt_len=len(prompts[k])))
            greedy += time.perf_counter() - t
            greedy_texts.append(tok.decode(out[0, len(prompts[k]):], skip_special_tokens=True))
        q = quality(greedy_texts)
        rows.append({"target": target, "pool": "-", "mode": "HF greedy", "k": "-", "p": "-", "speedup": 1.0,
                     "tokens_per_step": 1.0, "retrieval_share": 0.0, "tok_s": 0.0, "loop_share": q.loop_share,
                     "distinct_4": q.distinct[4]})
        collab = collaborative_groups(ds, target, 8)
        router = Router(ds, target, collab, default_threshold(ds, target))
        for pool_mode, mode, k, p in _configs():
            pools = PoolSet(pool_mode, vocab_size=len(tok))
            learned = laser.AcceptanceModel()  # each configuration learns its own, from its first text on
            for key, text in warm_texts.items():
                pool = pools.get(group_of(pool_mode, router, key, collab, ds, target))
                if pool is not None:
                    pool.insert(text)
            wall, steps, tokens, t_draft, t_total, texts = 0.0, [], 0, 0.0, 0.0, []
            for key in eval_keys:
                pool = pools.get(group_of(pool_mode, router, key, collab, ds, target))
                t = time.perf_counter()
                res = laser.generate(model, prompts[key], pool=pool, max_new_tokens=new, mode=mode, top_k=k,
                                     min_prob=p, draft=draft, acceptance=learned, **LOOPS)
                wall += time.perf_counter() - t
                steps.append(res.stats.mean_accepted)
                tokens += res.stats.new_tokens
                t_draft += res.stats.time_draft
                t_total += res.stats.total_time
                texts.append(tok.decode(res.sequences[0, len(prompts[key]):], skip_special_tokens=True))
            q = quality(texts)
            rows.append({"target": target, "pool": pool_mode, "mode": mode, "k": k, "p": p,
                         "speedup": greedy / wall, "tokens_per_step": float(np.mean(steps)),
                         "retrieval_share": t_draft / t_total, "tok_s": tokens / wall, "loop_share": q.loop_share,
                         "distinct_4": q.distinct[4]})
            print(f"{target:5s} {pool_mode:13s} {mode:7s} k={k} p={p:<4}: {greedy / wall:5.2f}x greedy, "
                  f"{np.mean(steps):.2f} tok/step, {q.line()}", flush=True)
    _write(rows, out_dir, n_eval, n_warm, new)
    return rows


def _write(rows, out_dir: Path, n_eval, n_warm, new):
    lines = [f"# LASER report: ML-100K, SmolLM2-135M fp32, {n_eval} users + {n_eval} items x {new} tokens, "
             f"pools warmed with {n_warm} texts per target", "",
             f"Drafting: {DRAFTING}. Loop control (every run, HF greedy included): {LOOPS}. Relaxed rule: "
             f"{laser.AcceptConfig.rule}.", "",
             "| target | pool | mode | k | p | speedup vs greedy | tokens/step | retrieval share | tok/s | loops | "
             "distinct-4 |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['pool']} | {r['mode']} | {r['k']} | {r['p']} | {r['speedup']:.2f}x | "
                     f"{r['tokens_per_step']:.2f} | {100 * r['retrieval_share']:.1f}% | {r['tok_s']:.1f} | "
                     f"{100 * r['loop_share']:.0f}% | {r['distinct_4']:.3f} |")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for metric, label in (("speedup", "speedup vs HF greedy"), ("tokens_per_step", "tokens per verification step"),
                          ("loop_share", "share of texts that loop"), ("distinct_4", "mean distinct 4-gram share")):
        fig, ax = plt.subplots(figsize=(10, 4))
        labels = [f"{r['pool']}\n{r['mode']} k{r['k']} p{r['p']}" for r in rows if r["target"] == "users"]
        x = np.arange(len(labels))
        for i, target in enumerate(("users", "items")):
            vals = [r[metric] for r in rows if r["target"] == target]
            ax.bar(x + (i - 0.5) * 0.4, vals, 0.4, label=target)
        ax.set_xticks(x, labels, fontsize=6)
        ax.set_ylabel(label)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / f"{metric}.png", dpi=120)
        plt.close(fig)
