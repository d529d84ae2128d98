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

With --acceptance or --global-pool every group drafts from state that all groups' texts
change (the job's AcceptanceModel, the pool of every text), so groups cannot run apart:
run_lockstep() runs the single-process job (laser.job.run_shard: OUT, OUT.pools, the
manifest, as without --workers) on the driver, and farms each block's ids out to the
workers in pieces (one id at --batch-size 1, else PIECE_BATCHES batches), every worker
drafting from the block's frozen pools, which it loads from the snapshot OUT.pools (a
filesystem the workers share, as the shards above need). The driver writes the records in
piece order, adds the pieces' observations to the model, and saves the next snapshot.
Records depend on the pieces, never on --workers: at batch size 1 they equal a
single-process run's, above it strict texts agree and relaxed ones may differ by float
rounding (the manifest's `pieces` then keeps a run without --workers from continuing it).
A killed worker's piece is retried on its restarted actor; a killed driver resumes on rerun
as the single-process job does.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
import time
from collections import OrderedDict
from pathlib import Path

from laser.job import (JobConfig, JobError, Plan, Progress, Records, calibrate_for, decode_block, job_cost, job_draft,
                       make_plan, read_output, run_shard, step_means)

RETRIES = 8  # worker restarts (and retries of the task it held) before the job gives up
MERGE_OPEN = 128  # shard files the merge keeps open at once
MERGE_BATCH = 65536  # records per Parquet row group written by the merge


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

    def tokenizer(self):
        return self.tok

    def decode_piece(self, keys: list[str], blocks: int, pool_dir: str, cost: list[float]):
        """run_lockstep: decode `keys` against the pools after `blocks` finished blocks (loaded from
        the snapshot in pool_dir when this worker holds other ones). Returns the records as
        (id, tokens, steps, nodes, seconds) in finish order and the observations (hits, tries) or None."""
        import numpy as np

        import laser
        from laser.groups import PoolSet

        cfg = self.plan.cfg
        pools = getattr(self, "pools", None)
        if pools is None or pools.blocks != blocks:
            pools = self.pools = PoolSet.load(Path(pool_dir), cfg.pool)
            if pools.blocks != blocks:
                raise JobError(f"{pool_dir}: the snapshot holds {pools.blocks} blocks, the driver {blocks}")
        draft = laser.DraftConfig(budget=cfg.budget, max_depth=cfg.max_depth, cost=np.asarray(cost), **job_draft(cfg))
        learned = laser.AcceptanceModel(pools.acceptance.prior) if pools.acceptance is not None else None
        done = []
        decode_block(self.model, self.tok, self.plan, pools, draft, keys,
                      lambda *rec: done.append(rec), learned)
        return done, None if learned is None else (learned.hits, learned.tries)

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
        return {"group": group, **{k: stats[k] for k in ("written", "tokens", "steps", "nodes", "mismatched")}}


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
    """Every shard's records in job order into OUT (temp file + rename); each id exactly once.
    Streamed: the shards' indexes in memory, each record's line copied as the worker wrote it
    (JSONL), or parsed in batches of MERGE_BATCH (Parquet)."""
    parts = {group: read_output(path, plan, set(keys)) for group, (path, keys) in shards.items()}
    missing = [k for k in plan.keys if k not in parts[plan.group(k)]]
    if missing:
        raise JobError(f"{out}: {len(missing)} ids have no record after every group finished (first: {missing[0]!r})")
    live: OrderedDict[str, Records] = OrderedDict()  # shards with an open file, least recently read first

    def lines():
        for k in plan.keys:
            group = plan.group(k)
            live[group] = parts[group]
            live.move_to_end(group)
            if len(live) > MERGE_OPEN:
                live.popitem(last=False)[1].close()
            yield parts[group].line(k)

    tmp = out.with_name(out.name + ".merge.tmp")
    try:
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema([("id", pa.string()), ("group", pa.string()), ("text", pa.string()),
                                ("tokens", pa.list_(pa.int32())), ("steps", pa.int32()), ("time", pa.float64())])
            with pq.ParquetWriter(tmp, schema) as w:
                batch = []
                for line in lines():
                    batch.append(json.loads(line))
                    if len(batch) == MERGE_BATCH:
                        w.write_table(pa.Table.from_pylist(batch, schema=schema))
                        batch = []
                if batch:
                    w.write_table(pa.Table.from_pylist(batch, schema=schema))
        else:
            with open(tmp, "wb") as f:
                for line in lines():
                    f.write(line)
                f.flush()
                os.fsync(f.fileno())
    finally:
        for part in parts.values():
            part.close()
    os.replace(tmp, out)
    return len(plan.keys)


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


def _start_actors(ray, plan: Plan, out: Path, cost, workers: int, threads: int):
    """`workers` restartable Worker actors, each with the model loaded, and the job's cost curve
    (calibrated on the first actor when `cost` is None). Returns (actors, cost)."""
    actor = ray.remote(num_cpus=threads, max_restarts=RETRIES, max_task_retries=RETRIES)(Worker)
    actors = [actor.remote(plan.cfg, threads) for _ in range(workers)]
    ray.get([a.pid.remote() for a in actors])  # every replica loaded (errors surface here)
    if cost is None:
        cost = job_cost(plan, out, False, lambda: ray.get(actors[0].calibrate.remote()))
    return actors, cost


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
    done: set[str] = set()
    for group, (path, keys) in shards.items():
        done.update(read_output(path, plan, set(keys)))
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
    totals = {k: sum(r[k] for r in results) for k in ("tokens", "steps", "nodes")}
    return {"written": written, "skipped": sum(k in done for k in plan.keys), **totals,
            "tokens_per_s": totals["tokens"] / elapsed if written else 0.0, **step_means(totals),
            "pools": sum(any(k in in_run for k in keys) for _, keys in shards.values()), "mismatched": sum(r["mismatched"] for r in results), "merged": n,
            "driver_s": elapsed, "driver_cpu_s": driver_cpu, "merge_s": t_merge}


def _execute(plan, out, shards, todo, done, cost, progress, workers, address, threads):
    """Start Ray, hand the groups in `todo` to `workers` actors as they free up, show progress."""
    ray = _start_ray(address, workers, threads)
    try:
        pool, cost = _start_actors(ray, plan, out, cost, workers, threads)
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


def run_lockstep(cfg: JobConfig, out: Path, progress: bool, workers: int, address: str | None = None,
                 threads: int = 1) -> dict:
    """laser generate --workers N with --acceptance or --global-pool: see the module docstring.
    Called under OUT's lock."""
    if address:
        _check_address(address)  # before anything is written
    plan = make_plan(cfg)
    if out.with_name(out.name + ".shards").exists():
        raise JobError(f"{out}: a group-sharded Ray run's output ({out.name}.shards); use another --out")
    piece = cfg.pieces or 1
    busy = -(-cfg.block // piece)  # a block's pieces are what runs at once
    if busy < workers:
        print(f"laser: warning: --block {cfg.block} is {busy} piece(s) of {piece} ids: at most {busy} of {workers} "
              f"workers busy; use --block {workers * piece} or more", file=sys.stderr)
    by_id = read_output(out, plan)
    cost = None
    if out.with_name(out.name + ".manifest.json").exists() or by_id or cfg.cost:
        cost = job_cost(plan, out, bool(by_id), None)  # every setting checked before Ray starts
    ray = _start_ray(address, workers, threads)
    bar = None
    try:
        actors, cost = _start_actors(ray, plan, out, cost, workers, threads)
        tok = ray.get(actors[0].tokenizer.remote())
        bar = Progress(len(plan.keys), sum(k in by_id for k in plan.keys), progress)
        pool_dir = out.with_name(out.name + ".pools")
        farm = _Farm(ray, actors, str(pool_dir), [float(c) for c in cost], piece)
        t0 = time.perf_counter()
        summary = run_shard(plan, None, tok, cost, plan.all_keys, out, pool_dir, by_id, on_record=bar.add,
                            decode=farm)
        return {**summary, "driver_s": time.perf_counter() - t0}
    finally:
        if bar is not None:
            bar.close()
        ray.shutdown()


class _Farm:
    """run_shard's block decoder on Ray: a block's ids in pieces of `piece`, each piece to the
    next free actor; records written and observations added in piece order."""

    def __init__(self, ray, actors: list, pool_dir: str, cost: list[float], piece: int):
        self.ray, self.actors, self.pool_dir, self.cost, self.piece = ray, actors, pool_dir, cost, piece

    def __call__(self, pools, draft, keys: list[str], write, learned) -> None:
        ray = self.ray
        pieces = [keys[i : i + self.piece] for i in range(0, len(keys), self.piece)]
        free, running, finished, nxt, flushed = list(self.actors), {}, {}, 0, 0
        while flushed < len(pieces):
            while nxt < len(pieces) and free:
                a = free.pop(0)
                running[a.decode_piece.remote(pieces[nxt], pools.blocks, self.pool_dir, self.cost)] = (nxt, a)
                nxt += 1
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                n, a = running.pop(ref)
                try:
                    finished[n] = ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise JobError(f"a piece of block {pools.blocks} failed after {RETRIES} worker restarts: "
                                   f"{str(e).splitlines()[0][:200]}") from None
                free.append(a)
            while flushed in finished:  # in piece order: the file's order does not depend on timing
                done, observed = finished.pop(flushed)
                for rec in done:
                    write(*rec)
                if observed is not None:  # whole counts: exact in any order
                    learned.set_state(learned.hits + observed[0], learned.tries + observed[1])
                flushed += 1
