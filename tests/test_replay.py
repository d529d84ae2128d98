"""laser.replay (benchmarks/replay.py) replays strict decoding exactly: same steps as laser.generate."""

import numpy as np

import laser
from laser.data import chat_ids
from laser.groups import PoolSet
from laser.job import JOB_DRAFT, JobConfig, make_plan
from laser.replay import replay

def test_replay_counts_the_steps_strict_decoding_takes(peaked_model):
    model, tok = laser.load_model(peaked_model)
    plan = make_plan(JobConfig(dataset="ml-100k", target="users", pool="global", max_depth=10))
    keys = plan.all_keys[:10]
    prompts = {k: chat_ids(tok, plan.template.render(plan.ds, "users", k)) for k in keys}
    pools = PoolSet("global", vocab_size=len(tok))
    draft = laser.DraftConfig(budget=16, max_depth=10, auto_cost=False, **JOB_DRAFT)  # hard budget, drafting by pool shares (the model's: test_acceptance)
    records, steps = [], 0
    for i, k in enumerate(keys):  # each text enters the pool once it is done (replay --block 1)
        res = laser.generate(model, prompts[k], pool=pools.get("global"), max_new_tokens=40, draft=draft,
                             update_pool=False, acceptance=None)
        new = res.sequences[0, len(prompts[k]):].numpy()
        records.append({"id": k, "group": "global", "tokens": new.tolist()})
        pools.get("global").insert(new.astype(np.int64))
        if i >= 4:
            steps += res.stats.steps
    out = replay(records, prompts, plan, budget=16, warm=4, n_eval=6, block=1, draft=draft)
    assert out["steps"] == steps
    assert out["tokens"] == sum(len(r["tokens"]) for r in records[4:])
    assert out["tokens_per_step"] > 1.0  # the tiny model repeats itself: drafts are accepted


def test_report_plots_tokens_per_step_against_pool_size(reference, tmp_path):
    from laser.cli import main as cli

    corpus = reference("strict", 1)  # a strict job output of the tiny model (20 users)
    assert cli(["report", "--replay", str(corpus), "--replay-only", "--out-dir", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "Drafting vs pool size" in md and md.count("\n| ") >= 3
    assert (tmp_path / "replay.png").stat().st_size > 1000


def test_suffix_decoding_baseline_replays_the_same_texts():
    """SuffixDecoding (ArcticInference's suffix tree, built by benchmarks/suffix_baseline.sh in
    make test) on the replay: every token is committed once, and a text it has seen before is
    drafted back in long runs."""
    from laser.replay import replay_suffix

    rng = np.random.default_rng(0)
    text = rng.integers(10, 500, size=60).tolist()
    other = rng.integers(10, 500, size=40).tolist()
    prompts = {"a": np.array([1, 2, 3], dtype=np.int32), "b": np.array([1, 2, 4], dtype=np.int32),
               "c": np.array([1, 2, 5], dtype=np.int32)}
    records = [{"id": "a", "tokens": text}, {"id": "b", "tokens": other}, {"id": "c", "tokens": text}]
    seen = replay_suffix(records, prompts, budget=16, warm=2, n_eval=1)
    assert seen["tokens"] == len(text) and seen["steps"] < len(text) / 4  # long accepted runs
    unseen = replay_suffix(records[:2], prompts, budget=16, warm=0, n_eval=1)  # "b" alone: nothing to draft from
    assert unseen["tokens"] == len(other) and unseen["steps"] == len(other)
