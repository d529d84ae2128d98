"""LASER: retrieval-based speculative decoding for recommender knowledge generation."""

from laser._C import DraftTree, PoolFormatError, RetrievalPool, draft_union

__all__ = ["DraftTree", "PoolFormatError", "RetrievalPool", "draft_union"]
__version__ = "0.1.0"
