"""The learning-rate schedules of samnnu.trainers.schedules."""
from __future__ import annotations

import math

import pytest
import torch

from samnnu.trainers.schedules import WarmupPolyLR, set_cosine_lr


def _optimizer() -> torch.optim.Optimizer:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    return torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=123.0)


def test_cosine_starts_at_the_base_rate_halves_midway_and_ends_near_the_floor():
    opt = _optimizer()
    rates = [set_cosine_lr(opt, 1e-3, step, 100) for step in range(100)]
    assert rates[0] == pytest.approx(1e-3)
    assert rates[50] == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5))
    assert rates[-1] == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 99 / 100))))
    assert rates[-1] > 0.05e-3 and all(x > y for x, y in zip(rates, rates[1:]))
    assert [g["lr"] for g in opt.param_groups] == [rates[-1]] * 2  # every group set
    assert set_cosine_lr(opt, 1.0, 0, 0) == pytest.approx(1.0)  # no division by zero


def test_warmup_poly_warms_up_then_decays_and_resumes_at_an_epoch():
    opt = _optimizer()
    schedule = WarmupPolyLR(opt, 0.01, total_iterations=110, warmup=10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 / 11)
    for _ in range(10):
        schedule.step_iteration()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    schedule.step(epoch=2, iterations_per_epoch=30)  # iteration 60: half of the decay
    assert opt.param_groups[1]["lr"] == pytest.approx(0.01 * 0.5 ** 0.9)
