"""rlmeta.tracking.DivergenceGuard on synthetic train_metrics rows: NaN/inf stops at once; zero_grad, param_norm
and reward_floor stop after ``patience`` consecutive steps; the error names the step, the condition, the
settings key and the last checkpoint written before things went wrong (finite, still on disk).

The trainers' real runs made to diverge are in test_mlx_trainer.py, test_trl_trainer.py and test_fomaml.py."""
from __future__ import annotations

import json
import math
import re

import pytest
from pydantic import ValidationError

from rlmeta import checkpoints
from rlmeta.errors import UserError
from rlmeta.settings import GuardSettings, MetaSettings, RLGuardSettings, RLJob, TrainSettings
from rlmeta.testing.rewards import registered
from rlmeta.tracking import DivergenceError, DivergenceGuard, NonFiniteMetricError

ALL_OFF = {"zero_grad_norm": None, "param_norm_ratio": None, "reward_floor": False}


def guard(floor: float | None = 0.0, where: str = "train.guard", verify=None, **settings) -> DivergenceGuard:
    """A guard with the default settings (patience 3, zero_grad_norm 0, param_norm_ratio 10, reward_floor on)
    changed by ``settings``; the reward mix's floor is ``floor``."""
    return DivergenceGuard(RLGuardSettings(**settings), floor, where, verify)


def row(step: int, **kw) -> dict:
    """A healthy RL step: a gradient, rewards that differ within groups, a reward above the floor."""
    return {"step": step, "loss": 0.1, "grad_norm": 0.5, "lr": 1e-3, "reward_mean": 0.4, "reward_std": 0.2,
            "zero_std_frac": 0.25, "tokens": 100 * step, "kl": None, **kw}


def feed(g: DivergenceGuard, steps, norms=None, record=None, **kw) -> None:
    """``check`` each step (``kw`` values: a constant or a function of the step); ``record``: folder of the
    checkpoint written after each step that passed, as the trainers do."""
    for s in steps:
        values = {k: v(s) if callable(v) else v for k, v in kw.items()}
        g.check(s, row(s, **values), None if norms is None else norms(s))
        if record is not None:
            g.record_checkpoint(s, record(s))


def trips_at(g: DivergenceGuard, rows_of, last: int = 20, norms=None, exc=DivergenceError):
    """Feed steps 1.. until the guard raises; (step, message). Fails when nothing trips by ``last``."""
    for s in range(1, last + 1):
        try:
            g.check(s, rows_of(s), None if norms is None else norms(s))
        except exc as e:
            return s, str(e)
    pytest.fail(f"nothing tripped in {last} steps")


@pytest.fixture
def ckpts(tmp_path):
    """checkpoint folder of step s (created), as the trainers name them."""
    def make(s: int):
        p = tmp_path / "checkpoints" / str(s)
        p.mkdir(parents=True, exist_ok=True)
        return p
    return make


# -- the settings -------------------------------------------------------------------------------

def test_settings_defaults_are_on_everywhere_and_validated():
    assert RLGuardSettings() == RLGuardSettings(patience=3, zero_grad_norm=0.0, param_norm_ratio=10.0,
                                                reward_floor=True)
    assert TrainSettings().guard == RLGuardSettings() and MetaSettings().guard == GuardSettings()
    assert not hasattr(GuardSettings(), "reward_floor")  # FOMAML has no rewards
    for bad in ({"patience": 0}, {"param_norm_ratio": 1.0}, {"zero_grad_norm": -1e-3}, {"stop": True}):
        with pytest.raises(ValidationError):
            RLGuardSettings(**bad)


def test_reward_floor_of_a_mix_is_its_lowest_total():
    def unit(completion, reference=None, prompt=None):
        return 0.0

    with registered("toy_unit", unit), registered("toy_other", unit):  # range [0, 1]
        floor = lambda rewards: RLJob.model_validate({"rewards": rewards}).reward_floor
        assert floor({"toy_unit": 1.0}) == 0.0
        assert floor({"toy_unit": -2.0}) == -2.0  # a negated reward is lowest at its maximum
        assert floor({"toy_unit": -2.0, "toy_other": 0.5}) == -2.0


# -- non-finite values stop at once (what check_finite did) ---------------------------------------

def test_finite_rows_pass():
    g = guard()
    g.check(1, {"step": 1, "loss": 0.5, "kl": None, "tokens": 3, "note": "text"}, 12.0)


def test_non_finite_metrics_stop_at_once_naming_them(ckpts):
    g = guard()
    g.record_checkpoint(10, ckpts(10))
    with pytest.raises(NonFiniteMetricError) as e:
        g.check(12, {"step": 12, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3}, 5.0)
    msg = str(e.value)
    assert msg == f"non-finite loss, grad_norm at step 12: loss=nan, grad_norm=inf; last good checkpoint: {ckpts(10)}"
    with pytest.raises(FloatingPointError, match=r"^non-finite loss at step 1: loss=-inf; last good checkpoint: "
                                                 r"none \(start over\)$"):
        guard().check(1, {"step": 1, "loss": float("-inf")})
    with pytest.raises(NonFiniteMetricError, match=r"^non-finite param_norm at step 2: param_norm=inf;"):
        guard().check(2, row(2), math.inf)
    with pytest.raises(NonFiniteMetricError, match=r"^non-finite weights at step 3"):
        guard().check(3, row(3), 5.0, params_finite=False)
    # a UserError (the command line prints it as one line, exit 2) and a FloatingPointError
    assert issubclass(NonFiniteMetricError, DivergenceError) and issubclass(DivergenceError, UserError)
    assert issubclass(DivergenceError, FloatingPointError)


def test_non_finite_ignores_patience_and_the_switches():
    g = DivergenceGuard(RLGuardSettings(patience=50, **ALL_OFF), None)
    with pytest.raises(NonFiniteMetricError, match="at step 1"):
        g.check(1, row(1, grad_norm=math.nan))


# -- each condition trips exactly at patience -----------------------------------------------------

@pytest.mark.parametrize("patience", [1, 3, 5])
def test_zero_grad_with_a_learning_signal_trips_at_patience(patience):
    g = guard(patience=patience)
    step, msg = trips_at(g, lambda s: row(s, grad_norm=0.5 if s < 4 else 0.0))
    assert step == 4 + patience - 1
    assert msg == (f"diverged at step {step}: the gradient norm stayed at 0 (<= 0) while the rewards still differed "
                   f"within groups for {patience} steps (since step 4; train.guard.zero_grad_norm); "
                   "last good checkpoint: none (start over)")


def test_zero_grad_needs_rewards_that_differ():
    g = guard()
    feed(g, range(1, 30), grad_norm=0.0, zero_std_frac=1.0)  # every group's rewards equal: no signal, no gradient
    feed(g, range(30, 32), grad_norm=0.0, zero_std_frac=0.75)
    with pytest.raises(DivergenceError, match=r"at step 32: the gradient norm .* for 3 steps \(since step 30;"):
        g.check(32, row(32, grad_norm=0.0, zero_std_frac=0.75))


def test_zero_grad_threshold_and_rows_without_zero_std_frac():
    g = guard(zero_grad_norm=1e-8)
    feed(g, range(1, 10), grad_norm=2e-8)  # above the threshold
    feed(g, range(10, 20), grad_norm=None)  # not logged: nothing to judge
    feed(g, range(20, 22), grad_norm=1e-8)
    with pytest.raises(DivergenceError, match=r"stayed at 1e-08 \(<= 1e-08\)"):
        g.check(22, row(22, grad_norm=1e-8))
    # FOMAML rows have no zero_std_frac: a zero meta-gradient counts
    meta = DivergenceGuard(GuardSettings(), None, "meta.guard")
    step, msg = trips_at(meta, lambda s: {"step": s, "loss": 1.0, "grad_norm": 0.0})
    assert step == 3 and "(since step 1; meta.guard.zero_grad_norm)" in msg


@pytest.mark.parametrize("patience", [1, 3])
def test_param_norm_ratio_trips_at_patience(patience):
    g = guard(patience=patience)
    # the start is the norm at the first step; 10x exactly is still allowed, above it is not
    norms = {1: 20.0, 2: 100.0, 3: 200.0, 4: 200.5, 5: 300.0, 6: 400.0, 7: 500.0}
    step, msg = trips_at(g, row, last=7, norms=norms.get)
    assert step == 4 + patience - 1
    assert re.fullmatch(rf"diverged at step {step}: the weights' norm grew to {norms[step]:.4g}, "
                        rf"{norms[step] / 20:.3g}x its start 20 \(limit 10x\) for {patience} steps \(since step 4; "
                        r"train\.guard\.param_norm_ratio\); last good checkpoint: none \(start over\)", msg), msg


def test_param_norm_start_is_the_first_norm_seen():
    g = guard()
    feed(g, range(1, 4))  # no norm logged yet
    feed(g, range(4, 6), norms=lambda s: {4: 1.0, 5: 11.0}[s])
    assert g.start_norm == 1.0
    g.check(6, row(6), 11.0)
    with pytest.raises(DivergenceError, match="since step 5"):
        g.check(7, row(7), 11.0)


def test_reward_floor_trips_only_after_having_been_above_it():
    g = guard(floor=0.0)
    # at the floor from the start: a task too hard, not a collapse
    feed(g, range(1, 20), reward_mean=0.0, zero_std_frac=1.0)
    assert not g.streaks
    feed(g, [20], reward_mean=0.1)
    feed(g, [21, 22], reward_mean=1e-12, zero_std_frac=1.0)  # within rounding of the floor
    with pytest.raises(DivergenceError) as e:
        g.check(23, row(23, reward_mean=0.0, zero_std_frac=1.0))
    assert str(e.value) == ("diverged at step 23: the mean rollout reward fell to its floor 0 after having been above "
                            "it for 3 steps (since step 21; train.guard.reward_floor); last good checkpoint: "
                            "none (start over)")


def test_reward_floor_of_a_negated_reward():
    g = guard(floor=-2.0)
    step, msg = trips_at(g, lambda s: row(s, reward_mean=-1.0 if s < 3 else -2.0))
    assert step == 5 and "fell to its floor -2 after" in msg and "(since step 3;" in msg


@pytest.mark.parametrize("condition", ["zero_grad", "param_norm", "reward_floor"])
def test_a_broken_streak_starts_over(condition):
    bad = {"zero_grad": {"grad_norm": 0.0}, "param_norm": {}, "reward_floor": {"reward_mean": 0.0}}[condition]
    held = {2, 3, 5, 6, 8, 9, 10}  # streaks of 2, 2, then 3 (patience 3)
    norms = (lambda s: 1000.0 if s in held else 5.0) if condition == "param_norm" else (lambda s: 5.0)
    g = guard()
    step, msg = trips_at(g, lambda s: row(s, **(bad if s in held else {})), norms=norms)
    assert step == 10 and f"for 3 steps (since step 8; train.guard.{DivergenceGuard.KEYS[condition]})" in msg


@pytest.mark.parametrize("condition", ["zero_grad", "param_norm", "reward_floor"])
def test_a_null_setting_switches_its_condition_off(condition):
    off = {"zero_grad": {"zero_grad_norm": None}, "param_norm": {"param_norm_ratio": None},
           "reward_floor": {"reward_floor": False}}[condition]
    bad = {"zero_grad": {"grad_norm": 0.0}, "param_norm": {}, "reward_floor": {"reward_mean": 0.0}}[condition]
    norms = (lambda s: 1.0 if s == 1 else 1e6) if condition == "param_norm" else None
    rows = lambda s: row(s, **(bad if s > 1 else {}))
    g = guard(**off)
    for s in range(1, 30):
        g.check(s, rows(s), None if norms is None else norms(s))
    assert not g.streaks
    step, msg = trips_at(guard(), rows, norms=norms)  # on (the default): it trips
    assert step == 4 and DivergenceGuard.KEYS[condition] in msg


def test_no_reward_floor_without_a_floor():
    """FOMAML passes no floor (GuardSettings has no reward_floor switch)."""
    g = DivergenceGuard(GuardSettings(), None, "meta.guard")
    g.check(1, {"step": 1, "loss": 1.0, "grad_norm": 1.0, "reward_mean": 1.0})
    for s in range(2, 20):
        g.check(s, {"step": s, "loss": 1.0, "grad_norm": 1.0, "reward_mean": -1e9})
    g = DivergenceGuard(RLGuardSettings(), None)
    for s in range(1, 20):
        g.check(s, row(s, reward_mean=0.5 if s == 1 else 0.0, zero_std_frac=1.0))


def test_a_healthy_run_trips_nothing():
    g = guard()
    for s in range(1, 200):
        g.check(s, row(s, grad_norm=0.2 + 0.1 * math.sin(s), reward_mean=min(1.0, 0.01 * s),
                       zero_std_frac=(s % 5) / 4), 20.0 * (1 + 0.04 * s))  # the norm grows, to 9x its start
        g.record_checkpoint(s, f"missing/{s}")
    assert not g.streaks


# -- the checkpoint named -----------------------------------------------------------------------

def test_names_the_newest_checkpoint_before_the_streak_began(ckpts):
    g = guard()
    # param_norm holds from step 4; a checkpoint is written after every step that passed (4 and 5 included)
    norms = lambda s: 10.0 if s < 4 else 500.0
    feed(g, range(1, 6), norms=norms, record=ckpts)
    with pytest.raises(DivergenceError) as e:
        g.check(6, row(6), 500.0)
    assert str(e.value).endswith(f"(since step 4; train.guard.param_norm_ratio); last good checkpoint: {ckpts(3)}")


def test_non_finite_names_the_checkpoint_before_the_active_streaks(ckpts):
    """A NaN during a streak that has not tripped yet: the checkpoints written since it began are not good."""
    g = guard()
    feed(g, [1, 2], norms=lambda s: 10.0, record=ckpts)
    feed(g, [3], grad_norm=0.0, norms=lambda s: 10.0, record=ckpts)  # zero_grad holds at 3, then breaks
    feed(g, [4, 5], norms=lambda s: 500.0, record=ckpts)  # param_norm holds from 4
    with pytest.raises(NonFiniteMetricError) as e:
        g.check(6, row(6, loss=math.nan), 500.0)
    assert str(e.value) == f"non-finite loss at step 6: loss=nan; last good checkpoint: {ckpts(3)}"
    # both active: the earlier one's start counts
    g = guard()
    feed(g, [1, 2], norms=lambda s: 10.0, record=ckpts)
    feed(g, [3], grad_norm=0.0, norms=lambda s: 10.0, record=ckpts)
    feed(g, [4], grad_norm=0.0, norms=lambda s: 500.0, record=ckpts)
    with pytest.raises(NonFiniteMetricError, match=f"last good checkpoint: {re.escape(str(ckpts(2)))}$"):
        g.check(5, row(5, grad_norm=math.inf), 500.0)


def test_skips_non_finite_and_missing_checkpoints(ckpts, tmp_path):
    import torch
    from safetensors.torch import save_file

    nan_weights = ckpts(4)
    save_file({"w": torch.tensor([1.0, float("nan")])}, str(nan_weights / "model.safetensors"))
    good = ckpts(3)
    save_file({"w": torch.tensor([1.0, 2.0])}, str(good / "model.safetensors"))
    assert checkpoints.weights_finite(nan_weights) is False and checkpoints.weights_finite(good) is True
    assert checkpoints.weights_finite(ckpts(1)) is None  # no safetensors (FOMAML's DCP shards): not refused

    g = guard(verify=checkpoints.weights_finite)
    g.record_checkpoint(1, ckpts(1))
    g.record_checkpoint(2, ckpts(2), weights_finite=False)  # known bad when it was written
    g.record_checkpoint(3, good)
    g.record_checkpoint(4, nan_weights)  # bad on disk (checked again before it is named)
    g.record_checkpoint(5, tmp_path / "checkpoints" / "5")  # pruned or never written
    assert g.good_checkpoint(6) == str(good)
    assert g.good_checkpoint(3) == str(ckpts(1))  # 2 was recorded as not finite
    assert g.good_checkpoint(1) is None
    with pytest.raises(NonFiniteMetricError, match=f"last good checkpoint: {re.escape(str(good))}$"):
        g.check(6, row(6, loss=math.nan))
    (good / "model.safetensors").unlink()
    (good.parent / "1").rename(good.parent / "gone")
    with pytest.raises(NonFiniteMetricError, match=r"last good checkpoint: .*checkpoints/3$"):
        g.check(6, row(6, loss=math.nan))  # no weights file left: weights_finite says None, not False
    import shutil

    shutil.rmtree(good)
    with pytest.raises(NonFiniteMetricError, match=r"last good checkpoint: none \(start over\)$"):
        g.check(6, row(6, loss=math.nan))


# -- a resumed run continues the guard ------------------------------------------------------------

def test_state_restore_round_trip(ckpts):
    a = guard()
    a.check(1, row(1, reward_mean=0.5), 10.0)  # above the floor; the start norm
    a.record_checkpoint(1, ckpts(1))
    a.check(2, row(2, reward_mean=0.0, zero_std_frac=1.0), 50.0)
    a.record_checkpoint(2, ckpts(2))
    a.check(3, row(3, reward_mean=0.0, zero_std_frac=1.0), 150.0)  # param_norm holds from 3
    a.record_checkpoint(3, ckpts(3))
    state = json.loads(json.dumps(a.state()))  # as saved in a checkpoint
    assert state["start_norm"] == 10.0 and state["seen_above_floor"] is True
    assert state["streaks"] == {"reward_floor": {"first": 2, "length": 2}, "param_norm": {"first": 3, "length": 1}}
    b = guard()
    b.restore(state)
    assert b.state() == a.state()

    messages = []
    for g in (a, b):
        with pytest.raises(DivergenceError) as e:
            g.check(4, row(4, reward_mean=0.0, zero_std_frac=1.0), 150.0)
        messages.append(str(e.value))
    assert messages[0] == messages[1] == (
        "diverged at step 4: the mean rollout reward fell to its floor 0 after having been above it for 3 steps "
        f"(since step 2; train.guard.reward_floor); last good checkpoint: {ckpts(1)}")
    fresh = guard()  # without the restored state nothing is known: no trip
    fresh.check(4, row(4, reward_mean=0.0, zero_std_frac=1.0), 150.0)
    assert fresh.start_norm == 150.0 and not fresh.streaks

    c = guard()
    c.restore({})  # a checkpoint written before the guard existed
    assert c.state() == guard().state()


def test_the_message_names_where_the_settings_live():
    g = DivergenceGuard(GuardSettings(patience=1), None, "meta.guard")
    g.check(1, {"step": 1, "grad_norm": 1.0}, 2.0)
    with pytest.raises(DivergenceError, match=r"^diverged at step 2: the weights' norm grew to 100, 50x its start 2 "
                                              r"\(limit 10x\) for 1 steps \(since step 2; meta\.guard\."
                                              r"param_norm_ratio\); last good checkpoint: none \(start over\)$"):
        g.check(2, {"step": 2, "grad_norm": 1.0}, 100.0)


def test_the_baseline_is_the_norm_before_the_first_update():
    """``begin`` (called by every trainer before its loop): a run whose first update already blew the weights
    up trips param_norm from step 1; without it, the blown-up norm would become the baseline."""
    g = guard(**{**ALL_OFF, "param_norm_ratio": 10.0})
    g.begin(1.0)
    g.check(1, row(1), 50.0)
    g.check(2, row(2), 60.0)
    with pytest.raises(DivergenceError, match=r"50x its start 1 .*since step 1"):
        g.check(3, row(3), 50.0)
    resumed = guard(**{**ALL_OFF, "param_norm_ratio": 10.0})
    resumed.restore({"start_norm": 2.0})
    resumed.begin(40.0)  # a resumed run keeps the baseline of its first run
    assert resumed.start_norm == 2.0


def test_pruning_spares_the_checkpoint_the_guard_would_name(tmp_path):
    """While a condition holds, the last good checkpoint may be older than the ``keep`` newest ones."""
    g = guard(**{**ALL_OFF, "param_norm_ratio": 10.0})
    g.begin(1.0)
    for step, norm in ((1, 1.0), (2, 20.0), (3, 20.0)):
        g.check(step, row(step), norm)
        (tmp_path / str(step)).mkdir()
        g.record_checkpoint(step, tmp_path / str(step))
        checkpoints.prune(tmp_path, 1, spare=g.protected())
    assert g.since() == 2 and g.protected() == [str(tmp_path / "1")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "3"]
    g.check(4, row(4), 1.0)  # the condition no longer holds: nothing to spare
    checkpoints.prune(tmp_path, 1, spare=g.protected())
    assert g.protected() == [] and sorted(p.name for p in tmp_path.iterdir()) == ["3"]
