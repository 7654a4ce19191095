"""Group-relative advantages against hand-computed values."""

import pytest
import torch

from engine.rl.advantages import group_advantages


def test_grpo_advantages_hand_computed() -> None:
    # group 1: mean 0.25, unbiased std sqrt((0.75² + 3·0.25²)/3) = 0.5; group 2 is constant -> all zero.
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4)
    expected = torch.tensor([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, 0, 0, 0, 0])
    torch.testing.assert_close(adv, expected)


def test_dr_grpo_drops_std() -> None:
    # mean of (3, 1) is 2 -> (1, -1); mean of (0, 4) is 2 -> (-2, 2).
    adv = group_advantages(torch.tensor([3.0, 1.0, 0.0, 4.0]), 2, scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, -2.0, 2.0]))


def test_groups_are_independent_of_each_other() -> None:
    a = group_advantages(torch.tensor([0.0, 1.0, 5.0, 7.0]), 2)
    b = group_advantages(torch.tensor([0.0, 1.0, -3.0, 100.0]), 2)
    torch.testing.assert_close(a[:2], b[:2])
    assert a[0] < 0 < a[1]


@pytest.mark.parametrize(("shape", "group"), [((6,), 4), ((2, 4), 4), ((4,), 1)])
def test_bad_shapes_raise(shape: tuple[int, ...], group: int) -> None:
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(shape), group)
