"""The knowledge job on Ray: 2 workers == 1 process, worker and driver kills, bad arguments."""

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

from jobhelp import LIMIT, job_args, records_of
from laser.cli import main as cli
from laser.job import JobConfig, read_records, run_job

pytestmark = pytest.mark.slow


def _shard_records(out) -> int:
    return sum(len(read_records(p)) for p in Path(str(out) + ".shards").glob("*.jsonl"))


def test_two_workers_give_the_records_of_one_process(peaked_model, reference, tmp_path):
    out = tmp_path / "r.jsonl"
    assert cli(job_args(peaked_model, out, extra=("--workers", "2"))) == 0
    assert records_of(out) == records_of(reference("relaxed", 1))  # batch 1: every field but time
    strict = tmp_path / "s.jsonl"
    assert cli(job_args(peaked_model, strict, mode="strict", batch=4, extra=("--workers", "2"))) == 0
    got, want = records_of(strict), records_of(reference("strict", 4))  # merged in id order / finish order
    assert sorted((r["id"], r["text"]) for r in got) == sorted((r["id"], r["text"]) for r in want)
    pq = tmp_path / "p.parquet"
    assert cli(job_args(peaked_model, pq, extra=("--workers", "2", "--format", "parquet"))) == 0
    import pyarrow.parquet as papq

    table = papq.read_table(pq).to_pylist()
    assert [{k: v for k, v in r.items() if k != "time"} for r in table] == records_of(reference("relaxed", 1))


def test_a_killed_worker_is_restarted_and_its_group_resumes(peaked_model, reference, tmp_path):
    """kill -9 of a worker (its pid from Ray's actor table) mid-job: every id ends up once."""
    import ray
    from ray._private import state

    out = tmp_path / "k.jsonl"
    killed = {}

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if ray.is_initialized() and out.with_name(out.name + ".shards").exists() and _shard_records(out) >= 2:
                alive = [a for a in state.actors().values() if a["ActorClassName"] == "Worker" and a["State"] == "ALIVE"]
                if alive:
                    os.kill(alive[0]["Pid"], signal.SIGKILL)
                    killed.update(id=alive[0]["ActorID"], at=_shard_records(out))
                    while time.time() < deadline:  # Ray restarts it
                        a = state.actors().get(killed["id"], {})
                        if a.get("NumRestarts", 0) >= 1 and a.get("State") == "ALIVE":
                            killed["restarted"] = True
                            return
                        time.sleep(0.1)
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    cfg = JobConfig(dataset="ml-100k", target="users", limit=LIMIT * 2, out=str(out), model=str(peaked_model),
                    max_new_tokens=24, mode="relaxed", block=4, cost=str(Path(peaked_model).parent / "cost.json"))
    summary = run_job(cfg, progress=False, workers=2)
    t.join(timeout=60)
    assert killed.get("restarted") and killed["at"] < LIMIT * 2, killed
    ids = [r["id"] for r in read_records(out)]
    assert len(ids) == len(set(ids)) == LIMIT * 2 and summary["merged"] == LIMIT * 2
    assert records_of(out)[:LIMIT] == records_of(reference("relaxed", 1))  # the same records as one process


def test_a_killed_driver_resumes_on_rerun(peaked_model, reference, tmp_path):
    out = tmp_path / "d.jsonl"
    cmd = [sys.executable, "-m", "laser.cli", *job_args(peaked_model, out, extra=("--workers", "2"))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and (
            not Path(str(out) + ".shards").exists() or _shard_records(out) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= _shard_records(out) < LIMIT and out.read_bytes() == b""  # killed before the merge
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert records_of(out) == records_of(reference("relaxed", 1))


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
