"""`laser ctr`: knowledge files checked against the dataset, the CTR path on a small slice."""

import gzip
import json

import numpy as np
import pytest

from laser.cli import main as cli
from laser.ctr import edit_distance, split_times
from laser.data import item_prompt, load_dataset

SLICE = 6  # users: a few hundred interactions


@pytest.fixture(scope="module")
def ml100k():
    return load_dataset("ml-100k")


def _write(path, records, manifest=None):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    if manifest is not None:
        name = path.name[:-3] if path.name.endswith(".gz") else path.name
        path.with_name(name + ".manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def knowledge(ml100k, tmp_path):
    """Knowledge files in the job's format for every user and item. Stand-in texts (a profile
    sentence per user, the item prompt's first line per item): the slice tests the code path;
    the real texts of the default model are benchmarks/knowledge/."""
    train_end, _ = split_times(ml100k.timestamps)
    files = {}
    for variant in ("strict", "relaxed"):
        users = [{"id": u, "text": f"A {a['age']}-year-old {a['occupation']} who enjoys "
                  f"{'dramas' if int(u) % 2 else 'comedies'}{' and thrillers' if variant == 'relaxed' and int(u) % 3 == 0 else ''}.",
                  "tokens": [1, 2, 3], "steps": 2, "time": 0.1} for u, a in ml100k.users.items()]
        items = [{"id": i, "text": item_prompt(ml100k, i).splitlines()[0]} for i in ml100k.items]
        u, i = tmp_path / f"users-{variant}.jsonl", tmp_path / f"items-{variant}.jsonl.gz"
        _write(u, users, {"dataset": "ml-100k", "target": "users", "history_until": train_end})
        _write(i, items, {"dataset": "ml-100k", "target": "items", "history_until": train_end})
        files[variant] = (u, i)
    return files


def _argv(files, out, **extra):
    argv = ["ctr", "--dataset", "ml-100k", "--models", "din,deepfm", "--seeds", "1", "--epochs", "1",
            "--max-users", str(SLICE), "--out", str(out)]
    for variant, (u, i) in files.items():
        argv += ["--knowledge", f"{variant}={u},{i}"]
    return argv


@pytest.mark.slow
def test_ctr_on_a_slice_writes_every_variant_and_model(knowledge, tmp_path, capsys):
    out = tmp_path / "ctr"
    (out).mkdir()
    (out / "report.md").write_text("# LASER report\n")
    assert cli(_argv(knowledge, out)) == 0
    res = json.loads((out / "ctr.json").read_text())
    assert {(r["variant"], r["model"]) for r in res} == {(v, m) for v in ("none", "strict", "relaxed")
                                                         for m in ("din", "deepfm")}
    assert all(set(r) == {"variant", "model", "seed", "auc", "logloss", "quality"} for r in res)
    assert all(0.0 <= r["auc"] <= 1.0 and r["logloss"] > 0 for r in res)
    for r in res:  # each variant's text quality beside its AUC (none: no texts)
        q = r["quality"]
        assert q is None if r["variant"] == "none" else (
            set(q) == {"users", "items"} and 0 <= q["users"]["loop_share"] <= 1 and q["items"]["texts"] > 0)
    md = (out / "ctr.md").read_text()
    assert "loops users / items" in md and "distinct-4 users / items" in md
    assert "relaxed - strict" in md and "| users |" in md and "identical" in md
    assert (out / "ctr.png").stat().st_size > 1000
    assert "## Downstream CTR check" in (out / "report.md").read_text()  # appended to laser report's page


def _fails(argv, capsys, *needles):
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("laser: error:") and "\n" not in err, err
    for n in needles:
        assert n in err, err


def test_bad_knowledge_files_name_the_file_and_the_id(ml100k, knowledge, tmp_path, capsys):
    u, i = knowledge["strict"]
    recs = [json.loads(line) for line in u.read_text().splitlines()]
    bad = tmp_path / "bad.jsonl"

    _write(bad, [r for r in recs if r["id"] != "3"])
    _fails(_argv({"strict": (bad, i)}, tmp_path / "o"), capsys, str(bad), "user id '3'")
    _write(bad, recs + [{"id": "99999", "text": "who?"}])
    _fails(_argv({"strict": (bad, i)}, tmp_path / "o"), capsys, f"{bad}:{len(recs) + 1}", "'99999'")
    _write(bad, [dict(r, text=" ") if r["id"] == "2" else r for r in recs])
    _fails(_argv({"strict": (bad, i)}, tmp_path / "o"), capsys, "empty knowledge text", "'2'")
    _write(bad, recs, {"dataset": "ml-1m", "target": "users", "history_until": 0})
    _fails(_argv({"strict": (bad, i)}, tmp_path / "o"), capsys, str(bad), "ml-1m")
    _write(bad, recs, {"dataset": "ml-100k", "target": "users", "history_until": None})
    _fails(_argv({"strict": (bad, i)}, tmp_path / "o"), capsys, "after the training end", "--history-until")
    _fails(_argv({"strict": (i, u)}, tmp_path / "o"), capsys, "not ml-100k users")
    _fails(["ctr", "--knowledge", "strict", "--out", str(tmp_path / "o")], capsys, "NAME=USERS")
    _fails(["ctr", "--knowledge", f"none={u},{i}", "--out", str(tmp_path / "o")], capsys, "'none' is reserved")
    _fails(["ctr", "--models", "dien", "--out", str(tmp_path / "o")], capsys, "unknown model 'dien'")


def test_edit_distance_matches_the_textbook_recurrence():
    def ref(a, b):
        d = np.zeros((len(a) + 1, len(b) + 1), dtype=int)
        d[:, 0], d[0, :] = np.arange(len(a) + 1), np.arange(len(b) + 1)
        for x in range(1, len(a) + 1):
            for y in range(1, len(b) + 1):
                d[x, y] = min(d[x - 1, y] + 1, d[x, y - 1] + 1, d[x - 1, y - 1] + (a[x - 1] != b[y - 1]))
        return d[-1, -1]

    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = rng.integers(0, 4, rng.integers(0, 12)), rng.integers(0, 4, rng.integers(0, 12))
        assert edit_distance(a, b) == ref(a, b)


def test_split_is_by_time_with_no_overlap(ml100k):
    train_end, val_end = split_times(ml100k.timestamps)
    t = ml100k.timestamps
    assert train_end == 889237269  # the --history-until of benchmarks/knowledge/make.sh
    assert (t < train_end).mean() == pytest.approx(0.8, abs=1e-3) and (t >= val_end).mean() == pytest.approx(0.1, abs=1e-3)
