"""The Ray job's merge at scale: N synthetic records (110 tokens, a 600-character text, as the
job's users) in 200 group shards merged into job order, by laser.ray_job's streamed merge and,
as the baseline, by parsing every record into memory first (the merge before 2026-12-07).
Each in its own process, so each reports its own peak RSS; the two outputs are compared byte
for byte.

    python benchmarks/bench_merge.py --records 200000
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

GROUPS = 200


def _plan(n: int):
    """What the merge reads of a Plan: the ids in job order, their groups, the target."""
    keys = [str(i) for i in range(1, n + 1)]
    group = lambda k: f"g{int(k) % GROUPS:03d}"  # noqa: E731
    return SimpleNamespace(keys=keys, all_keys=keys, group=group, cfg=SimpleNamespace(target="users"))


def _shards(root: Path, plan) -> dict:
    shards: dict = {}
    for k in plan.keys:
        g = plan.group(k)
        shards.setdefault(g, (root / f"{g}.jsonl", []))[1].append(k)
    return shards


def make(root: Path, n: int) -> None:
    import numpy as np

    plan = _plan(n)
    rng = np.random.default_rng(0)
    files = {g: open(p, "w", encoding="utf-8") for g, (p, _) in _shards(root, plan).items()}
    for k in plan.keys:
        rec = {"id": k, "group": plan.group(k), "text": f"Amélie – user {k} " * 30,
               "tokens": rng.integers(0, 49152, 110).tolist(), "steps": 40, "time": 1.2345}
        files[plan.group(k)].write(json.dumps(rec, ensure_ascii=False) + "\n")
    for f in files.values():
        f.close()


def merge(root: Path, n: int, how: str, out: Path) -> None:
    from laser import ray_job
    from laser.job import read_records

    plan = _plan(n)
    shards = _shards(root, plan)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if how == "streamed":
        ray_job._merge(out, plan, shards, "jsonl")
    else:  # every record parsed into memory, then written in job order
        by_id = {rec["id"]: rec for path, _ in shards.values() for rec in read_records(path)}
        with open(out, "w", encoding="utf-8") as f:
            for k in plan.keys:
                f.write(json.dumps(by_id[k], ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    print(json.dumps({"how": how, "seconds": dt, "rss_growth_mib": grew}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--_run", nargs=3, help=argparse.SUPPRESS)  # internal: root, how, out
    args = ap.parse_args()
    if args._run:
        root, how, out = args._run
        return merge(Path(root), args.records, how, Path(out))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make(root, args.records)
        size = sum(p.stat().st_size for p in root.glob("*.jsonl")) / 2**20
        rows = {"parsed": [], "streamed": []}
        for _ in range(args.rounds):
            for how in rows:
                res = subprocess.run([sys.executable, __file__, "--records", str(args.records), "--_run", tmp, how,
                                      str(root / f"{how}.out")], capture_output=True, text=True, check=True)
                rows[how].append(json.loads(res.stdout.strip().splitlines()[-1]))
        same = filecmp.cmp(root / "parsed.out", root / "streamed.out", shallow=False)
    print(f"{args.records} records in {GROUPS} shards ({size:.0f} MiB of JSONL); outputs identical: {same}")
    print("| merge | seconds (median) | peak RSS growth, MiB (median) | per record, bytes |")
    print("| --- | --- | --- | --- |")
    for how, rs in rows.items():
        sec = sorted(r["seconds"] for r in rs)[len(rs) // 2]
        mib = sorted(r["rss_growth_mib"] for r in rs)[len(rs) // 2]
        print(f"| {how} | {sec:.1f} | {mib:.0f} | {mib * 2**20 / args.records:.0f} |")


if __name__ == "__main__":
    main()
