"""How many prompt tokens a step may carry beside decoding streams."""

from __future__ import annotations

import pytest

from mimoserve.backends.llamacpp.scheduler import StepCost


def test_a_line_through_recent_steps_separates_the_fixed_cost_from_the_per_token_one() -> None:
    cost = StepCost()
    for tokens in (1, 33, 2, 64, 128, 3, 512):
        cost.add(tokens, 0.4 + 0.01 * tokens)
    fixed, per_token = cost.estimate()
    assert fixed == pytest.approx(0.4)
    assert per_token == pytest.approx(0.01)


def test_steps_of_one_size_are_all_per_token_cost_and_none_is_nothing() -> None:
    assert StepCost().estimate() == (0.0, 0.0)
    cost = StepCost()
    for _ in range(3):
        cost.add(40, 0.8)
    fixed, per_token = cost.estimate()
    assert fixed == 0.0
    assert per_token == pytest.approx(0.02)


def test_only_recent_steps_count() -> None:
    cost = StepCost(window=4)
    for tokens in (10, 20, 30, 40):
        cost.add(tokens, 1.0 * tokens)  # long ago: 1 s per token
    for tokens in (10, 20, 30, 40):
        cost.add(tokens, 0.01 * tokens)
    assert cost.estimate()[1] == pytest.approx(0.01)
