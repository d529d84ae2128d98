"""The knowledge job on Ray: 2 workers == 1 process, worker and driver kills, bad arguments;
with the acceptance model and a global pool, the block-synchronised job (run_lockstep)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jobhelp import DEEP, LIMIT, index_of, job_args, per_step, pool_bytes, records_of
from laser.cli import main as cli
from laser.job import JobConfig, read_records, run_job

pytestmark = pytest.mark.slow


def _shard_records(out) -> int:
    return sum(len(read_records(p)) for p in Path(str(out) + ".shards").glob("*.jsonl"))


def test_two_workers_give_the_records_of_one_process(peaked_model, reference, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert cli(job_args(peaked_model, out, extra=("--workers", "2"))) == 0
    assert records_of(out) == records_of(reference("relaxed", 1))  # batch 1: every field but time
    assert per_step(capsys.readouterr().out) == per_step(reference.printed[reference("relaxed", 1)])
    strict = tmp_path / "s.jsonl"
    assert cli(job_args(peaked_model, strict, mode="strict", batch=4, extra=("--workers", "2"))) == 0
    got, want = records_of(strict), records_of(reference("strict", 4))  # merged in id order / finish order
    assert sorted((r["id"], r["text"]) for r in got) == sorted((r["id"], r["text"]) for r in want)
    pq = tmp_path / "p.parquet"
    assert cli(job_args(peaked_model, pq, extra=("--workers", "2", "--format", "parquet"))) == 0
    import pyarrow.parquet as papq

    table = papq.read_table(pq).to_pylist()
    assert [{k: v for k, v in r.items() if k != "time"} for r in table] == records_of(reference("relaxed", 1))


def test_shared_drafting_on_two_workers_gives_the_records_model_and_pools_of_one_process(peaked_model, reference,
                                                                                       tmp_path, capsys):
    """--acceptance --global-pool on Ray: the single-process job's files, every record,
    pool byte and model count as one process makes them (batch 1), for any worker count;
    strict at batch 4 the same texts; a run without --workers continues it (batch 1)."""
    for workers in ("2", "3"):
        out = tmp_path / f"deep{workers}.jsonl"
        assert cli(job_args(peaked_model, out, extra=(*DEEP, "--workers", workers))) == 0
        want = reference("relaxed", 1, DEEP)
        assert records_of(out) == records_of(want)
        assert per_step(capsys.readouterr().out) == per_step(reference.printed[want])
        assert pool_bytes(out) == pool_bytes(want) and index_of(out)["acceptance"] == index_of(want)["acceptance"]
        assert not Path(str(out) + ".shards").exists()
    strict = tmp_path / "strict.jsonl"
    assert cli(job_args(peaked_model, strict, mode="strict", batch=4, extra=(*DEEP, "--workers", "2"))) == 0
    got, want = records_of(strict), records_of(reference("strict", 4, DEEP))
    assert sorted((r["id"], r["text"]) for r in got) == sorted((r["id"], r["text"]) for r in want)
    # a block of 4 ids is one piece of 16 at batch 4: one of the 2 workers can be busy
    assert "--block 4 is 1 piece(s) of 16 ids: at most 1 of 2 workers busy; use --block 32" in capsys.readouterr().err
    # batch 4: the pieces decide the batches, so one process must not continue it
    _fails(job_args(peaked_model, strict, mode="strict", batch=4, limit=LIMIT + 4, extra=DEEP), capsys, "per piece", "16")
    _fails(job_args(peaked_model, tmp_path / "p.parquet", extra=(*DEEP, "--workers", "2", "--format", "parquet")),
           capsys, "--format parquet", "JSONL")
    half = tmp_path / "half.jsonl"  # half on Ray, the rest in one process
    assert cli(job_args(peaked_model, half, limit=LIMIT // 2, extra=(*DEEP, "--workers", "2"))) == 0
    assert cli(job_args(peaked_model, half, extra=DEEP)) == 0
    assert records_of(half) == records_of(reference("relaxed", 1, DEEP))


@pytest.mark.parametrize("shared", [False, True])
def test_a_killed_worker_is_restarted_and_its_work_resumes(peaked_model, reference, tmp_path, shared):
    """kill -9 of a worker (its pid from Ray's actor table) mid-job: every id ends up once, as
    one process writes it (shared: --acceptance --global-pool, the block-synchronised job,
    whose restarted worker loads the pools again)."""
    import ray
    from ray._private import state

    out = tmp_path / "k.jsonl"
    limit = LIMIT if shared else LIMIT * 2
    written = (lambda: len(read_records(out))) if shared else (lambda: _shard_records(out))
    killed = {}

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if ray.is_initialized() and (out.exists() if shared else Path(str(out) + ".shards").exists()) and written() >= 2:
                alive = [a for a in state.actors().values() if a["ActorClassName"] == "Worker" and a["State"] == "ALIVE"]
                if alive:
                    os.kill(alive[0]["Pid"], signal.SIGKILL)
                    killed.update(id=alive[0]["ActorID"], at=written())
                    while time.time() < deadline and ray.is_initialized():  # Ray restarts it
                        try:
                            a = state.actors().get(killed["id"], {})
                        except ray.exceptions.RaySystemError:  # the job ended and shut Ray down meanwhile
                            return
                        # counted when Ray starts the restart (the retried task may finish, and
                        # the job with it, before a poll sees the new actor ALIVE)
                        if a.get("NumRestarts", 0) >= 1 and a.get("State") in ("RESTARTING", "ALIVE"):
                            killed["restarted"] = True
                            return
                        time.sleep(0.02)
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    deep = dict(acceptance=True, global_pool=True, pool_depth=16, max_depth=14, max_match=10) if shared else {}
    cfg = JobConfig(dataset="ml-100k", target="users", limit=limit, out=str(out), model=str(peaked_model),
                    max_new_tokens=24, mode="relaxed", block=4, cost=str(Path(peaked_model).parent / "cost.json"), **deep)
    summary = run_job(cfg, progress=False, workers=2)
    t.join(timeout=60)
    assert killed.get("restarted") and killed["at"] < limit, killed
    ids = [r["id"] for r in read_records(out)]
    assert len(ids) == len(set(ids)) == limit
    want = reference("relaxed", 1, DEEP if shared else ())
    assert records_of(out)[:LIMIT] == records_of(want)  # the same records as one process
    if shared:
        assert index_of(out)["acceptance"] == index_of(want)["acceptance"]
    else:
        assert summary["merged"] == limit


@pytest.mark.parametrize("shared", [False, True])
def test_a_killed_driver_resumes_on_rerun(peaked_model, reference, tmp_path, shared):
    """kill -9 of the driver mid-job, then the same command: every record as one process
    writes it (group-sharded: killed before the merge; shared: mid-block, the block's
    records re-decoded from the saved pools and model)."""
    out = tmp_path / "d.jsonl"
    drafting = DEEP if shared else ()
    cmd = [sys.executable, "-m", "laser.cli", *job_args(peaked_model, out, extra=(*drafting, "--workers", "2"))]
    written = (lambda: len(read_records(out)) if out.exists() else 0) if shared else (
        lambda: _shard_records(out) if Path(str(out) + ".shards").exists() else 0)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and written() < 3 + 2 * shared:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= written() < LIMIT
    if not shared:
        assert out.read_bytes() == b""  # killed before the merge
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert records_of(out) == records_of(reference("relaxed", 1, drafting))


def _fails(argv, capsys, *needles):
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("laser: error:"), err
    for n in needles:
        assert n in err[0], err


def test_bad_ray_arguments_are_one_line_errors(peaked_model, tmp_path, capsys):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    _fails(job_args(peaked_model, tmp_path / "a.jsonl", extra=("--workers", "2", "--ray-address", f"127.0.0.1:{port}")),
           capsys, f"--ray-address 127.0.0.1:{port}", "no Ray cluster")
    assert time.time() - t0 < 60
    _fails(job_args(peaked_model, tmp_path / "a.jsonl", extra=("--workers", "2", "--ray-address", "nonsense")),
           capsys, "HOST:PORT")
    _fails(job_args(peaked_model, tmp_path / "a.jsonl", extra=("--workers", "0")), capsys, "--workers must be >= 1")
    _fails(job_args(peaked_model, tmp_path / "a.jsonl", extra=("--format", "parquet")), capsys, "need --workers")
    assert not json.dumps(os.listdir(tmp_path)).count("shards")
