"""What differs between the transformers versions we support, in one place.

transformers 5.17 (the GPU stack) passes the KV cache as `past_key_values`; 5.2x renamed
it `cache`. The cache itself is LASER's (laser.cache.TreeCache), written through the
public Cache interface both versions share.
"""

from __future__ import annotations

import inspect


def cache_kwarg(model) -> str:
    """Name of the forward argument that carries the KV cache."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def fill_only(model) -> dict:
    """Forward arguments for a prefill that only fills the cache: logits of the last position only."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
