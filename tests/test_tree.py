"""The fixed reduction tree gives the same combination order however chunks are grouped into tasks."""

from hypothesis import given, settings
from hypothesis import strategies as st

from streamem import tree


def _combine(*parts: str) -> str:
    return "(" + "+".join(parts) + ")"


def _reference(n: int) -> str:
    """The tree as a plain loop: fan-in FAN_IN over chunk order, level by level."""
    level = [str(i) for i in range(n)]
    while len(level) > 1:
        level = [_combine(*level[i : i + tree.FAN_IN]) for i in range(0, len(level), tree.FAN_IN)]
    return level[0]


@st.composite
def _groupings(draw):
    n = draw(st.integers(1, 600))
    cuts = sorted(draw(st.sets(st.integers(1, max(n - 1, 1)), max_size=min(n - 1, 20)))) if n > 1 else []
    merge_picks = draw(st.lists(st.integers(0, 10**6), min_size=40, max_size=40))
    return n, [0, *cuts, n], merge_picks


@settings(max_examples=300, deadline=None)
@given(_groupings())
def test_any_grouping_and_merge_order_evaluates_the_same_tree(case):
    n, bounds, picks = case
    parts = [tree.leaves(a, [str(i) for i in range(a, b)], _combine, n) for a, b in zip(bounds, bounds[1:])]
    pick = iter(picks)
    while len(parts) > 1:
        # Merge a run of 2..FAN_IN neighbouring partials, anywhere.
        k = 2 + next(pick, 0) % (min(tree.FAN_IN, len(parts)) - 1)
        i = next(pick, 0) % (len(parts) - k + 1)
        parts[i : i + k] = [tree.merge(_combine, n, *parts[i : i + k])]
    assert tree.root(parts[0]) == _reference(n)


def test_a_whole_node_in_one_task_is_combined_there():
    part = tree.leaves(8, [str(i) for i in range(8, 16)], _combine, 20)
    assert part.nodes == {(1, 1): _combine(*map(str, range(8, 16)))}
