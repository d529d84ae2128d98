"""LASER: retrieval-based speculative decoding for recommender knowledge generation."""

from laser._C import DraftTree, PoolFormatError, RetrievalPool, draft_union
from laser.decode import DecodeOutput, DecodeStats, DraftConfig, calibrate, generate, hf_generate
from laser.model import load_model

__all__ = [
    "DecodeOutput", "DecodeStats", "DraftConfig", "DraftTree", "PoolFormatError", "RetrievalPool",
    "calibrate", "draft_union", "generate", "hf_generate", "load_model",
]
__version__ = "0.1.0"
