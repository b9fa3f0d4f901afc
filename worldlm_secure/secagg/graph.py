"""The public k-regular neighbour graph of a SecAgg+ round (who masks with, and holds shares for, whom).

The graph is a Harary ring lattice (each member linked to the k/2 nearest on either side) over the
members ordered by SHA-256(round_id || name). Everyone can recompute it from public data (round id and
the list of members that advertised keys), so the aggregator cannot pick a graph; k is rounded up to
even, and a member count of at most k+1 gives the complete graph.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Collection, Iterable, Mapping


def auto_degree(n: int) -> int:
    """Neighbour count for ``neighbours: auto``: 2 * ceil(log2 n), at least 2, at most n - 1 (O(log n))."""
    if n <= 1:
        return 0
    return min(n - 1, max(2, 2 * math.ceil(math.log2(n))))


def ring_degree(n: int, k: int) -> int:
    """The real degree of `neighbour_graph` over ``n`` members for a requested ``k``: k rounded up to even,
    or n - 1 when that covers everyone. Thresholds must come from this number, never from ``k``."""
    if n <= 1:
        return 0
    half = (k + 1) // 2
    if k >= n - 1 or n <= 2 or 2 * half >= n - 1:
        return n - 1
    return 2 * half


def _position(round_id: int, name: str) -> bytes:
    return hashlib.sha256(b"worldlm-secagg+/graph/v1" + struct.pack(">Q", round_id) + name.encode()).digest()


def neighbour_graph(members: Iterable[str], k: int, round_id: int) -> dict[str, frozenset[str]]:
    """Each member's neighbours (symmetric, no self-loops) in the round's ring lattice of degree ~k."""
    order = sorted(set(members), key=lambda m: (_position(round_id, m), m))
    n = len(order)
    if k >= n - 1 or n <= 2:
        return {m: frozenset(order) - {m} for m in order}
    half = (k + 1) // 2
    if 2 * half >= n - 1:
        return {m: frozenset(order) - {m} for m in order}
    return {
        m: frozenset(order[(i + d) % n] for d in range(-half, half + 1) if d != 0) for i, m in enumerate(order)
    }


def components(nodes: Collection[str], graph: Mapping[str, Collection[str]]) -> list[frozenset[str]]:
    """Connected components of the subgraph of ``graph`` induced by ``nodes``."""
    left = set(nodes)
    parts = []
    while left:
        stack = [left.pop()]
        part = set(stack)
        while stack:
            for nb in graph.get(stack.pop(), ()):
                if nb in left:
                    left.discard(nb)
                    part.add(nb)
                    stack.append(nb)
        parts.append(frozenset(part))
    return parts
