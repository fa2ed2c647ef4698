"""Learning-rate schedules from the libraries, one warm-up convention on both backends.

torch: transformers' ``get_scheduler`` (what TRL and the Trainer use). MLX: ``mlx.optimizers``'
``linear_schedule``, ``cosine_decay`` and ``join_schedules``. Both give, at 0-based optimizer step
``s`` with ``W`` warm-up and ``T`` total steps: ``lr * s / W`` while ``s < W`` (so the first update
of a warm-up has lr 0), then constant, linear decay to 0 at ``T``, or half-cosine decay to
``min_lr_ratio * lr`` at ``T``. ``tests/test_schedule.py`` checks the two are equal step by step.

mlx-lm's ``build_schedule`` is not used: it joins the warm-up at step ``W + 1``, one step later
than transformers, so the same config would give different learning rates on the two backends.
"""
from __future__ import annotations

SCHEDULES = ("constant", "linear", "cosine")


def transformers_name(schedule: str, min_lr_ratio: float = 0.0) -> tuple[str, dict]:
    """(transformers ``SchedulerType`` name, its extra kwargs) of a config schedule."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {SCHEDULES}")
    if schedule == "cosine" and min_lr_ratio:
        return "cosine_with_min_lr", {"min_lr_rate": float(min_lr_ratio)}
    return {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[schedule], {}


def torch_scheduler(optimizer, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """A ``torch.optim.lr_scheduler.LambdaLR`` from transformers; call ``.step()`` after each optimizer step."""
    from transformers import get_scheduler

    name, kwargs = transformers_name(schedule, min_lr_ratio)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         scheduler_specific_kwargs=kwargs or None)


def mlx_schedule(schedule: str, learning_rate: float, warmup_steps: int, total_steps: int,
                 min_lr_ratio: float = 0.0):
    """A schedule for ``mlx.optimizers`` (pass it as ``learning_rate=``); equal to ``torch_scheduler``'s values."""
    import mlx.core as mx
    import mlx.optimizers as optim

    transformers_name(schedule, min_lr_ratio)  # validates the name
    decay_steps = max(1, total_steps - warmup_steps)
    if schedule == "constant":
        after = lambda step: mx.array(learning_rate, dtype=mx.float32)
    elif schedule == "linear":
        after = optim.linear_schedule(learning_rate, 0.0, decay_steps)
    else:
        after = optim.cosine_decay(learning_rate, decay_steps, end=learning_rate * min_lr_ratio)
    if warmup_steps <= 0:
        return after
    return optim.join_schedules([optim.linear_schedule(0.0, learning_rate, warmup_steps), after], [warmup_steps])
