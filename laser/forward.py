"""LASER's own forward for Llama-architecture models (Llama, SmolLM2, Qwen2): transformers'
operations, in transformers' order, on the model's own parameters, without its module calls.

A verification forward is small (1 + a tree of ~8-16 tokens); its linears take ~20 ms on a
2-core CPU, and transformers' per-module Python (module calls, kwargs, deprecation wrappers,
rotate_half's slices and cats, RMSNorm's casts) another ~14-18 ms. DirectForward runs the same
tensor operations (the logits are bitwise equal to the model's own forward under LASER's
routes: tests/test_engine.py) as one flat loop over the layers:

  h = embed(ids)                                       [b, q, C]
  cos, sin = rotary(h, positions)                      [b, q, D] (the model's own rotary module)
  per layer:  x = rms(h) ; q, k, v = proj(x)           [b, Hq | Hkv, q, D]
              q, k = rope(q), rope(k) ; K, V = cache.update(k, v)
              h = h + o_proj(attention(q, K, V, mask))  (LASER's attention function)
              h = h + down(act(gate(rms(h))) * up(rms(h)))
  logits = lm_head(rms(h))                             [b, q, V]

rope(x) = x * cos + rotate_half(x) * sin, computed as x * cos + roll(x, D/2) * sin_signed with
sin_signed = [-sin[:D/2], sin[D/2:]]: the same products (a sign moved between factors) and sums.

DirectForward.of(model) returns None for anything else (other layer types, hooks, a model not
on LASER's attention), which then runs through transformers as before.
"""

from __future__ import annotations

import torch
from torch.nn.modules import module as nn_module

# model class -> the transformers module that defines it; their decoder layers are the one
# pre-norm block above (Qwen2 adds biases to q/k/v, which the linears carry)
SUPPORTED = {"LlamaForCausalLM": "transformers.models.llama.modeling_llama",
             "Qwen2ForCausalLM": "transformers.models.qwen2.modeling_qwen2"}


def _rms(norm, x: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm / Qwen2RMSNorm forward, op for op."""
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * x.to(dtype)


class DirectForward:
    """The flat forward of one supported model (see the module docstring). Stateless: any
    number of threads may run it at once, each with its own cache."""

    @classmethod
    def of(cls, model, attention) -> "DirectForward | None":
        """The direct forward for `model`, or None where it would not compute exactly what the
        model does. attention: the function the model's attention layers call (LASER's)."""
        name = type(model).__name__
        if SUPPORTED.get(name) != type(model).__module__:
            return None
        inner = model.model
        layers = list(inner.layers)
        text = model.config.get_text_config()
        if (len(layers) != text.num_hidden_layers or any(t != "full_attention" for t in
                                                          (getattr(text, "layer_types", None) or ["full_attention"]))):
            return None
        prefix = name[: -len("ForCausalLM")]
        kinds = {"layer": prefix + "DecoderLayer", "attn": prefix + "Attention", "mlp": prefix + "MLP",
                 "norm": prefix + "RMSNorm"}
        for layer in layers:
            parts = {"layer": layer, "attn": layer.self_attn, "mlp": layer.mlp, "norm": layer.input_layernorm}
            if (any(type(m).__name__ != kinds[k] for k, m in parts.items())
                    or type(layer.post_attention_layernorm).__name__ != kinds["norm"]
                    or getattr(layer.self_attn, "sliding_window", None) is not None):
                return None
        if type(inner.norm).__name__ != kinds["norm"] or type(model.lm_head) is not torch.nn.Linear:
            return None
        return cls(model, attention)

    def __init__(self, model, attention):
        self.model, self.attention = model, attention
        inner = model.model
        self.embed, self.rotary, self.norm, self.head = inner.embed_tokens, inner.rotary_emb, inner.norm, model.lm_head
        self.layers = list(inner.layers)
        self.modules = list(model.modules())

    def runnable(self) -> bool:
        """False while hooks sit on the model (a direct forward would skip them) or it trains."""
        return not (self.model.training or nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                    or any(m._forward_hooks or m._forward_pre_hooks for m in self.modules))

    def __call__(self, linear, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask, cache,
                 **attention_kwargs) -> torch.Tensor:
        """Logits [b, q, V] of input_ids [b, q] at position_ids [b, q]; attention_mask and
        attention_kwargs go to the attention function as the model would pass them; keys and
        values go through cache.layers[i].update. linear(x, weight, bias): the product to use."""
        h = self.embed(input_ids)  # [b, q, C]
        cos, sin = self.rotary(h, position_ids)  # [b, q, D]
        half = cos.shape[-1] // 2
        cos, sin = cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, None]  # [b, 1, q, D]
        shape = h.shape[:-1]
        for i, layer in enumerate(self.layers):
            a, mlp = layer.self_attn, layer.mlp
            x = _rms(layer.input_layernorm, h)
            heads = (*shape, -1, a.head_dim)
            q = linear(x, a.q_proj.weight, a.q_proj.bias).view(heads).transpose(1, 2)  # [b, Hq, q, D]
            k = linear(x, a.k_proj.weight, a.k_proj.bias).view(heads).transpose(1, 2)  # [b, Hkv, q, D]
            v = linear(x, a.v_proj.weight, a.v_proj.bias).view(heads).transpose(1, 2)
            q = q * cos + q.roll(half, -1) * sin
            k = k * cos + k.roll(half, -1) * sin
            k, v = cache.layers[i].update(k, v)
            out, _ = self.attention(a, q, k, v, attention_mask, dropout=0.0, scaling=a.scaling, **attention_kwargs)
            h = h + linear(out.reshape(*shape, -1).contiguous(), a.o_proj.weight, a.o_proj.bias)
            x = _rms(layer.post_attention_layernorm, h)
            gate = linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)
            h = h + linear(mlp.act_fn(gate) * linear(x, mlp.up_proj.weight, mlp.up_proj.bias),
                           mlp.down_proj.weight, mlp.down_proj.bias)
        return linear(_rms(self.norm, h), self.head.weight, self.head.bias)
