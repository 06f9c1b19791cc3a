"""planner.search.spread / ends_first: which front points a confirmation budget reaches first."""

from __future__ import annotations

import pytest

from planner.search import ends_first, spread


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 7, 16, 33])
def test_ends_first_is_a_permutation_with_both_ends_leading(n: int) -> None:
    order = ends_first(list(range(n)))
    assert sorted(order) == list(range(n))
    if n >= 2:
        assert order[:2] == [0, n - 1]


def test_each_level_of_prefixes_halves_the_gaps() -> None:
    order = ends_first(list(range(9)))
    assert sorted(order[:3]) == [0, 4, 8]
    assert sorted(order[:5]) == [0, 2, 4, 6, 8]
    assert sorted(order) == list(range(9))


def test_spread_keeps_the_ends() -> None:
    assert spread(list(range(10)), 4) == [0, 3, 6, 9]
    assert spread(list(range(3)), 5) == [0, 1, 2]
