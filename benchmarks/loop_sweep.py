"""Loop control against text quality: strict (== greedy) texts under each setting, one run.

    python benchmarks/loop_sweep.py [--every 24] [--new 160] [--model M] [--settings none,rp1.1,nr8,...]

Takes every `--every`-th ML-100K user and item (job order) and writes each one's strict text
under each loop-control setting (`none`, `rpR`: repetition_penalty R, `nrN`:
no_repeat_ngram_size N, joined with `+`), with the job's prompts (history until the CTR
training end, as benchmarks/knowledge). Strict texts are greedy decoding's with the same
processors whatever the drafting, so this measures the setting alone. Prints per setting and
target: loop share, mean distinct 1..4-gram shares, mean words and longest repeat, tokens/s
(drafts from each text's own prompt and output only, B = 8), and how faithfully the texts
copy from the prompt, which loop control can forbid (HF's processors count the prompt's
tokens too): for items the share of texts that name the item's title and year as the
prompt gives them, and of every "Title (year)" a text writes, the share with another year
than the item's (a repeat that loop control made the model change); for users the share
that name at least one title of their history.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import laser
from laser.batch import Request, generate_batch
from laser.data import chat_ids
from laser.job import JobConfig, make_plan
from laser.quality import quality

HISTORY_UNTIL = 889237269  # the end of `laser ctr`'s training period (benchmarks/knowledge)


def parse(setting: str) -> dict:
    kw = {}
    for part in setting.split("+"):
        if part == "none":
            continue
        if part.startswith("rp"):
            kw["repetition_penalty"] = float(part[2:])
        elif part.startswith("nr"):
            kw["no_repeat_ngram_size"] = int(part[2:])
        else:
            raise SystemExit(f"--settings: unknown setting {part!r} (none, rpR, nrN, joined with +)")
    return kw


def prompts_of(tok, target: str, every: int, offset: int) -> tuple[dict, dict, dict]:
    """{id: prompt ids}, {id: [strings a faithful text names]} and, for items, {id: (title, year)}
    of every `every`-th id."""
    plan = make_plan(JobConfig(dataset="ml-100k", target=target, history_until=HISTORY_UNTIL))
    keys = plan.all_keys[offset::every]
    ds = plan.ds
    if target == "items":
        names = {k: [f"{ds.items[k]['title']} ({ds.items[k]['year']})"] for k in keys}
        facts = {k: (ds.items[k]["title"], ds.items[k]["year"]) for k in keys}
    else:
        names = {k: [ds.items[i]["title"] for i, _, _ in ds.history(k)[-10:]] for k in keys}
        facts = {}
    return {k: chat_ids(tok, plan.template.render(ds, target, k)) for k in keys}, names, facts


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--every", type=int, default=24)
    ap.add_argument("--offset", type=int, default=0, help="start at this id (job order)")
    ap.add_argument("--new", type=int, default=160)
    ap.add_argument("--model", help="default: SmolLM2-135M-Instruct")
    ap.add_argument("--settings", default="none,rp1.1,rp1.2,nr6,nr8,nr10")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--scope", default="all", help="loop_scope: all (the prompt counts, as HF's) or output")
    ap.add_argument("--json", help="write the rows (with every text) here")
    args = ap.parse_args(argv)
    model, tok = laser.load_model(args.model)
    rows = []
    print("| setting | target | texts | loops | distinct-1/2/3/4 | words | longest repeat | names from the prompt | "
          "wrong years | tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for target in ("users", "items"):
        prompts, names, facts = prompts_of(tok, target, args.every, args.offset)
        for setting in args.settings.split(","):
            kw = parse(setting)
            reqs = [Request(ids, None, k) for k, ids in prompts.items()]
            t0 = time.perf_counter()
            texts, tokens = {}, 0
            for r in generate_batch(model, reqs, batch_size=args.batch_size, max_new_tokens=args.new,
                                    loop_scope=args.scope, **kw):
                texts[r.tag] = tok.decode(r.tokens.tolist(), skip_special_tokens=True)
                tokens += r.tokens.size
            dt = time.perf_counter() - t0
            q = quality([texts[k] for k in prompts])
            named = sum(any(n in texts[k] for n in names[k]) for k in prompts) / len(prompts)
            years = [int(m.group(1)) != year for k, (title, year) in facts.items()
                     for m in re.finditer(re.escape(title) + r"\s*\((\d{4})\)", texts[k])]
            wrong = f"{sum(years)}/{len(years)}" if target == "items" else "-"
            row = {"setting": setting, "target": target, **q.summary(), "named": named, "tok_s": tokens / dt,
                   "wrong_years": wrong, "texts": texts}
            rows.append(row)
            d = "/".join(f"{q.distinct[n]:.3f}" for n in (1, 2, 3, 4))
            print(f"| {setting} | {target} | {q.n} | {100 * q.loop_share:.1f}% | {d} | {q.mean_words:.0f} | "
                  f"{q.mean_longest_repeat:.1f} | {100 * named:.0f}% | {wrong} | {tokens / dt:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
