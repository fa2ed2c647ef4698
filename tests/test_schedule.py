"""Learning-rate schedules (rlmeta.schedules): transformers' on torch, mlx.optimizers' on MLX, equal values."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import optimization as hf

from rlmeta.schedules import mlx_schedule, torch_scheduler, transformers_name

CASES = [("constant", 0.0), ("linear", 0.0), ("cosine", 0.0), ("cosine", 0.1)]  # (schedule, min_lr_ratio)
LENGTHS = [(0, 10), (3, 10), (5, 7)]  # (warm-up, total) optimizer steps


def torch_lrs(make, lr: float, total: int) -> list[float]:
    """The learning rate of each of ``total`` optimizer steps under the scheduler ``make(optimizer)``."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make(optimizer)
    out = []
    for _ in range(total):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    return out


def mlx_lrs(schedule, lr: float, warmup: int, total: int, min_lr_ratio: float = 0.0) -> list[float]:
    """The learning rate each of ``total`` updates of an ``mlx.optimizers`` optimizer applies."""
    optim = pytest.importorskip("mlx.optimizers")
    opt = optim.SGD(learning_rate=mlx_schedule(schedule, lr, warmup, total, min_lr_ratio))
    out = []
    for _ in range(total):
        opt.update({}, {})  # sets learning_rate from the schedule at this update's step, then counts it
        out.append(opt.learning_rate.item())
    return out


def ours(schedule, warmup, total, min_lr_ratio):
    return lambda o: torch_scheduler(o, schedule, warmup, total, min_lr_ratio)


@pytest.mark.parametrize("schedule,min_lr_ratio", CASES)
@pytest.mark.parametrize("warmup,total", LENGTHS)
def test_torch_scheduler_is_transformers(schedule, min_lr_ratio, warmup, total):
    theirs = {
        "constant": lambda o: hf.get_constant_schedule_with_warmup(o, warmup),
        "linear": lambda o: hf.get_linear_schedule_with_warmup(o, warmup, total),
        "cosine": lambda o: hf.get_cosine_schedule_with_warmup(o, warmup, total) if not min_lr_ratio else
        hf.get_cosine_with_min_lr_schedule_with_warmup(o, warmup, total, min_lr_rate=min_lr_ratio),
    }[schedule]
    assert torch_lrs(ours(schedule, warmup, total, min_lr_ratio), 0.1, total) == torch_lrs(theirs, 0.1, total)


@pytest.mark.parametrize("lr", [1e-5, 3e-2, 1.0])
@pytest.mark.parametrize("schedule,min_lr_ratio", CASES)
@pytest.mark.parametrize("warmup,total", LENGTHS)
def test_mlx_schedule_equals_torch_scheduler_step_by_step(schedule, min_lr_ratio, warmup, total, lr):
    expected = torch_lrs(ours(schedule, warmup, total, min_lr_ratio), lr, total)
    got = mlx_lrs(schedule, lr, warmup, total, min_lr_ratio)
    assert len(got) == total
    for step, (a, b) in enumerate(zip(got, expected)):
        # 1e-7 relative; near zero (end of a linear decay) relative to the peak lr (MLX computes in float32)
        assert a == pytest.approx(b, rel=1e-7, abs=1e-7 * lr), (step, a, b)
    if warmup:
        assert got[0] == expected[0] == 0.0


def test_by_hand():
    assert mlx_lrs("constant", 1.0, 4, 10)[:6] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]  # warm-up step 0 has lr 0
    assert mlx_lrs("constant", 3e-4, 0, 10)[0] == pytest.approx(3e-4, rel=1e-7)
    assert mlx_lrs("linear", 1.0, 0, 4) == [1.0, 0.75, 0.5, 0.25]
    lin = mlx_lrs("linear", 1.0, 2, 6)
    assert lin == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25], abs=1e-7)
    cos = mlx_lrs("cosine", 2.0, 0, 10)
    assert cos[0] == 2.0 and cos[5] == pytest.approx(1.0, abs=2e-7)  # float32: 1e-7 of the peak
    assert cos[9] == pytest.approx(1.0 + math.cos(math.pi * 9 / 10), abs=2e-7)
    warm = mlx_lrs("cosine", 1.0, 2, 6)
    assert warm[:3] == [0.0, 0.5, 1.0] and warm[3] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)), abs=1e-7)
    floor = mlx_lrs("cosine", 1.0, 0, 11, min_lr_ratio=0.1)
    assert floor[0] == 1.0 and floor[5] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 11)), abs=1e-7)
    assert floor[10] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 10 / 11)), abs=1e-7)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch_scheduler(opt, "cosine", 0, 10, 0.2)
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)  # decays to min_lr_ratio x lr at the end


def test_transformers_names_and_errors():
    assert transformers_name("constant") == ("constant_with_warmup", {})
    assert transformers_name("linear") == ("linear", {})
    assert transformers_name("cosine") == ("cosine", {})
    assert transformers_name("cosine", 0.1) == ("cosine_with_min_lr", {"min_lr_rate": 0.1})
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        transformers_name("step")
    with pytest.raises(ValueError, match="unknown lr schedule"):
        mlx_schedule("step", 1.0, 0, 10)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        torch_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), "step", 0, 10)
