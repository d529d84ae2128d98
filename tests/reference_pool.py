"""Pure-Python reference of the C++ retrieval pool (csrc/trie.cpp), same algorithm.

Used by the property tests (exact agreement) and by benchmarks/bench_pool.py (speed
comparison). A node is a list [count, children] with children: dict token -> node.
"""

from __future__ import annotations

import heapq


class RefPool:
    def __init__(self, max_depth: int = 12):
        self.max_depth = max_depth
        self.root = [0.0, {}]

    def _walk(self, w, skip: int, weight: float) -> None:
        node = self.root
        if skip == 0:
            node[0] += weight
        for d, tok in enumerate(w, start=1):
            nxt = node[1].get(tok)
            if nxt is None:
                nxt = node[1][tok] = [0.0, {}]
            node = nxt
            if d > skip:
                node[0] += weight

    def insert(self, tokens, weight: float = 1.0) -> None:
        tokens = list(tokens)
        for i in range(len(tokens)):
            self._walk(tokens[i : i + self.max_depth], 0, weight)

    def extend(self, prefix, tokens, weight: float = 1.0) -> None:
        p = min(len(prefix), self.max_depth - 1)
        seq = (list(prefix[len(prefix) - p :]) if p else []) + list(tokens)
        for i in range(len(seq)):
            w = seq[i : i + self.max_depth]
            skip = max(0, p - i)
            if skip < len(w):
                self._walk(w, skip, weight)

    def count(self, tokens) -> float:
        node = self.root
        for t in tokens:
            node = node[1].get(t)
            if node is None:
                return 0.0
        return node[0]

    def __len__(self) -> int:
        stack, n = [self.root], 0
        while stack:
            node = stack.pop()
            n += 1
            stack.extend(node[1].values())
        return n

    def match(self, ctx, min_match: int, max_match: int):
        for L in range(min(max_match, len(ctx), self.max_depth - 1), min_match - 1, -1):
            node = self.root
            for t in ctx[len(ctx) - L :]:
                node = node[1].get(t)
                if node is None:
                    break
            if node is not None and node[1]:
                return node, L
        return None, 0


def draft(pools, weights, ctx, budget=64, max_depth=12, min_match=1, max_match=4):
    """Best-first union draft, flattened depth-first. Returns (tokens, parents, depth, counts, match_len)."""
    ctx = list(ctx)
    roots, match_len = [], 0
    for pool in pools:
        node, L = pool.match(ctx, min_match, max_match)
        roots.append(node)
        match_len = max(match_len, L)
    heap, sel = [], []  # heap entries: (-count, depth, token, parent_sel, nodes)

    def expand(nodes, depth, parent_sel, room):
        """Each pool offers its best `room` children (count desc, token asc); merged by token."""
        if depth >= max_depth or room <= 0:
            return
        merged = {}
        for p, (w, node) in enumerate(zip(weights, nodes)):
            if node is None:
                continue
            best = sorted(node[1].items(), key=lambda kv: (-kv[1][0], kv[0]))[:room]
            for tok, child in best:
                entry = merged.setdefault(tok, [0.0, [None] * len(pools)])
                entry[0] += w * child[0]
                entry[1][p] = child
        for tok, (cnt, kids) in merged.items():
            heapq.heappush(heap, (-cnt, depth + 1, tok, parent_sel, kids))

    if match_len > 0:
        expand(roots, 0, -1, budget)
    while len(sel) < budget and heap:
        negc, depth, tok, parent, nodes = heapq.heappop(heap)
        sel.append((-negc, depth, tok, parent))
        expand(nodes, depth, len(sel) - 1, budget - len(sel))

    children = {i: [] for i in range(-1, len(sel))}
    for s, (_, _, _, parent) in enumerate(sel):
        children[parent].append(s)
    order, dfs_of = [], {}

    def visit(s):
        dfs_of[s] = len(order)
        order.append(s)
        for c in children[s]:
            visit(c)

    for c in children[-1]:
        visit(c)
    tokens = [sel[s][2] for s in order]
    parents = [-1 if sel[s][3] < 0 else dfs_of[sel[s][3]] for s in order]
    depth = [sel[s][1] for s in order]
    counts = [sel[s][0] for s in order]
    return tokens, parents, depth, counts, match_len
