"""Customized retrieval pools: collaborative and attribute groups, the binary router, and a
set of RetrievalPools keyed by group, saved next to the job's output.

Collaborative: K-means over truncated-SVD embeddings of the user x item rating matrix
(items: of its transpose). Attribute: users by age band, gender and occupation (or
location); items by first genre (or publication decade). Router: a user (or item) with at
least h interactions goes to its collaborative pool, others to their attribute pool.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from laser import AcceptanceModel, RetrievalPool
from laser.data import Dataset
from laser.errors import InputError

MODES = ("none", "global", "collaborative", "attribute", "routed")


def _matrix(ds: Dataset, target: str):
    from scipy.sparse import csr_matrix

    users, u_idx = np.unique(ds.user_ids, return_inverse=True)
    items, i_idx = np.unique(ds.item_ids, return_inverse=True)
    m = csr_matrix((ds.ratings.astype(np.float32) + 1.0, (u_idx, i_idx)), shape=(len(users), len(items)))
    return (users, m) if target == "users" else (items, m.T.tocsr())


def collaborative_groups(ds: Dataset, target: str, k: int = 8, dim: int = 32, seed: int = 0) -> dict[str, str]:
    """id -> 'cf<g>', deterministic for a fixed seed."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import TruncatedSVD

    ids, m = _matrix(ds, target)
    dim = max(1, min(dim, min(m.shape) - 1))
    emb = TruncatedSVD(n_components=dim, random_state=seed).fit_transform(m)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12
    labels = KMeans(n_clusters=min(k, len(ids)), random_state=seed, n_init=4).fit_predict(emb)
    return {str(i): f"cf{int(g)}" for i, g in zip(ids, labels)}


def _age_band(age) -> str:
    if not age:
        return "age?"
    for hi, name in ((18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (56, "45-55")):
        if age < hi:
            return name
    return "56+"


def attribute_group(ds: Dataset, target: str, key: str) -> str:
    if target == "users":
        u = ds.users.get(key, {})
        rest = u.get("occupation") or u.get("location") or "?"
        return f"{_age_band(u.get('age'))}|{u.get('gender') or '?'}|{rest}"
    it = ds.items.get(key, {})
    if it.get("genres"):
        return it["genres"][0]
    return f"{(it['year'] // 10) * 10}s" if it.get("year") else "unknown"


def default_threshold(ds: Dataset, target: str) -> int:
    """h = the median number of interactions: the deeper half is routed collaboratively."""
    ids = ds.user_ids if target == "users" else ds.item_ids
    _, counts = np.unique(ids, return_counts=True)
    return int(np.median(counts)) if counts.size else 1


@dataclass
class Router:
    """Binary router: n_interactions(id) >= h -> collaborative group, else attribute group."""

    ds: Dataset
    target: str
    collab: dict[str, str]
    h: int

    def count(self, key: str) -> int:
        return int(self.ds.rows_of("user" if self.target == "users" else "item", key).size)

    def route(self, key: str) -> str:
        if self.count(key) >= self.h and key in self.collab:
            return self.collab[key]
        return "attr:" + attribute_group(self.ds, self.target, key)


# AcceptanceModel.shape of snapshots written before the `longest` feature and the finer top
# buckets: (sources, contexts 1, 2, 3, 4, 5-6, 7-8, 9-12, 13+, counts 1, 2, 3-4, 5-8, 9-16, 17+,
# shares). Its buckets are the first 8 contexts and 6 counts of today's, at longest = True.
LEGACY_ACCEPTANCE_SHAPE = (4, 8, 6, 10)


def acceptance_state(counts: np.ndarray) -> np.ndarray:
    """A saved model's hits or tries in today's layout (a legacy snapshot's mapped into it)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.size != int(np.prod(LEGACY_ACCEPTANCE_SHAPE)):
        return counts  # today's layout (set_state checks the length)
    s, c, k, v = LEGACY_ACCEPTANCE_SHAPE
    out = np.zeros(AcceptanceModel.shape)
    out[:s, :c, :k, 1, :v] = counts.reshape(LEGACY_ACCEPTANCE_SHAPE)
    return out.ravel()


class PoolSet:
    """One RetrievalPool per group, created on first use; saved as files in one folder. With
    with_global, also one pool of every text (4x max_nodes), drafted from beside each group's;
    with acceptance, the job's AcceptanceModel (one for all groups), saved in the index."""

    def __init__(self, mode: str, max_depth: int = 12, vocab_size: int = 0, max_nodes: int = 1 << 20,
                 acceptance: bool = False, with_global: bool = False):
        if mode not in MODES:
            raise ValueError(f"pool mode must be one of {', '.join(MODES)}, got {mode!r}")
        if with_global and mode in ("none", "global"):
            raise ValueError(f"a global pool beside the groups' needs group pools, not pool mode {mode!r}")
        self.mode, self.max_depth, self.vocab_size, self.max_nodes = mode, max_depth, vocab_size, max_nodes
        self.acceptance = AcceptanceModel() if acceptance else None
        self.everything = RetrievalPool(max_depth, vocab_size, 4 * max_nodes) if with_global else None
        self.pools: dict[str, RetrievalPool] = {}
        self.records = 0  # output records whose texts are in the pools
        self.blocks = 0  # job blocks whose texts are in the pools (laser.job)

    def get(self, group: str) -> RetrievalPool | None:
        if self.mode == "none":
            return None
        if self.mode == "global":
            group = "global"
        if group not in self.pools:
            self.pools[group] = RetrievalPool(self.max_depth, self.vocab_size, self.max_nodes)
        return self.pools[group]

    def draft_pools(self, group: str) -> list[RetrievalPool]:
        """What a request of `group` drafts from: its group's pool, then the global pool (if any)."""
        return [p for p in (self.get(group), self.everything) if p is not None]

    def insert(self, group: str, tokens) -> None:
        """One text enters its group's pool and the global pool."""
        tokens = np.asarray(tokens, dtype=np.int64)
        for pool in self.draft_pools(group):
            pool.insert(tokens)

    def learn(self, observed: AcceptanceModel) -> None:
        """Add a block's observations (counts: the order of a block's rows does not matter)."""
        self.acceptance.set_state(self.acceptance.hits + observed.hits, self.acceptance.tries + observed.tries)

    def save(self, folder: Path) -> None:
        """Pools first, then the index (atomic rename): a crash leaves the previous index valid."""
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for group, pool in self.pools.items():
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", group)
            name = f"{name}-{len(files)}.pool"
            pool.save(str(folder / (name + f".r{self.records}")))
            files[group] = name + f".r{self.records}"
        if self.everything is not None:
            name = f"everything.pool.r{self.records}"
            self.everything.save(str(folder / name))
        index = {"mode": self.mode, "max_depth": self.max_depth, "vocab_size": self.vocab_size,
                 "max_nodes": self.max_nodes, "records": self.records, "blocks": self.blocks, "files": files}
        if self.everything is not None:
            index["global"] = name
        if self.acceptance is not None:  # counts are whole numbers: exact in JSON
            index["acceptance"] = {"prior": self.acceptance.prior, "hits": self.acceptance.hits.tolist(),
                                   "tries": self.acceptance.tries.tolist()}
        tmp = folder / "index.json.tmp"
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, folder / "index.json")
        keep = set(files.values()) | {"index.json", index.get("global")}
        for f in folder.iterdir():  # older snapshots
            if f.name not in keep and f.suffix != ".tmp":
                f.unlink(missing_ok=True)

    @classmethod
    def load(cls, folder: Path, mode: str) -> "PoolSet":
        index = json.loads((folder / "index.json").read_text())
        if index["mode"] != mode:
            raise InputError(f"saved pools in {folder} are for --pool {index['mode']}, not {mode}")
        ps = cls(mode, index["max_depth"], index["vocab_size"], index["max_nodes"])
        ps.records, ps.blocks = int(index["records"]), int(index["blocks"])
        if "acceptance" in index:
            a = index["acceptance"]
            ps.acceptance = AcceptanceModel(float(a["prior"]))
            ps.acceptance.set_state(acceptance_state(a["hits"]), acceptance_state(a["tries"]))
        for group, name in index["files"].items():
            ps.pools[group] = RetrievalPool.load(str(folder / name))
        if "global" in index:
            ps.everything = RetrievalPool.load(str(folder / index["global"]))
        return ps


def group_of(mode: str, router: Router | None, key: str, collab: dict[str, str] | None, ds: Dataset, target: str) -> str:
    if mode in ("none", "global"):
        return mode
    if mode == "collaborative":
        return collab.get(key, "cf?")
    if mode == "attribute":
        return "attr:" + attribute_group(ds, target, key)
    return router.route(key)
