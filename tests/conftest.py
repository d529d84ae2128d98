import json
import os
import sys

# Triton kernels run on the CPU through the interpreter; it must be set before any
# kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def peaked_model(tmp_path_factory):
    """A random tiny Llama with SmolLM2's tokenizer whose next-token distributions are peaked
    (top-1 ~0.6, top-2 ~0.2), so relaxed acceptance takes non-argmax tokens."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from laser.model import load_model

    _, tok = load_model()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                      eos_token_id=tok.eos_token_id, initializer_range=0.5)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    folder = tmp_path_factory.mktemp("peaked")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder.parent / "cost.json").write_text(json.dumps([0.010, 0.011, 0.012, 0.013, 0.015, 0.017, 0.02, 0.022, 0.025]))
    return folder


@pytest.fixture(scope="session")
def reference(peaked_model, tmp_path_factory):
    """Uninterrupted runs, per (mode, batch size); get.printed[out]: what the run printed."""
    import contextlib
    import io

    from jobhelp import job_args
    from laser.cli import main as cli

    made = {}

    def get(mode, batch, extra=()):
        key = (mode, batch, tuple(extra))
        if key not in made:
            out = tmp_path_factory.mktemp(f"ref-{mode}-{batch}") / "k.jsonl"
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                assert cli(job_args(peaked_model, out, mode=mode, batch=batch, extra=extra)) == 0
            made[key], get.printed[out] = out, printed.getvalue()
        return made[key]

    get.printed = {}
    return get


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-weight tiny Llama with SmolLM2's tokenizer and chat template: fast job runs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from laser.model import load_model

    _, tok = load_model()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                      eos_token_id=tok.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
