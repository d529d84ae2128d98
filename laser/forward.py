"""LASER's own forward for Llama-architecture models (Llama, SmolLM2, Qwen2) on a CPU:
transformers' computation on the model's own parameters, without its module calls.

A verification forward is small (1 + a tree of ~8-16 tokens). On the 2-core Intel VM its
linears take ~20-27 ms (the 536 MB of SmolLM2's weights streamed once), and transformers'
per-module Python (module calls, kwargs and deprecation wrappers, RMSNorm's casts and
reductions, rotate_half's slices and cats) ~9 ms more. DirectForward runs one flat loop over
the layers on the model's own parameters, every step but the embedding, rotary tables and LM
head in C++ (csrc/layer.h, on data pointers):

  h = embed(ids)                                   [b, q, C], the residual stream (updated in place)
  cos, sin = rotary(h, positions)                  [b, q, D] (the model's own rotary module)
  per layer:  x = rms(h)                           add_rms_norm (h += the last layer's y first)
              q, k, v = proj(x) ; rope(q), rope(k) [b, q, H * D], rope in place
              K, V = cache with the block's k, v   at the TreeCache's slots for the block
              y = o_proj(attention(q, K, V, mask)) C++ attention over the cache rows (not SDPA)
              x = rms(h += y)
              y = down(silu(gate(x)) * up(x))      silu_mul in place on gate's output
  logits = lm_head(rms(h += y))                    [b, q, V]

Up to the most rows at which the routes (laser/cpu.py) run every layer product tiled
(LinearRoutes.tiled_upto; on the Intel VM 64), all layers are one C++ call (decoder_layer
each, all products tiled, on parameters gathered once while they stay the same), which writes
the block's keys and values at TreeCache.block_slots(); SmolLM2 over 1 + 11 tokens: 40 -> 33 ms
against the Python loop of the same steps, one token 32-38 -> 27 ms (there F.linear wins some
shapes alone, not in the layer). Above it (large ragged batches, where oneDNN wins) the loop
runs in Python, each product through its route and the block through the cache's update();
so do prefills (Engine.fill: the prompts' keys from column 0 under a causal mask, no logits).

Tokens are the b * q rows of input_ids (padded layout: token j of row j // q), or with
laser_ragged = (gather, scatter) the rows' blocks back to back ([1, N]: token j in padded slot
scatter[j] of the [B, 1, q, T] mask, cache row scatter[j] // q). The logits equal the model's
own forward under the same routes up to fp32 rounding (the norms, softmax and products sum
in other orders; tests/test_engine.py checks every verification of one-row and ragged
decodes, and that strict decoding still equals greedy). DirectForward.of(model) returns None
for anything else (other layer types or activations); runnable() is False while hooks sit on
the model, while it trains or records gradients, or off float32: those forwards run through
transformers as before.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.modules import module as nn_module

from laser import _C

# model class -> the transformers module that defines it; their decoder layers are the one
# pre-norm block above (Qwen2 adds biases to q/k/v, which the linears carry)
SUPPORTED = {"LlamaForCausalLM": "transformers.models.llama.modeling_llama",
             "Qwen2ForCausalLM": "transformers.models.qwen2.modeling_qwen2"}


def _products(layer) -> tuple:
    """A decoder layer's linears in the C++ layer's order: q, k, v, o, gate, up, down."""
    a, mlp = layer.self_attn, layer.mlp
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj


class DirectForward:
    """The flat forward of one supported model (see the module docstring). Stateless but for the
    C++ layers' gathered parameters (replaced whole when stale): any number of threads may run it
    at once, each with its own cache."""

    @classmethod
    def of(cls, model) -> "DirectForward | None":
        """The direct forward for `model`, or None where it would not compute exactly what the
        model does."""
        name = type(model).__name__
        if SUPPORTED.get(name) != type(model).__module__:
            return None
        inner = getattr(model, "model", None)
        if not (all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))
                and hasattr(model, "lm_head")):
            return None
        layers = list(inner.layers)
        text = model.config.get_text_config()
        if (len(layers) != text.num_hidden_layers or type(inner.embed_tokens) is not torch.nn.Embedding
                or getattr(text, "partial_rotary_factor", None) not in (None, 1, 1.0)  # rope_at turns whole heads
                or any(t != "full_attention" for t in (getattr(text, "layer_types", None) or ["full_attention"]))):
            return None
        prefix = name[: -len("ForCausalLM")]
        kinds = {"layer": prefix + "DecoderLayer", "attn": prefix + "Attention", "mlp": prefix + "MLP",
                 "norm": prefix + "RMSNorm"}
        for layer in layers:
            parts = {"layer": layer, "attn": layer.self_attn, "mlp": layer.mlp, "norm": layer.input_layernorm}
            if (any(type(m).__name__ != kinds[k] for k, m in parts.items())
                    or type(layer.post_attention_layernorm).__name__ != kinds["norm"]
                    or not all(hasattr(layer.self_attn, a) for a in ("head_dim", "scaling"))
                    or getattr(layer.self_attn, "sliding_window", None) is not None
                    or type(layer.mlp.act_fn).__name__ not in ("SiLUActivation", "SiLU")):
                return None
        if type(inner.norm).__name__ != kinds["norm"] or type(model.lm_head) is not torch.nn.Linear:
            return None
        shapes = [[tuple(m.weight.shape) for m in _products(layer)] for layer in layers]
        if any(s != shapes[0] for s in shapes):
            return None  # the C++ layers take one set of shapes
        return cls(model)

    def __init__(self, model):
        self.model = model
        inner = model.model
        self.embed, self.rotary, self.norm, self.head = inner.embed_tokens, inner.rotary_emb, inner.norm, model.lm_head
        self.layers = list(inner.layers)
        self.modules = list(model.modules())
        self.shapes = frozenset(tuple(m.weight.shape) for m in _products(self.layers[0]))  # the layers' products' (N, K)
        # (packs' id and generation, parameters' state, the parameters, _C.DirectLayers): the C++
        # layers' parameters as last gathered (_direct_layers)
        self._last = None

    def runnable(self) -> bool:
        """False while hooks sit on the model (a direct forward would skip them), while it trains
        or records gradients, or when its weights are not float32 (the elementwise steps' type)."""
        return not (self.model.training or torch.is_grad_enabled() or self.embed.weight.dtype != torch.float32
                    or nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                    or any(m._forward_hooks or m._forward_pre_hooks for m in self.modules))

    def __call__(self, routes, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                 cache, laser_ragged=None, logits: bool = True) -> torch.Tensor | None:
        """Logits [b, q, V] of input_ids [b, q] at position_ids [b, q]; attention_mask: the additive
        float32 [B, 1, q', T] mask, laser_ragged as in the module docstring; the block's keys and
        values go into `cache` (a TreeCache). routes: the LinearRoutes for the products (None: F.linear).
        A prefill (cache.filling(): the block is the rows' keys from column 0, T = q, the mask causal)
        runs the Python layer loop, whose attention skips each chunk's hidden later columns;
        logits=False: no final norm and LM head (a prefill only fills the cache), returns None."""
        h = self.embed(input_ids)  # [b, q, C] the residual stream, a fresh tensor updated in place
        b, q, C = h.shape
        rows = b * q
        B, _, qp, T = attention_mask.shape
        if attention_mask.dtype != torch.float32 or not attention_mask.is_contiguous():
            raise ValueError("the direct forward takes an additive float32 C-contiguous mask")
        slot = np.arange(rows) if laser_ragged is None else laser_ragged[1].numpy()  # [rows] mask row of each token
        cos, sin = (t.contiguous() for t in self.rotary(h, position_ids))  # [b, q, D]
        x = torch.empty_like(h)  # each norm's output, read by the products that follow it
        y = torch.empty_like(h)  # what the residual stream takes next: each layer's output
        if (routes is not None and rows <= routes.tiled_upto(self.shapes) and cache.fill_rows is None
                and all(l.is_initialized for l in cache.layers)):
            self._tiled_layers(routes.packs, h, y, x, cos, sin, slot, attention_mask, cache)
        else:
            self._layers(F.linear if routes is None else routes.lean, h, y, x, cos, sin, slot, attention_mask, cache)
        if not logits:
            return None
        _C.add_rms_norm_at(h.data_ptr(), y.data_ptr(), rows, C, self.norm.weight.data_ptr(), self.norm.variance_epsilon,
                           x.data_ptr(), torch.get_num_threads())
        return F.linear(x, self.head.weight, self.head.bias) if routes is None else routes.lean(x, self.head.weight,
                                                                                                 self.head.bias)

    def _tiled_layers(self, packs, h, y, x, cos, sin, slot, mask, cache) -> None:
        """The layers as C++ steps (csrc/layer.h decoder_layer), where every product runs tiled."""
        b, q, C = h.shape
        rows, (S, T) = b * q, (mask.shape[0] * mask.shape[2], mask.shape[3])
        a0, mlp0 = self.layers[0].self_attn, self.layers[0].mlp
        D = a0.head_dim
        Hq, Hkv, I = a0.q_proj.weight.shape[0] // D, a0.k_proj.weight.shape[0] // D, mlp0.gate_proj.weight.shape[0]
        keys = cache.layers[0].keys  # [R, Hkv, capacity, D]
        cache_row, cache_col = cache.block_slots(rows)
        scratch = [x] + [torch.empty(rows, n) for n in (Hq * D, Hkv * D, Hkv * D, Hq * D, I, I)]  # x q k v att gate up
        block = _C.make_direct_block(C, Hq, Hkv, D, I, a0.scaling, rows, cos.data_ptr(), sin.data_ptr(), cache_row,
                                     cache_col, slot, mask.data_ptr(), S, T, keys.shape[0], keys.shape[2],
                                     [t.data_ptr() for t in scratch], torch.get_num_threads())
        block.run(h.data_ptr(), y.data_ptr(), self._direct_layers(packs, (C, Hq, Hkv, D, I)),
                  [kv.keys.data_ptr() for kv in cache.layers], [kv.values.data_ptr() for kv in cache.layers])

    def _direct_layers(self, packs, shapes: tuple) -> "_C.DirectLayers":
        """Every layer's parameters for the C++ layers: gathered again when any of them changed (in
        place: its version, or its storage; replaced, or its module: another tensor object, told
        by identity against the last ones, which are held) or the tiled copies did (packs'
        generation), else the last ones. Read through the modules' own dicts (attribute access
        would make the check ~1.3 ms a forward; so it is ~0.2 ms, a gathering ~0.5 ms)."""
        modules, tensors = [], []
        for layer in self.layers:  # per layer: the two norms, then q, k, v, o, gate, up, down (_products' order)
            m = layer._modules
            attn, mlp = m["self_attn"]._modules, m["mlp"]._modules
            modules += [m["input_layernorm"], m["post_attention_layernorm"], attn["q_proj"], attn["k_proj"],
                        attn["v_proj"], attn["o_proj"], mlp["gate_proj"], mlp["up_proj"], mlp["down_proj"]]
        for m in modules:
            p = m._parameters
            tensors += [p["weight"], p.get("bias")]
        live = [t for t in tensors if t is not None]
        state = (tuple(m.variance_epsilon for m in modules[0::9] + modules[1::9]),  # the norms'
                 tuple((t._version, t.data_ptr()) for t in live))
        last = self._last
        if (last is not None and last[0] == (id(packs), packs.generation) and last[1] == state
                and len(last[2]) == len(tensors) and all(map(operator.is_, last[2], tensors))):
            return last[3]
        # per layer: weight, bias (None) of norm1, norm2, q, k, v, o, gate, up, down
        per = [tensors[i : i + 18] for i in range(0, len(tensors), 18)]
        layers = _C.make_direct_layers(*shapes, [t[0].data_ptr() for t in per],
                                       [m.variance_epsilon for m in modules[0::9]], [t[2].data_ptr() for t in per],
                                       [m.variance_epsilon for m in modules[1::9]],
                                       [[packs.get(w, "tiled") for w in t[4::2]] for t in per],
                                       [[0 if b is None else b.data_ptr() for b in t[5::2]] for t in per])
        self._last = ((id(packs), packs.generation), state, tensors, layers)  # after get(): copies it made counted
        return layers

    def _layers(self, linear, h, y, x, cos, sin, slot, mask, cache) -> None:
        """The layers step by step in Python, each product through `linear` (routes other than tiled)."""
        b, q, C = h.shape
        rows, (B, _, qp, T) = b * q, mask.shape
        cache_row = slot // qp
        threads = torch.get_num_threads()
        pending = False

        def norm(module) -> None:  # h += y; x = rms(h)
            _C.add_rms_norm_at(h.data_ptr(), y.data_ptr() if pending else 0, rows, C, module.weight.data_ptr(),
                               module.variance_epsilon, x.data_ptr(), threads)

        for i, layer in enumerate(self.layers):
            a, mlp = layer.self_attn, layer.mlp
            D = a.head_dim
            norm(layer.input_layernorm)
            qs = linear(x, a.q_proj.weight, a.q_proj.bias).contiguous()  # [b, q, Hq * D]
            ks = linear(x, a.k_proj.weight, a.k_proj.bias).contiguous()  # [b, q, Hkv * D]
            vs = linear(x, a.v_proj.weight, a.v_proj.bias).contiguous()
            Hq, Hkv = qs.shape[-1] // D, ks.shape[-1] // D
            _C.rope_at(qs.data_ptr(), rows, Hq, D, cos.data_ptr(), sin.data_ptr(), threads)
            _C.rope_at(ks.data_ptr(), rows, Hkv, D, cos.data_ptr(), sin.data_ptr(), threads)
            heads = (b, q, -1, D)
            kb, vb = ks.view(heads).transpose(1, 2), vs.view(heads).transpose(1, 2)  # [b, Hkv, q, D]
            if cache.fill_rows is not None:  # a prefill: update() hands the block back, read as [b, Hkv, T = q, D]
                kb, vb = (torch.empty(kb.shape).copy_(t) for t in (kb, vb))  # those strides even where q = 1
            k, v = cache.layers[i].update(kb, vb)
            if k.shape[2] != T or k.stride()[2:] != (D, 1) or v.stride() != k.stride():  # [B, Hkv, T, D] views
                raise ValueError("the direct forward needs the cache's [rows, Hkv, T, D] key/value views")
            out = torch.empty_like(qs)  # [b, q, Hq * D]
            _C.attention_at(qs.data_ptr(), rows, Hq, D, k.data_ptr(), v.data_ptr(), Hkv, k.shape[0], k.stride(0),
                            k.stride(1), T, mask.data_ptr(), B * qp, slot, cache_row, a.scaling, out.data_ptr(), threads)
            y.copy_(linear(out, a.o_proj.weight, a.o_proj.bias))
            pending = True
            norm(layer.post_attention_layernorm)
            gate = linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias).contiguous()
            up = linear(x, mlp.up_proj.weight, mlp.up_proj.bias).contiguous()
            _C.silu_mul_at(gate.data_ptr(), up.data_ptr(), gate.numel(), "", threads)
            y.copy_(linear(gate, mlp.down_proj.weight, mlp.down_proj.bias))
