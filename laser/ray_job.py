"""The knowledge job on Ray: one actor per model replica, one pool group at a time.

The unit of work is a pool group (the router's output). A group's ids go to one worker in
job order; its pool changes only with its own texts, at the job's global block boundaries
(laser.job), so a group decoded alone drafts exactly what it drafts in a single-process run:
with --batch-size 1 the records equal a single-process run's (timing aside); with larger
batches a row's batch mates are its own group's ids, so strict texts agree and relaxed
texts may differ by float rounding.

Files, for `--out OUT`:
  OUT.shards/NNN-<group>.jsonl   one group's records (appended, fsynced per record, as OUT)
  OUT.shards/NNN-<group>.pools/  its pool snapshots; .lock: the flock of the worker on it
  OUT                            the merge (JSONL, or Parquet with --format parquet), in job
                                 order, written once every group is done (temp file + rename)
Faults: a worker killed at any moment is restarted by Ray (max_restarts) and its group's
task retried (max_task_retries); the group resumes from its shard. A killed driver resumes
on rerun: finished shards are skipped, others resume, the merge is redone.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from pathlib import Path

from laser.job import JobConfig, JobError, Plan, Progress, calibrate_for, job_cost, make_plan, read_output, run_shard

RETRIES = 8  # worker restarts (and retries of the task it held) before the job gives up


def _shard_files(shards: Path, plan: Plan) -> dict[str, tuple[Path, list[str]]]:
    """group -> (shard file, its ids in job order); file names are stable for a job."""
    ids: dict[str, list[str]] = {}
    for k in plan.all_keys:
        ids.setdefault(plan.group(k), []).append(k)
    out = {}
    for n, group in enumerate(sorted(ids)):
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", group)[:60]
        out[group] = (shards / f"{n:03d}-{safe}.jsonl", ids[group])
    return out


class Worker:
    """A Ray actor: one model replica; decodes whole groups into their shards."""

    def __init__(self, cfg: JobConfig, threads: int):
        import torch

        import laser

        torch.set_num_threads(threads)
        self.plan = make_plan(cfg)
        self.model, self.tok = laser.load_model(cfg.model)

    def pid(self) -> int:
        return os.getpid()

    def calibrate(self):
        return calibrate_for(self.plan, self.model, self.tok)

    def run_group(self, group: str, shard: str, cost: list[float]) -> dict:
        import numpy as np

        path = Path(shard)
        keys = [k for k in self.plan.all_keys if self.plan.group(k) == group]
        lock = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.time() + 120  # a killed predecessor's lock goes with its process
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    if time.time() > deadline:
                        raise JobError(f"{path}: another worker holds this shard") from None
                    time.sleep(0.2)
            os.ftruncate(lock, 0)
            os.pwrite(lock, f"{os.getpid()}\n".encode(), 0)
            stats = run_shard(self.plan, self.model, self.tok, np.asarray(cost), keys, path,
                              path.with_name(path.name[:-6] + ".pools"))
        finally:
            os.close(lock)
        return {"group": group, **{k: stats[k] for k in ("written", "tokens", "steps", "mismatched")}}


class _Tail:
    """Reads a shard file's new complete lines as they are appended (driver progress)."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


def _merge(out: Path, plan: Plan, shards: dict, fmt: str) -> int:
    """Every shard's records in job order into OUT (temp file + rename); each id exactly once."""
    by_id: dict[str, dict] = {}
    for group, (path, keys) in shards.items():
        for key, rec in read_output(path, plan, set(keys)).items():
            by_id[key] = rec
    missing = [k for k in plan.keys if k not in by_id]
    if missing:
        raise JobError(f"{out}: {len(missing)} ids have no record after every group finished (first: {missing[0]!r})")
    recs = [by_id[k] for k in plan.keys]
    tmp = out.with_name(out.name + ".merge.tmp")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"id": [r["id"] for r in recs], "group": [r["group"] for r in recs],
                          "text": [r["text"] for r in recs],
                          "tokens": pa.array([r["tokens"] for r in recs], type=pa.list_(pa.int32())),
                          "steps": pa.array([r["steps"] for r in recs], type=pa.int32()),
                          "time": pa.array([r["time"] for r in recs], type=pa.float64())})
        pq.write_table(table, tmp)
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, out)
    return len(recs)


def _check_address(address: str) -> None:
    """A reachable host:port (or ray://host:port), or 'auto'; Ray itself waits minutes on a bad one."""
    import socket

    if address == "auto":
        return
    hostport = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise JobError(f"--ray-address {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise JobError(f"--ray-address {address}: no Ray cluster reachable there ({e.strerror or e})") from None


def _start_ray(address: str | None, workers: int, threads: int):
    import ray

    if address:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
            raise JobError(f"--ray-address {address}: cannot connect to a Ray cluster ({str(e).splitlines()[0][:160]})") from None
    else:  # a local instance with this machine's cores (at least one slot per worker thread)
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, workers * threads), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    return ray


def run_ray(cfg: JobConfig, out: Path, progress: bool, workers: int, address: str | None = None,
            threads: int = 1, fmt: str = "jsonl") -> dict:
    """laser generate --workers N: see the module docstring. Called under OUT's lock."""
    if address:
        _check_address(address)  # before anything is written
    plan = make_plan(cfg)
    shards_dir = out.with_name(out.name + ".shards")
    merged = out.exists() and out.stat().st_size > 0
    if merged and not shards_dir.exists():
        raise JobError(f"{out} holds records of a single-process run; continue it without --workers, or use another --out")
    shards = _shard_files(shards_dir, plan)
    done: dict[str, dict] = {}
    for group, (path, keys) in shards.items():
        done.update(read_output(path, plan, set(keys)) if path.exists() else {})
    shards_dir.mkdir(exist_ok=True)
    cost = None
    manifest = out.with_name(out.name + ".manifest.json")
    if manifest.exists() or done or cfg.cost:
        cost = job_cost(plan, out, bool(done), None)  # every setting checked before Ray starts
    in_run = set(plan.keys)
    todo = [g for g, (p, keys) in shards.items() if any(k in in_run and k not in done for k in keys)]
    todo.sort(key=lambda g: -len(shards[g][1]))  # largest groups first: the tail is short
    results, elapsed = [], 0.0
    if todo or cost is None:
        results, elapsed = _execute(plan, out, shards, todo, done, cost, progress, workers, address, threads)
    t_merge = time.perf_counter()
    n = _merge(out, plan, shards, fmt)
    t_merge = time.perf_counter() - t_merge
    driver_cpu = sum(r.pop("driver_cpu_s") for r in results if "driver_cpu_s" in r)
    results = [r for r in results if r]
    written = sum(r["written"] for r in results)
    tokens, steps = sum(r["tokens"] for r in results), sum(r["steps"] for r in results)
    return {"written": written, "skipped": sum(k in done for k in plan.keys), "tokens": tokens,
            "tokens_per_s": tokens / elapsed if written else 0.0, "mean_accepted": tokens / steps if steps else 0.0,
            "pools": sum(any(k in in_run for k in keys) for _, keys in shards.values()), "mismatched": sum(r["mismatched"] for r in results), "merged": n,
            "driver_s": elapsed, "driver_cpu_s": driver_cpu, "merge_s": t_merge}


def _execute(plan, out, shards, todo, done, cost, progress, workers, address, threads):
    """Start Ray, hand the groups in `todo` to `workers` actors as they free up, show progress."""
    ray = _start_ray(address, workers, threads)
    try:
        actor = ray.remote(num_cpus=threads, max_restarts=RETRIES, max_task_retries=RETRIES)(Worker)
        pool = [actor.remote(plan.cfg, threads) for _ in range(workers)]
        ray.get([a.pid.remote() for a in pool])  # every replica loaded (errors surface here)
        if cost is None:
            cost = job_cost(plan, out, False, lambda: ray.get(pool[0].calibrate.remote()))
        bar = Progress(len(plan.keys), sum(k in done for k in plan.keys), progress)
        tails = {g: _Tail(shards[g][0]) for g in todo}
        for t in tails.values():
            t.new()  # skip what earlier runs wrote
        running, free, results = {}, list(pool), []
        todo = list(todo)
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        try:
            while todo or running:
                while todo and free:
                    g, a = todo.pop(0), free.pop(0)
                    running[a.run_group.remote(g, str(shards[g][0]), [float(c) for c in cost])] = (g, a)
                ready, _ = ray.wait(list(running), timeout=0.5)
                for t in tails.values():
                    for rec in t.new():
                        bar.add(rec)
                for ref in ready:
                    g, a = running.pop(ref)
                    try:
                        results.append(ray.get(ref))
                    except ray.exceptions.RayError as e:
                        raise JobError(f"group {g!r} failed after {RETRIES} worker restarts: {str(e).splitlines()[0][:200]}") from None
                    free.append(a)
        finally:
            bar.close()
        results.append({"driver_cpu_s": time.process_time() - cpu0})  # the driver's own work (progress, scheduling)
        return results, time.perf_counter() - t0
    finally:
        ray.shutdown()
