"""Relaxed rules against strict on the job's own work: tokens per step, speed and text quality.

    python benchmarks/relaxed_rules.py [--limit 64] [--targets users,items] [--model M]
        [--loops 0:1.0,10:1.0] [--rules paper,fresh] [--batch-size 8] [--out-dir /tmp/rules]

For each target and loop-control setting (`N:R`: --no-repeat-ngram N, --repetition-penalty R),
runs `laser generate` on the first --limit ids (the job's routed pools, blocks and batching,
history until the CTR training end, one cost curve for every run: benchmarks/knowledge/
cost-b8.json) in strict mode and in relaxed mode under each rule (k = 2, p = 0.1), one after
the other. Prints per run: tokens per row-step, draft nodes per step, tokens/s, and the text
quality of its records (loop share, mean distinct 1..4-gram shares, mean words).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from laser.job import JobConfig, run_job

HERE = Path(__file__).parent
HISTORY_UNTIL = 889237269  # the end of `laser ctr`'s training period (benchmarks/knowledge)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--targets", default="users,items")
    ap.add_argument("--model", help="default: SmolLM2-135M-Instruct")
    ap.add_argument("--loops", default=f"{JobConfig.no_repeat_ngram}:{JobConfig.repetition_penalty}",
                    help="comma-separated N:R settings (default: the job's; scope: the job's)")
    ap.add_argument("--rules", default="paper,fresh")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--new", type=int, default=160)
    ap.add_argument("--cost", default=str(HERE / "knowledge" / "cost-b8.json"))
    ap.add_argument("--out-dir", default="/tmp/laser-rules")
    args = ap.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    print("| target | loop control | mode | tokens/step | nodes/step | tok/s | loops | distinct-1/2/3/4 | words |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for target in args.targets.split(","):
        for loops in args.loops.split(","):
            n, _, r = loops.partition(":")
            runs = [("strict", "fresh")] + [("relaxed", rule) for rule in args.rules.split(",")]
            for mode, rule in runs:
                name = f"{target}-{loops.replace(':', '_')}-{mode}" + (f"-{rule}" if mode == "relaxed" else "")
                out = out_dir / f"{name}.jsonl"
                for old in out_dir.glob(f"{name}.jsonl*"):  # a fresh run each time
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
                cfg = JobConfig(dataset="ml-100k", target=target, out=str(out), limit=args.limit, mode=mode,
                                model=args.model, max_new_tokens=args.new, batch_size=args.batch_size, cost=args.cost,
                                history_until=HISTORY_UNTIL, no_repeat_ngram=int(n), repetition_penalty=float(r),
                                relaxed_rule=rule)
                s = run_job(cfg, progress=False)
                q = s["quality"]
                label = "strict" if mode == "strict" else f"relaxed ({rule})"
                d = "/".join(f"{q.distinct[k]:.3f}" for k in (1, 2, 3, 4))
                print(f"| {target} | {loops} | {label} | {s['mean_accepted']:.2f} | {s['nodes_per_step']:.1f} | "
                      f"{s['tokens_per_s']:.1f} | {100 * q.loop_share:.1f}% | {d} | {q.mean_words:.0f} |", flush=True)
                rows.append({"target": target, "loops": loops, "mode": mode, "rule": rule,
                             "tokens_per_step": s["mean_accepted"], "nodes_per_step": s["nodes_per_step"],
                             "tokens_per_s": s["tokens_per_s"], **q.summary()})
    (out_dir / "rules.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
