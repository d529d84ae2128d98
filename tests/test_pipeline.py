"""The knowledge job as a data pipeline: exact resume after kills, manifest, lock, faults,
flat memory, bring-your-own data, GGUF models."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import laser
from laser.cli import main as cli
from laser.job import read_records

from jobhelp import BLOCK, DEEP, LIMIT, NEW, job_args, per_step, pool_bytes, records_of


@pytest.mark.slow
@pytest.mark.parametrize("batch, extra", [(1, ()), (4, ()), (1, DEEP)])
def test_kills_at_random_moments_resume_to_the_uninterrupted_records(peaked_model, reference, tmp_path, batch, extra):
    """Also with the acceptance model (which learns from the job's own verified trees), a
    global pool and deep pools."""
    out = tmp_path / "k.jsonl"
    cmd = [sys.executable, "-m", "laser.cli", *job_args(peaked_model, out, batch=batch, extra=extra)]
    rng = np.random.default_rng(batch)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    seen = []
    # one kill at a random moment while the job starts up, then kills as soon as a number of new
    # records is on disk (polled every 2 ms: a fast machine finishes this small job within tens
    # of ms of a record, so a later kill would find it done)
    for sig, after in ((signal.SIGKILL, None), (signal.SIGKILL, 1), (signal.SIGTERM, 2), (signal.SIGKILL, 1)):
        before = len(read_records(out))
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if after is None:
            time.sleep(rng.uniform(1.0, 4.0))
        else:
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None and (
                    not out.exists() or out.read_bytes().count(b"\n") < before + after):
                time.sleep(0.002)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            break  # it finished first: nothing left to interrupt
        seen.append(len(read_records(out)))
        if sig == signal.SIGTERM:
            assert proc.returncode == 143 and "terminated (SIGTERM)" in err, err
            blocks, _ = pool_bytes(out)
            assert blocks == seen[-1] // BLOCK  # the snapshot holds exactly the finished blocks
        else:
            assert proc.returncode == -signal.SIGKILL
    assert sum(0 < n < LIMIT for n in seen) >= 2, f"too few kills landed mid-run: {seen}"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    got, want = records_of(out), records_of(reference("relaxed", batch, extra))
    assert [r["id"] for r in got] == [r["id"] for r in want]  # each id exactly once, in the same order
    assert got == want
    assert pool_bytes(out) == pool_bytes(reference("relaxed", batch, extra))  # pools byte-identical too
    index = lambda o: json.loads((Path(str(o) + ".pools") / "index.json").read_text())  # noqa: E731
    assert index(out).get("acceptance") == index(reference("relaxed", batch, extra)).get("acceptance")


@pytest.mark.parametrize("extra", [(), DEEP])
def test_a_sigterm_at_a_blocks_last_record_keeps_its_snapshot(peaked_model, reference, tmp_path, monkeypatch, extra):
    """SIGTERM right after the write of a block's last record (the moment a preemption would
    otherwise lose the block's snapshot): the job saves the snapshot, then stops; a rerun ends
    with the uninterrupted records."""
    import laser.job

    out = tmp_path / "t.jsonl"
    write = laser.job._Writer.write

    def write_then_sigterm(self, rec):
        where = write(self, rec)
        if self.n == BLOCK:
            os.kill(os.getpid(), signal.SIGTERM)
        return where

    monkeypatch.setattr(laser.job._Writer, "write", write_then_sigterm)
    assert cli(job_args(peaked_model, out, extra=extra)) == 143
    assert len(read_records(out)) == BLOCK and pool_bytes(out)[0] == 1  # the block and its snapshot
    monkeypatch.undo()
    assert cli(job_args(peaked_model, out, extra=extra)) == 0
    assert records_of(out) == records_of(reference("relaxed", 1, extra))


@pytest.mark.slow
def test_relaxed_accepts_non_argmax_tokens_and_strict_is_greedy(peaked_model, reference):
    import torch

    from laser.data import chat_ids, load_dataset, user_prompt
    from laser.model import load_model

    relaxed, strict = records_of(reference("relaxed", 1)), records_of(reference("strict", 1))
    assert [r["tokens"] for r in relaxed] != [r["tokens"] for r in strict]
    model, tok = load_model(peaked_model)
    ds = load_dataset("ml-100k")
    for rec in strict[:3]:
        ids = chat_ids(tok, user_prompt(ds, rec["id"]))
        x = torch.tensor([ids])
        ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False)
        assert ref[0, len(ids):].tolist() == rec["tokens"]


@pytest.mark.slow
def test_the_summary_counts_every_records_steps_and_draft_nodes(peaked_model, reference, tmp_path, capsys):
    for mode, batch, extra in (("relaxed", 1, ()), ("strict", 4, DEEP)):
        out = reference(mode, batch, extra)
        tokens, nodes = map(float, per_step(reference.printed[out]).split()[::3])
        recs = records_of(out)
        assert tokens == round(sum(len(r["tokens"]) for r in recs) / sum(r["steps"] for r in recs), 2)
        assert 0 < nodes <= 32  # the job's budget
    assert cli(job_args(peaked_model, tmp_path / "u.jsonl", extra=("--budget", "0"))) == 0
    assert per_step(capsys.readouterr().out) == "1.00 tokens/step at 0.0 draft nodes"


@pytest.fixture
def done_job(peaked_model, reference, tmp_path):
    """A copy of a finished relaxed job (LIMIT records in blocks of BLOCK) to damage."""
    src = reference("relaxed", 1)
    dst = tmp_path / "job"
    dst.mkdir()
    for f in src.parent.iterdir():
        (shutil.copytree if f.is_dir() else shutil.copy)(f, dst / f.name)
    return dst / "k.jsonl"


def _fails(argv, capsys, *needles):
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("laser: error:") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_rerun_with_other_settings_refuses_naming_the_difference(peaked_model, done_job, capsys):
    before = done_job.read_bytes()
    _fails(job_args(peaked_model, done_job, mode="strict"), capsys, "--mode", "'relaxed'", "'strict'")
    _fails(job_args(peaked_model, done_job, extra=("--top-k", "3")), capsys, "--top-k")
    _fails(job_args(peaked_model, done_job, extra=("--pool", "global")), capsys, "--pool")
    assert done_job.read_bytes() == before
    assert cli(job_args(peaked_model, done_job, limit=LIMIT)) == 0  # same settings: a no-op
    assert f"wrote 0 records ({LIMIT} already done)" in capsys.readouterr().out


def test_second_job_on_one_output_refuses_while_the_first_runs(peaked_model, done_job, capsys):
    lock = done_job.with_name(done_job.name + ".lock")
    first = subprocess.Popen([sys.executable, "-m", "laser.cli", *job_args(peaked_model, done_job, limit=LIMIT * 4)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and lock.read_text().strip() != str(first.pid):
            time.sleep(0.02)  # the first job holds the lock (its pid is in it)
        _fails(job_args(peaked_model, done_job, limit=LIMIT * 4), capsys, "being written by another laser job",
               f"pid {first.pid}")
        assert first.wait(timeout=240) == 0  # the first job is not disturbed
    finally:
        first.kill()
    ids = [r["id"] for r in read_records(done_job)]
    assert len(ids) == len(set(ids)) == LIMIT * 4
    fd = os.open(lock, os.O_RDWR)  # the lock is free again once the job is gone
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


def test_damaged_or_missing_pools_are_a_clear_error_and_rebuild_from_records(peaked_model, done_job, reference, capsys):
    pools = Path(str(done_job) + ".pools")
    index = pools / "index.json"
    want_pools, want_records = pool_bytes(done_job), done_job.read_bytes()
    index.write_text(index.read_text()[:40])  # truncated
    _fails(job_args(peaked_model, done_job), capsys, "damaged pool snapshot", "--rebuild-pools")
    assert cli(job_args(peaked_model, done_job, extra=("--rebuild-pools",))) == 0
    assert pool_bytes(done_job) == want_pools and done_job.read_bytes() == want_records

    name = json.loads(index.read_text())["files"]
    victim = pools / sorted(name.values())[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped byte
    victim.write_bytes(bytes(data))
    _fails(job_args(peaked_model, done_job), capsys, "checksum mismatch", "--rebuild-pools")
    shutil.rmtree(pools)
    _fails(job_args(peaked_model, done_job), capsys, "pool snapshot missing", "--rebuild-pools")
    assert cli(job_args(peaked_model, done_job, extra=("--rebuild-pools",))) == 0
    assert pool_bytes(done_job) == want_pools and done_job.read_bytes() == want_records


def test_read_only_folder_and_bad_template_lose_nothing(peaked_model, done_job, tmp_path, capsys):
    before = done_job.read_bytes()
    os.chmod(done_job.parent, 0o555)
    try:
        _fails(job_args(peaked_model, done_job, limit=LIMIT + 4), capsys, "read-only")
    finally:
        os.chmod(done_job.parent, 0o755)
    assert done_job.read_bytes() == before
    tpl = tmp_path / "t.txt"
    tpl.write_text("A {age} year old {job_title} rated:\n{history}\n")
    _fails(job_args(peaked_model, tmp_path / "new.jsonl", extra=("--prompt-template", str(tpl))), capsys,
           str(tpl), "unknown field {job_title}")
    assert not (tmp_path / "new.jsonl").exists() or (tmp_path / "new.jsonl").read_bytes() == b""


def test_full_disk_stops_with_a_valid_prefix_and_resumes(peaked_model, reference, tmp_path, capsys):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        out = mnt / "k.jsonl"
        assert cli(job_args(peaked_model, out, limit=2)) == 0  # manifest and first pools fit
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        (mnt / "filler").write_bytes(b"\0" * max(0, free - 6000))
        err = _fails(job_args(peaked_model, out), capsys)
        assert "No space left on device" in err  # a record's or a pool snapshot's write
        recs = read_records(out)
        assert out.read_bytes().endswith(b"\n") and 2 <= len(recs) < LIMIT
        (mnt / "filler").unlink()
        assert cli(job_args(peaked_model, out)) == 0
        assert records_of(out) == records_of(reference("relaxed", 1))
    finally:
        subprocess.run(["umount", str(mnt)])


def test_batch_stream_keeps_memory_flat(peaked_model):
    """Many records through generate_batch: RSS stays flat and the shared pool holds max_nodes."""
    from laser.batch import Request, generate_batch
    from laser.model import load_model
    import laser

    model, _ = load_model(peaked_model)
    V = model.config.vocab_size
    pool = laser.RetrievalPool(max_depth=8, vocab_size=V, max_nodes=4096)
    rng = np.random.default_rng(0)

    def rss_mb():
        # live memory: glibc keeps freed blocks of the ragged KV tensors (its RSS swings by tens
        # of MB without growing); malloc_trim hands them back before each reading
        import ctypes
        import gc

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    reqs = [Request(rng.integers(1, V, 12).tolist(), pool, i) for i in range(800)]
    marks = {}
    for n, res in enumerate(generate_batch(model, reqs, batch_size=4, max_new_tokens=16, eos_token_id=None), 1):
        assert len(res.tokens) == 16
        if n % 200 == 0:
            marks[n] = rss_mb()
    assert len(pool) <= 4096
    assert max(marks.values()) - marks[200] < 12, marks  # MB


def test_bring_your_own_jsonl_catalogue_and_template(peaked_model, tmp_path, capsys):
    d = tmp_path
    (d / "users.jsonl").write_text('{"id": "u1", "age": 30, "city": "Lyon"}\n{"id": "u2", "city": "Oslo"}\n')
    (d / "items.jsonl").write_text('{"id": 10, "title": "Dune", "genres": ["Sci-Fi"], "year": 1965}\n'
                                   '{"id": 11, "title": "Emma", "genres": "Romance"}\n')
    (d / "inter.jsonl").write_text('{"user": "u1", "item": 10, "rating": 5, "timestamp": 2}\n'
                                   '{"user": "u1", "item": 11, "rating": 2, "timestamp": 1}\n'
                                   '{"user": "u2", "item": 11, "rating": 4, "timestamp": 3}\n')
    tpl = d / "user.txt"
    tpl.write_text("Reader in {city}, {n_history} ratings:\n{history}\nDescribe their taste.")
    from laser.data import Template, load_dataset

    ds = load_dataset("jsonl", files={"users": d / "users.jsonl", "items": d / "items.jsonl",
                                      "interactions": d / "inter.jsonl"})
    text = Template.load(tpl, ds, "users").render(ds, "users", "u1")
    assert text == "Reader in Lyon, 2 ratings:\n- Emma [Romance]: 2/5\n- Dune (1965) [Sci-Fi]: 5/5\nDescribe their taste."
    files = ["--users", str(d / "users.jsonl"), "--items", str(d / "items.jsonl"), "--interactions", str(d / "inter.jsonl")]
    argv = ["generate", "--dataset", "jsonl", *files, "--target", "users", "--out", str(d / "o.jsonl"),
            "--model", str(peaked_model), "--max-new-tokens", "8", "--pool", "attribute", "--no-progress",
            "--cost", str(Path(peaked_model).parent / "cost.json"), "--prompt-template", str(tpl)]
    assert cli(argv) == 0
    assert [r["id"] for r in read_records(d / "o.jsonl")] == ["u1", "u2"]
    (d / "inter.jsonl").write_text('{"user": "u1", "item": 10, "rating": 5, "timestamp": 2}\n'
                                   '{"user": "u9", "item": 10, "rating": 5, "timestamp": 2}\n')
    _fails(argv, capsys, "inter.jsonl:2: unknown user 'u9'")
    (d / "inter.jsonl").write_text('{"user": "u1", "item": 10, "rating": "five", "timestamp": 2}\n')
    _fails(argv, capsys, "inter.jsonl:1: rating and timestamp must be numbers")
    (d / "items.jsonl").write_text('{"id": 10, "title": "Dune"}\n{"id": 11}\n')
    _fails(argv, capsys, "items.jsonl:2: missing field 'title'")
    (d / "users.jsonl").write_text('{"id": "u1"}\nnot json\n')
    _fails(argv, capsys, "users.jsonl:2: not a JSON object")
    _fails(["generate", "--dataset", "jsonl", "--out", str(d / "p.jsonl")], capsys, "--users")


@pytest.mark.slow
def test_gguf_model_is_converted_once_and_loads(tmp_path, monkeypatch):
    import torch

    from laser.model import default_gguf, load_model

    monkeypatch.setenv("LASER_CACHE", str(tmp_path))
    model, tok = load_model(str(default_gguf()))
    folders = list((tmp_path / "gguf").iterdir())
    assert len(folders) == 1 and (folders[0] / "config.json").exists()
    default, _ = load_model()  # the same GGUF, converted by the default path: same weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), default.state_dict().values()))
    mtime = (folders[0] / "config.json").stat().st_mtime
    load_model(str(default_gguf()))
    assert (folders[0] / "config.json").stat().st_mtime == mtime  # cached, not converted again
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_model(str(tmp_path / "missing.gguf"))


def test_calibrate_writes_a_cost_file_the_job_takes(peaked_model, tmp_path, capsys):
    cost = tmp_path / "cost.json"
    assert cli(["calibrate", "--model", str(peaked_model), "--context", "16", "--out", str(cost)]) == 0
    curve = json.loads(cost.read_text())
    assert len(curve) == 33 and all(c > 0 for c in curve) and curve == sorted(curve)
    out = tmp_path / "o.jsonl"
    args = job_args(peaked_model, out, limit=2)
    args[args.index("--cost") + 1] = str(cost)
    assert cli(args) == 0
    assert json.loads(Path(str(out) + ".manifest.json").read_text())["cost"] == curve


def test_acceptance_model_job_is_greedy_in_strict_mode_and_kept_with_the_pools(peaked_model, reference, tmp_path,
                                                                               capsys):
    out = tmp_path / "am.jsonl"
    assert cli(job_args(peaked_model, out, mode="strict", extra=DEEP)) == 0
    strict = records_of(reference("strict", 1))
    assert [r["tokens"] for r in records_of(out)] == [r["tokens"] for r in strict]  # greedy, whatever it drafts
    index = json.loads((Path(str(out) + ".pools") / "index.json").read_text())
    tries, hits = np.asarray(index["acceptance"]["tries"]), np.asarray(index["acceptance"]["hits"])
    assert tries.sum() > 0 and 0 < hits.sum() <= tries.sum()  # learned from the finished blocks' trees
    assert hits.reshape(4, -1)[2].sum() > 0  # ... including nodes drafted from the global pool
    assert index["max_depth"] == 16 and "global" in index
    every = laser.RetrievalPool.load(str(Path(str(out) + ".pools") / index["global"]))
    groups = [laser.RetrievalPool.load(str(Path(str(out) + ".pools") / f)) for f in index["files"].values()]
    assert len(groups) > 1 and every.count([]) == sum(g.count([]) for g in groups)  # every text, once
    manifest = json.loads(Path(str(out) + ".manifest.json").read_text())
    assert (manifest["acceptance"], manifest["global_pool"], manifest["pool_depth"], manifest["max_match"]) == (
        True, True, 16, 10)
    _fails(job_args(peaked_model, out, mode="strict", extra=DEEP[1:]), capsys, "--acceptance", "True", "False")
    _fails(job_args(peaked_model, out, mode="strict", extra=("--acceptance", "--rebuild-pools")), capsys,
           "cannot be rebuilt")
    _fails(job_args(peaked_model, out, mode="strict", extra=DEEP[:-2]), capsys, "--max-match", "10", "None")
    _fails(job_args(peaked_model, tmp_path / "g.jsonl", extra=("--global-pool", "--pool", "global")), capsys,
           "--global-pool", "--pool global")
    _fails(job_args(peaked_model, tmp_path / "g.jsonl", extra=("--pool-depth", "1")), capsys, "--pool-depth")
    _fails(job_args(peaked_model, tmp_path / "g.jsonl", extra=("--acceptance", "--max-match", "0")), capsys,
           "--max-match must be >= 1")


def test_manifests_older_than_a_setting_resume_with_its_old_value(peaked_model, done_job, capsys):
    manifest = done_job.with_name(done_job.name + ".manifest.json")
    m = json.loads(manifest.read_text())
    for key in ("acceptance", "global_pool", "pool_depth", "max_match", "no_repeat_ngram", "repetition_penalty",
                "loop_scope", "relaxed_rule"):
        del m[key]  # as the manifests written before these settings existed
    manifest.write_text(json.dumps(m))
    # a job from before these settings ran no loop control and the paper's relaxed rule: other settings are refused
    _fails(job_args(peaked_model, done_job, limit=LIMIT), capsys, "--no-repeat-ngram", "= 0", "6")
    _fails(job_args(peaked_model, done_job, limit=LIMIT, extra=("--no-repeat-ngram", "0")), capsys, "--relaxed-rule",
           "'paper'", "'fresh'")
    before = ("--no-repeat-ngram", "0", "--relaxed-rule", "paper")
    assert cli(job_args(peaked_model, done_job, limit=LIMIT, extra=before)) == 0
    assert f"wrote 0 records ({LIMIT} already done)" in capsys.readouterr().out
    _fails(job_args(peaked_model, done_job, limit=LIMIT, extra=before + ("--repetition-penalty", "1.2")), capsys,
           "--repetition-penalty")
    _fails(job_args(peaked_model, done_job, limit=LIMIT, extra=before + ("--acceptance",)), capsys, "--acceptance")
    _fails(job_args(peaked_model, done_job, limit=LIMIT, extra=before + ("--global-pool",)), capsys, "--global-pool")
    _fails(job_args(peaked_model, done_job, limit=LIMIT, extra=before + ("--pool-depth", "16")), capsys, "--pool-depth")
