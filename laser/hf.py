"""Everything that differs between the transformers versions we support, in one place.

transformers 5.17 (the GPU stack) passes the KV cache as `past_key_values`; 5.2x renamed
it `cache`. `DynamicCache.crop` takes a positive length in one and only a negative count
in the other, so we never call it: the cache is compacted here by a gather on each layer.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache


def cache_kwarg(model) -> str:
    """Name of the forward argument that carries the KV cache."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def fill_only(model) -> dict:
    """Forward arguments for a prefill that only fills the cache: logits of the last position only."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def new_cache(model) -> DynamicCache:
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signature
        return DynamicCache()


def _layers(cache):
    """(keys, values, setter) per layer, for the layered and the legacy list layout."""
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            def put(k, v, layer=layer):
                layer.keys, layer.values = k, v
            yield layer.keys, layer.values, put
    else:
        for i in range(len(cache.key_cache)):
            def put(k, v, i=i):
                cache.key_cache[i], cache.value_cache[i] = k, v
            yield cache.key_cache[i], cache.value_cache[i], put


def cache_length(cache) -> int:
    return int(cache.get_seq_length())


def compact_cache(cache, start: int, keep: torch.Tensor) -> None:
    """Keep cache positions [0, start) + (start + keep); drop the rest.

    keep: [a] int64 offsets (ascending) into the block written by the verification pass.
    Afterwards the cache holds start + a positions. Gathered, not recomputed.
    """
    a = int(keep.numel())
    src = keep + start
    for k, v, put in _layers(cache):
        if a:
            k[:, :, start : start + a] = k.index_select(2, src)
            v[:, :, start : start + a] = v.index_select(2, src)
        put(k[:, :, : start + a], v[:, :, : start + a])
