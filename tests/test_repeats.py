"""Loop control (laser.repeats) and the relaxed rule "fresh": equal to HF's processors, per tree
position and end to end (strict == HF greedy with the same processors), at B = 1 and B > 1."""

import json

import numpy as np
import pytest
import torch
from test_decode import V, greedy, tiny
from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

import laser
from laser.config import AcceptConfig, DraftConfig
from laser.repeats import NgramIndex, RowText, hf_processors

SETTINGS = [dict(no_repeat_ngram_size=1), dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=3),
            dict(repetition_penalty=1.3), dict(repetition_penalty=0.8, no_repeat_ngram_size=4)]


class Tree:
    """A DraftTree's fields: tokens, parents (DFS: parents first), depth."""

    def __init__(self, tokens, parents):
        self.tokens, self.parents = np.asarray(tokens, np.int32), np.asarray(parents, np.int32)
        self.depth = np.zeros(len(tokens), np.int32)
        for i, p in enumerate(parents):
            self.depth[i] = 1 if p < 0 else self.depth[p] + 1

    def __len__(self):
        return len(self.tokens)

    def path(self, i):
        out = []
        while i >= 0:
            out.append(int(self.tokens[i]))
            i = int(self.parents[i])
        return out[::-1]


def random_tree(rng, m, vocab):
    parents = [-1] + [int(rng.integers(-1, i)) for i in range(1, m)]
    return Tree(rng.integers(0, vocab, m), parents)


@pytest.mark.parametrize("kw", SETTINGS)
@pytest.mark.parametrize("seed", range(8))
def test_every_tree_position_gets_hf_processors_scores(kw, seed):
    """Row text + each node's root path through HF's processors == RowText.apply on the tree."""
    rng = np.random.default_rng(seed)
    vocab = 12  # few tokens: n-grams and seen tokens repeat often
    text = rng.integers(0, vocab, int(rng.integers(0, 30) if seed % 2 else rng.integers(0, 5))).tolist()  # short ones too
    row = RowText(np.array(text[:3], dtype=np.int64), vocab, kw.get("no_repeat_ngram_size", 0),
                  kw.get("repetition_penalty", 1.0))
    row.extend(text[3:])  # built in two pieces, as the loop extends it
    tree = random_tree(rng, 20, vocab)
    logits = torch.randn(len(tree) + 1, vocab)
    got = logits.clone()
    row.apply(got, tree)
    procs = []
    if "repetition_penalty" in kw:
        procs.append(RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"]))
    if "no_repeat_ngram_size" in kw:
        procs.append(NoRepeatNGramLogitsProcessor(kw["no_repeat_ngram_size"]))
    for p in range(len(tree) + 1):
        ids = torch.tensor([text + (tree.path(p - 1) if p else [])])
        want = logits[p : p + 1].clone()
        for proc in procs if ids.shape[1] else []:  # (an empty text: nothing to penalise or ban)
            want = proc(ids, want)
        assert torch.equal(got[p], want[0]), (p, ids)


def test_ngram_repeats_flag_tokens_that_repeat_text_or_path():
    idx = NgramIndex(3, [1, 2, 3, 4])
    tree = Tree([2, 5, 1, 2, 3], [-1, -1, 1, 2, 3])  # node 4's prefix ends (..., 1, 2): (1, 2, 3) is in the text
    assert idx.repeats(tree).tolist() == [False, False, False, False, True]
    chain = Tree([7, 8, 7, 8], [-1, 0, 1, 2])  # node 3 repeats (7, 8), formed on its own path
    assert NgramIndex(2, [1]).repeats(chain).tolist() == [False, False, False, True]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kw", SETTINGS[1:])
def test_output_scope_equals_hf_processors_over_the_output(arch, kw):
    """loop_scope="output": the prompt is not counted; strict == HF greedy with HF's processors
    over the generated ids (B = 1), and a batch gives each row what it gives alone."""
    model, prompts, pool, _ = pooled_case(arch, 3, {})
    # prompts that repeat themselves: counted ("all") they ban, uncounted they do not
    prompts = [p + p[: len(p) // 2] for p in prompts]
    draft = DraftConfig(budget=16, max_depth=6)
    alone = []
    for p in prompts:
        x = torch.tensor([p])
        want = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=40, do_sample=False,
                              pad_token_id=0, eos_token_id=None,
                              logits_processor=hf_processors(**kw, loop_scope="output", prompt_len=len(p)))[0].tolist()
        got = laser.generate(model, p, pool=pool, max_new_tokens=40, eos_token_id=None, update_pool=False, draft=draft,
                             loop_scope="output", **kw).sequences[0].tolist()
        assert got == want
        alone.append(got)
    out = laser.generate(model, prompts, pool=pool, max_new_tokens=40, eos_token_id=None, update_pool=False,
                         draft=draft, loop_scope="output", **kw).sequences
    width = max(len(p) for p in prompts)
    for i, (p, w) in enumerate(zip(prompts, alone)):
        assert out[i, width - len(p):].tolist() == w


def pooled_case(arch, seed, kw):
    """A tiny model, 4 prompts, HF greedy with the processors, and a pool of *uncontrolled*
    greedy texts: drafts that loop control must refuse, and drafts it accepts."""
    model = tiny(arch, seed)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, V, int(rng.integers(3, 20))).tolist() for _ in range(4)]
    pool = laser.RetrievalPool(max_depth=8, vocab_size=V)
    for p in prompts:
        pool.insert(greedy(model, p, 40, eos_token_id=None)[len(p):])
    want = [greedy(model, p, 40, eos_token_id=None, **kw) for p in prompts]
    return model, prompts, pool, want


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("kw", SETTINGS[1:])
def test_strict_with_loop_control_equals_hf_greedy_with_its_processors(arch, kw):
    model, prompts, pool, want = pooled_case(arch, 1, kw)
    draft = DraftConfig(budget=16, max_depth=6)
    steps = 0
    for p, w in zip(prompts, want):  # B = 1
        res = laser.generate(model, p, pool=pool, max_new_tokens=40, eos_token_id=None, update_pool=False,
                             draft=draft, **kw)
        assert res.sequences[0].tolist() == w
        steps += res.stats.steps
    assert steps < 4 * 40, "drafts were accepted"
    out = laser.generate(model, prompts, pool=pool, max_new_tokens=40, eos_token_id=None, update_pool=False,
                         draft=draft, **kw).sequences  # B = 4, ragged verification on a CPU
    width = max(len(p) for p in prompts)
    for i, (p, w) in enumerate(zip(prompts, want)):
        assert out[i, width - len(p):].tolist() == w


def test_hf_entry_point_runs_hfs_own_loop_processors_on_the_index():
    model, prompts, pool, want = pooled_case("llama", 2, dict(no_repeat_ngram_size=3, repetition_penalty=1.2))
    x = torch.tensor([prompts[0]])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=40, do_sample=False, eos_token_id=None,
                         pad_token_id=0, no_repeat_ngram_size=3, repetition_penalty=1.2,
                         custom_generate=laser.hf_generate, pool=pool)
    assert out[0].tolist() == want[0]


@pytest.mark.parametrize("kernels", [False, True])
def test_relaxed_acceptance_takes_only_allowed_non_argmax_nodes(kernels, monkeypatch):
    """accept_trees' relax_ok: a node that is not its row's argmax is accepted only where it is
    allowed; with nothing allowed, relaxed judges as strict."""
    from test_kernels import DEV, random_tree

    from laser.accept import accept_trees

    if kernels:
        monkeypatch.setenv("LASER_FORCE_KERNELS", "1")
    trees = [random_tree(12, 7), None, random_tree(20, 9)]
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 21, 8, generator=g) * 2
    for r, t in enumerate(trees):
        if t is not None:
            logits[r, t.parents + 1, torch.from_numpy(t.tokens).long()] += 3.0
    rng = np.random.default_rng(0)
    ok = [None if t is None else rng.random(len(t)) < 0.5 for t in trees]
    eos, rooms = np.array([99]), [100, 0, 100]
    judged = accept_trees(logits.to(DEV), trees, "relaxed", 2, 0.1, eos, rooms, relax_ok=ok)
    for r, t in enumerate(trees):
        if t is None:
            continue
        path, out, _ = judged[r]
        for node in path:
            row = logits[r, t.parents[node] + 1]
            assert int(t.tokens[node]) == int(row.argmax()) or ok[r][node]
    none = [None if t is None else np.zeros(len(t), bool) for t in trees]
    as_strict = accept_trees(logits.to(DEV), trees, "relaxed", 2, 0.1, eos, rooms, relax_ok=none)
    strict = accept_trees(logits.to(DEV), trees, "strict", 2, 0.1, eos, rooms)
    for a, b in zip(as_strict, strict):
        assert (a is None and b is None) or (np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]))


@pytest.mark.slow
def test_fresh_relaxed_rule_commits_no_repeating_token_but_the_argmax():
    """SmolLM2 relaxed on ML-100K prompts: under rule "fresh" every committed token that is not
    the argmax of a plain forward starts no repeated 3-gram; the paper's rule commits such tokens."""
    from laser.data import chat_ids, load_dataset, user_prompt

    model, tok = laser.load_model()
    ds = load_dataset("ml-100k")

    def relaxed_repeats(rule):
        pool, bad = laser.RetrievalPool(), 0
        for u in ("7", "8", "9", "10", "11", "12"):
            ids = chat_ids(tok, user_prompt(ds, u))
            res = laser.generate(model, ids, pool=pool, max_new_tokens=96, mode="relaxed", relaxed_rule=rule,
                                 acceptance=None)
            seq = res.sequences[0].tolist()
            with torch.no_grad():
                logits = model(torch.tensor([seq])).logits[0]
            for t in range(len(ids), len(seq)):  # the argmax up to fp32 rounding between the two forwards
                argmax = bool(logits[t - 1, seq[t]] >= logits[t - 1].max() - 1e-4)
                bad += not argmax and bool(NgramIndex(3, seq[:t]).repeats(Tree([seq[t]], [-1]))[0])
        return bad

    assert relaxed_repeats("fresh") == 0
    assert relaxed_repeats("paper") > 0


def test_accept_config_refuses_bad_loop_control_and_rules():
    for kw, word in [(dict(no_repeat_ngram=-1), "no_repeat_ngram"), (dict(repetition_penalty=0.0), "repetition_penalty"),
                     (dict(rule="greedy"), "relaxed rule"), (dict(fresh_ngram=0), "fresh_ngram")]:
        with pytest.raises(ValueError, match=word):
            AcceptConfig(**kw)


@pytest.mark.slow
def test_smollm2_strict_with_loop_control_equals_hf_greedy_b1_and_b2():
    from laser.data import chat_ids, load_dataset, user_prompt

    model, tok = laser.load_model()
    ds = load_dataset("ml-100k")
    prompts = [chat_ids(tok, user_prompt(ds, u)) for u in ("3", "4")]
    kw = dict(no_repeat_ngram_size=4, repetition_penalty=1.1)
    want = [greedy(model, p, 48, **kw) for p in prompts]
    pool = laser.RetrievalPool()
    for u in ("5", "6"):  # texts of other users, written without loop control
        p = chat_ids(tok, user_prompt(ds, u))
        pool.insert(greedy(model, p, 48)[len(p):])
    for p, w in zip(prompts, want):
        assert laser.generate(model, p, pool=pool, max_new_tokens=48, update_pool=False, **kw).sequences[0].tolist() == w
    out = laser.generate(model, prompts, pool=pool, max_new_tokens=48, update_pool=False, **kw).sequences
    width = max(len(p) for p in prompts)
    for i, (p, w) in enumerate(zip(prompts, want)):
        got = out[i, width - len(p):].tolist()
        assert got[: len(w)] == w and all(t == tok.eos_token_id for t in got[len(w):])


@pytest.mark.slow
def test_job_stores_loop_control_and_refuses_a_resume_with_other_settings(tiny_model_dir, tmp_path, capsys):
    from jobhelp import job_args
    from laser.cli import main as cli

    out = tmp_path / "k.jsonl"
    extra = ("--no-repeat-ngram", "3", "--repetition-penalty", "1.2", "--relaxed-rule", "paper", "--loop-scope", "all")
    args = job_args(tiny_model_dir, out, mode="relaxed", limit=4, extra=extra)
    (tiny_model_dir.parent / "cost.json").write_text(json.dumps([0.01, 0.011, 0.012, 0.013, 0.015]))
    assert cli(args) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((tmp_path / "k.jsonl.manifest.json").read_text())
    assert (manifest["no_repeat_ngram"], manifest["repetition_penalty"], manifest["relaxed_rule"],
            manifest["loop_scope"]) == (3, 1.2, "paper", "all")
    quality = json.loads((tmp_path / "k.jsonl.quality.json").read_text())
    assert quality["texts"] == 4 and 0 <= quality["loop_share"] <= 1 and "text quality of 4 records" in printed
    for i in range(0, len(extra), 2):
        other = list(extra)
        other[i + 1] = {"3": "2", "1.2": "1.1", "paper": "fresh", "all": "output"}[extra[i + 1]]
        assert cli(job_args(tiny_model_dir, out, mode="relaxed", limit=4, extra=other)) == 2
        err = capsys.readouterr().err
        assert extra[i] in err and err.count("\n") == 1
    assert len(out.read_text().splitlines()) == 4, "nothing written is lost"


@pytest.mark.parametrize("flag,value", [("--no-repeat-ngram", "-1"), ("--repetition-penalty", "0"),
                                        ("--repetition-penalty", "nan"), ("--relaxed-rule", "greedy"),
                                        ("--loop-scope", "prompt")])
def test_cli_refuses_bad_loop_control_in_one_line(tmp_path, capsys, flag, value):
    from laser.cli import main as cli

    assert cli(["generate", "--out", str(tmp_path / "a.jsonl"), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("laser: error:") and flag in err and err.count("\n") == 1
