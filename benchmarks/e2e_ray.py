"""The ML-100K user job on Ray: 1 worker x 2 threads against 2 workers x 1 thread, side by side.

    python benchmarks/e2e_ray.py [--users 32] [--new 64] [--mode strict] [--shared]

Each configuration writes the same records (the first `--users` users, routed pools, one
fixed cost curve, batch size 1) into a fresh folder; a single process (no Ray, 2 threads)
is the baseline. Reports wall time from the command's start (Ray, actors and model loading
included), the decode window (from every replica loaded to the last record; the single
process: its decode loop), records/s and tokens/s over that window, the driver's CPU time per
record (its progress and scheduling loop) and the merge time. The CPU routes (laser/cpu.py)
are measured before the first configuration: a machine measures them once per thread count
(21 s at 2 threads, 32 s at 1 on the Intel Xeon VM), which would otherwise fall into the first
window that uses them. --shared: the job's best drafting (`--acceptance --global-pool
--pool-depth 32 --max-depth 30 --max-match 16`), which on Ray runs block by block with each
block's ids shared out to the workers (laser.ray_job.run_lockstep).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from laser.job import JobConfig, read_records, run_job, strip_timing


def warm_routes(thread_counts) -> None:
    """Measure this machine's CPU routes (laser/cpu.py) for the default model at each thread
    count before any timing: a fresh machine measures once, and no configuration's window may
    hold it."""
    import torch

    from laser.engine import Engine
    from laser.model import load_model

    model, _ = load_model()
    engine = Engine(model)
    for threads in thread_counts:
        torch.set_num_threads(threads)
        engine.routes()
    engine.close()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--mode", default="strict")
    ap.add_argument("--shared", action="store_true", help="--acceptance --global-pool, deep pools (block-synchronised on Ray)")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="e2e-ray-"))
    cost = root / "cost.json"  # a fixed curve: every configuration draws the same trees
    cost.write_text(json.dumps([0.066, 0.075, 0.08, 0.085, 0.09, 0.095, 0.1, 0.105, 0.11, 0.115, 0.12]))
    warm_routes((2, 1))
    rows, outputs = [], {}
    deep = dict(acceptance=True, global_pool=True, pool_depth=32, max_depth=30, max_match=16) if args.shared else {}
    for name, workers, threads in (("1 process x 2 threads (no Ray)", None, 2), ("1 worker x 2 threads", 1, 2),
                                   ("2 workers x 1 thread", 2, 1)):
        out = root / f"{name.split()[0]}-{workers}-{threads}.jsonl"
        cfg = JobConfig(dataset="ml-100k", target="users", limit=args.users, out=str(out), pool="routed",
                        mode=args.mode, max_new_tokens=args.new, cost=str(cost), **deep)
        import torch

        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        s = run_job(cfg, progress=False, workers=workers, threads=threads)
        wall = time.perf_counter() - t0
        window = s["driver_s"] if "driver_s" in s else s["tokens"] / s["tokens_per_s"]  # decode loop only
        outputs[name] = sorted((r["id"], r["text"]) for r in map(strip_timing, read_records(out)))
        rows.append({"name": name, "wall": wall, "window": window, "records": s["written"], "tokens": s["tokens"],
                     "driver_ms": 1e3 * s.get("driver_cpu_s", 0.0) / max(s["written"], 1),
                     "merge_s": s.get("merge_s", 0.0)})
        print(f"{name}: {s['written']} records in {wall:.1f} s ({window:.1f} s decoding)", flush=True)
    same = len({json.dumps(v) for v in outputs.values()}) == 1
    print(f"\n{args.users} ML-100K users x <= {args.new} tokens, {args.mode}{', shared drafting' if args.shared else ''}, "
          "SmolLM2-135M fp32, CPU; "
          f"identical texts in all configurations: {same}")
    print(f"{'configuration':32s} {'wall s':>7s} {'decode s':>9s} {'rec/s':>6s} {'tok/s':>6s} {'x 1 worker':>10s} "
          f"{'driver ms/rec':>13s} {'merge s':>7s}")
    base = next(r for r in rows if r["name"].startswith("1 worker"))
    for r in rows:
        print(f"{r['name']:32s} {r['wall']:7.1f} {r['window']:9.1f} {r['records'] / r['window']:6.2f} "
              f"{r['tokens'] / r['window']:6.1f} {(r['tokens'] / r['window']) / (base['tokens'] / base['window']):10.2f} "
              f"{r['driver_ms']:13.2f} {r['merge_s']:7.3f}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
