#!/usr/bin/env bash
# Knowledge for the whole of ML-100K (943 users, 1,682 items), strict and relaxed (k=2, p=0.1),
# with the default model, routed pools and continuous batching at B = 8. Prompts, groups and the
# router see only interactions before 889237269, the end of `laser ctr`'s training period
# (the 80% time quantile of ML-100K), so no validation or test rating enters the knowledge. Each job resumes
# itself: run this again after an interruption (or in the next session) and it goes on.
# A clean checkout holds the records and manifests but no pool snapshots: the first run
# of a job with records rebuilds them (--rebuild-pools), bit-identical to the lost ones.
set -euo pipefail
cd "$(dirname "$0")"
LASER="${LASER:-../../.venv/bin/laser}"
for target in users items; do
  for mode in strict relaxed; do
    out="ml-100k-$target-$mode.jsonl"
    if [ -f "$out.gz" ]; then continue; fi  # finished and packed
    rebuild=()
    if [ -s "$out" ] && [ ! -f "$out.pools/index.json" ]; then rebuild=(--rebuild-pools); fi
    "$LASER" generate --dataset ml-100k --target "$target" --mode "$mode" --top-k 2 --min-prob 0.1 \
      --pool routed --batch-size 8 --cost cost-b8.json --history-until 889237269 --out "$out" "${rebuild[@]}"
    gzip -9 -n -k "$out"  # -n: no name/time in the header, so the .gz is a function of the records
  done
done
