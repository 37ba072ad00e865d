"""The fixed reduction tree over per-chunk results.

Chunk results are combined in a tree that depends only on the number of
chunks: node ``(level, j)`` combines, in order, the children
``(level - 1, j * FAN_IN)`` to ``(level - 1, j * FAN_IN + FAN_IN - 1)``, and
the leaves ``(0, i)`` are the chunks. The rounding of the total therefore does
not depend on how many workers there are, on which task computed what, or on
the order in which tasks finish.

Any task may hold a :class:`Partial`: the results of a contiguous range of
chunks, with every node whose chunks all lie in that range already combined.
Merging neighbouring partials combines the nodes they now complete, so the
same tree is evaluated whether a task runs one chunk or many.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

#: How many children one node of the tree combines.
FAN_IN = 8

#: Combines the children of one node, in order.
NodeCombine = Callable[..., Any]


@dataclass
class Partial:
    """The tree nodes of chunks ``lo`` to ``hi - 1`` (the largest complete ones)."""

    lo: int
    hi: int
    nodes: dict[tuple[int, int], Any]


def leaves(first: int, values: list[Any], combine: NodeCombine, n_leaves: int) -> Partial:
    """The partial of consecutive chunks ``first, first + 1, ...`` with results ``values``."""
    nodes = {(0, first + i): value for i, value in enumerate(values)}
    return _fold(Partial(first, first + len(values), nodes), combine, n_leaves)


def merge(combine: NodeCombine, n_leaves: int, *parts: Partial) -> Partial:
    """Neighbouring partials, given in chunk order, as one."""
    nodes: dict[tuple[int, int], Any] = {}
    for part in parts:
        nodes.update(part.nodes)
    return _fold(Partial(parts[0].lo, parts[-1].hi, nodes), combine, n_leaves)


def root(part: Partial) -> Any:
    """The value of the whole tree, from the partial of all chunks."""
    (value,) = part.nodes.values()
    return value


def _fold(part: Partial, combine: NodeCombine, n_leaves: int) -> Partial:
    """Combine, bottom up, every node whose chunks all lie in ``[part.lo, part.hi)``."""
    level, width, n_children = 1, FAN_IN, n_leaves  # width: chunks under one node of `level`
    while n_children > 1:  # the level below has more than one node
        for j in range(part.lo // width, -(-part.hi // width)):
            children = [(level - 1, c) for c in range(j * FAN_IN, min((j + 1) * FAN_IN, n_children))]
            inside = j * width >= part.lo and min((j + 1) * width, n_leaves) <= part.hi
            # A missing child has been combined into an ancestor of this node already.
            if inside and all(child in part.nodes for child in children):
                part.nodes[level, j] = combine(*(part.nodes.pop(child) for child in children))
        level, width, n_children = level + 1, width * FAN_IN, -(-n_children // FAN_IN)
    return part
