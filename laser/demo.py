"""`make demo`: the knowledge job on a small ML-100K slice with the default model.

Runs `laser generate` (routed pools, strict mode, the job's loop control) for the first users
into demo-out/knowledge.jsonl, then times HF greedy (with HF's processors of the same loop
control) on the last users' prompts and prints the speedup over greedy on exactly those
records (and whether the texts are identical).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

import laser
from laser.data import chat_ids, load_dataset, user_prompt
from laser.job import JobConfig, run_job
from laser.repeats import hf_processors

USERS, COMPARE, NEW = 10, 3, 128


def main():
    out_dir = Path("demo-out")
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    out = out_dir / "knowledge.jsonl"
    print(f"laser generate --dataset ml-100k --target users --limit {USERS} --pool routed --out {out}", flush=True)
    cfg = JobConfig(dataset="ml-100k", target="users", limit=USERS, out=str(out), pool="routed", max_new_tokens=NEW)
    summary = run_job(cfg)
    print(f"wrote {summary['written']} records, {summary['tokens_per_s']:.1f} tok/s, "
          f"{summary['mean_accepted']:.2f} tokens/step at {summary['nodes_per_step']:.1f} draft nodes, "
          f"{summary['pools']} pools; text quality: {summary['quality'].line()}")

    records = [json.loads(line) for line in out.read_text().splitlines()][-COMPARE:]
    model, tok = laser.load_model()
    ds = load_dataset("ml-100k")
    t_greedy = t_laser = 0.0
    same = 0
    for rec in records:
        ids = chat_ids(tok, user_prompt(ds, rec["id"]))
        x = torch.tensor([ids])
        t = time.perf_counter()
        loops = hf_processors(cfg.no_repeat_ngram, cfg.repetition_penalty, cfg.loop_scope, len(ids))
        ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                             logits_processor=loops)[0, len(ids):]
        t_greedy += time.perf_counter() - t
        t_laser += rec["time"]
        same += ref.tolist() == rec["tokens"]
        print(f"\nuser {rec['id']} ({rec['group']}), {rec['steps']} steps for {len(rec['tokens'])} tokens:\n  "
              + rec["text"][:240].replace("\n", " "))
    print(f"\nlast {COMPARE} users: LASER strict {t_greedy / t_laser:.2f}x faster than HF greedy; "
          f"identical texts: {same}/{COMPARE}")


if __name__ == "__main__":
    main()
