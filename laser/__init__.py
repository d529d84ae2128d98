"""LASER: retrieval-based speculative decoding for recommender knowledge generation."""

import torch  # noqa: F401  before laser._C: the OpenMP runtime torch loads is the one laser._C's product joins
from laser._C import AcceptanceModel, DraftTree, PoolFormatError, RetrievalPool, cut_trees, draft_union
from laser.config import AcceptConfig, DraftConfig
from laser.decode import DecodeOutput, DecodeStats, calibrate, generate, hf_generate
from laser.engine import Engine
from laser.model import load_model
from laser.quality import quality  # the function: laser.quality(texts)

__all__ = [
    "AcceptConfig", "AcceptanceModel", "DecodeOutput", "DecodeStats", "DraftConfig", "DraftTree", "Engine", "PoolFormatError",
    "RetrievalPool", "calibrate", "cut_trees", "draft_union", "generate", "hf_generate", "load_model", "quality",
]
__version__ = "0.3.0"
