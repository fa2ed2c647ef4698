"""Learning-rate schedules (rlmeta.rl.objectives.lr_at)."""
from __future__ import annotations

import math

import pytest

from rlmeta.rl.objectives import lr_at


def test_by_hand():
    assert [lr_at(s, 1.0, "constant", 4, 10) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_at(0, 3e-4, "constant", 0, 10) == 3e-4
    assert [lr_at(s, 1.0, "linear", 0, 4) for s in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert lr_at(2, 1.0, "linear", 2, 6) == 1.0 and lr_at(4, 1.0, "linear", 2, 6) == 0.5
    assert lr_at(0, 2.0, "cosine", 0, 10) == 2.0
    assert lr_at(5, 2.0, "cosine", 0, 10) == pytest.approx(1.0)
    assert lr_at(10, 2.0, "cosine", 0, 10) == pytest.approx(0.0)
    assert lr_at(15, 2.0, "cosine", 0, 10) == pytest.approx(0.0)  # held at 0 past the end
    assert lr_at(3, 1.0, "cosine", 2, 6) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ValueError):
        lr_at(0, 1.0, "step", 0, 10)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (5, 7)])
def test_matches_transformers(schedule, warmup, total):
    torch = pytest.importorskip("torch")
    opt = pytest.importorskip("transformers.optimization")
    make = {"constant": lambda o: opt.get_constant_schedule_with_warmup(o, warmup),
            "linear": lambda o: opt.get_linear_schedule_with_warmup(o, warmup, total),
            "cosine": lambda o: opt.get_cosine_schedule_with_warmup(o, warmup, total)}[schedule]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = make(optimizer)
    for step in range(total):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(step, 0.1, schedule, warmup, total), abs=1e-12)
        optimizer.step()
        sched.step()
