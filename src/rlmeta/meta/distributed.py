"""Process layout for FOMAML under torchrun: task-parallel groups x FSDP2 shard groups.

The ``world`` ranks form a device mesh ``(task, shard)`` of shape ``(world // S, S)``.
Each row of ``S`` ranks holds one FSDP2-sharded copy of the model (``fully_shard`` over
each decoder layer, then the root, or the root alone: ``meta.fsdp_units``; on the ``shard``
sub-mesh) and adapts its share of the meta-batch; rows meet once per outer step to sum the meta-gradient. ``S = 1``
(the default) is pure task parallelism; ``S = world`` is plain FSDP with every task's
batches split over all ranks. Fast weights are the ranks' local shards, updated in place.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    """Where this process sits; the collectives are no-ops when not distributed."""

    rank: int = 0
    world: int = 1
    task_groups: int = 1
    task_rank: int = 0
    shard_size: int = 1
    shard_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: object = None

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _sum(self, t: torch.Tensor, dim: str | None) -> torch.Tensor:
        if self.distributed:
            group = self.mesh.get_group(dim) if dim else None
            on_dev = t.to(self.device)  # NCCL reduces device tensors only
            dist.all_reduce(on_dev, op=dist.ReduceOp.SUM, group=group)
            if on_dev is not t:
                t.copy_(on_dev)
        return t

    def shard_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum in place over the ranks that share one model copy."""
        return self._sum(t, "shard") if self.shard_size > 1 else t

    def task_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum in place over the task-parallel groups (one rank per group)."""
        return self._sum(t, "task") if self.task_groups > 1 else t

    def world_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum in place over every rank."""
        return self._sum(t, None)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def exit_with_launcher(poll_s: float = 1.0) -> bool:
    """Under torchrun, end this worker when its launcher dies.

    torchrun starts workers in a session of their own, so a SIGKILL of the job's process group (a
    killed Snakemake, ``scancel`` of a step) ends the launcher but not them: they would go on writing
    checkpoints into a directory whose lock has been removed. A daemon thread polls the parent PID
    (PR_SET_PDEATHSIG would fire when the parent's *thread* that forked ends, not the process) and exits
    at once when the worker is orphaned; checkpoints are renamed into place whole, so none is left half
    written. Returns whether the watch was started (only under torchrun)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    import threading
    import time

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(143)  # as if SIGTERM: the launcher is gone, nobody will collect the result

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()
    return True


def init_distributed(shard_size: int = 0) -> DistContext:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA) when WORLD_SIZE > 1.

    ``shard_size`` 0 (auto) shards over all ranks on CUDA (models too big for one GPU) and
    is 1 (task-parallel) on CPU. Under torchrun the worker also ends with its launcher
    (``exit_with_launcher``)."""
    exit_with_launcher()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return DistContext(device=torch.device("cuda" if cuda else "cpu"))
    from torch.distributed.device_mesh import init_device_mesh

    shard_size = shard_size or (world if cuda else 1)

    if shard_size < 1 or world % shard_size:
        raise ValueError(f"--shard-size {shard_size} must divide the world size {world}")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    dev = "cuda" if cuda else "cpu"
    mesh = init_device_mesh(dev, (world // shard_size, shard_size), mesh_dim_names=("task", "shard"))
    return DistContext(rank=dist.get_rank(), world=world, task_groups=world // shard_size,
                       task_rank=mesh.get_local_rank("task"), shard_size=shard_size,
                       shard_rank=mesh.get_local_rank("shard"),
                       device=torch.device(dev, local) if cuda else torch.device("cpu"), mesh=mesh)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (the ``ModuleList`` whose name ends in ``layers``; peft-wrapped too)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.endswith("layers"):
            return list(mod)
    raise ValueError("model has no '*layers' ModuleList to shard")


def resolve_units(units: str, ctx: DistContext) -> str:
    """``meta.fsdp_units`` with auto resolved: layers on CUDA, model on the CPU."""
    if units == "auto":
        return "layers" if ctx.device.type == "cuda" else "model"
    if units not in ("layers", "model"):
        raise ValueError(f"meta.fsdp_units {units!r}: allowed auto, layers, model")
    return units


def shard_model(model: nn.Module, ctx: DistContext, bf16: bool = False, units: str = "auto") -> nn.Module:
    """FSDP2 ``fully_shard`` on the shard sub-mesh: over each decoder layer, then the root (``units``
    "layers"), or over the root alone ("model"); "auto" is layers on CUDA, model on the CPU.

    Per-layer units keep one layer unsharded at a time (the layout for models that need sharding);
    every unit costs an all-gather per forward and backward and a reduce-scatter per backward, and gloo on
    the CPU is latency-bound (~3 ms per collective for the tiny model), so there one unit scales better
    (docs/benchmarks.md). Gradients are summed (not averaged) over the shard group: the loss is already
    divided by the whole batch's token count. The root reshards after forward too, so a forward without
    backward never leaves stale unsharded weights behind the in-place fast-weight updates.
    """
    if not ctx.distributed:
        return model
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    units = resolve_units(units, ctx)
    mesh = ctx.mesh["shard"]
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())
    for layer in decoder_layers(model) if units == "layers" else ():
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    for mod in model.modules():
        if isinstance(mod, FSDPModule):
            mod.set_gradient_divide_factor(1.0)
            mod.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return model


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's local shard of a DTensor (a view: in-place changes reach the parameter), else ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_state_dict(model: nn.Module, ctx: DistContext) -> dict:
    """The full (unsharded) state dict on CPU at rank 0; empty on other ranks."""
    if not ctx.distributed:
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def destroy(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def save_resume(path, model: nn.Module, optimizer, ctx: DistContext, state: dict, metrics) -> None:
    """Write a resumable checkpoint folder atomically: DCP shards of model and optimizer, each rank's
    torch RNG state, ``state.json`` (step, scheduler, spec), the metrics rows so far (a ``MetricsTable``)
    and, last, the completion marker; then rename it into place."""
    import json
    import shutil
    from pathlib import Path

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from rlmeta import checkpoints
    from rlmeta.tracking import METRICS_FILE

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ctx.barrier()
    msd, osd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp), no_dist=not ctx.distributed)
    torch.save(torch.get_rng_state(), tmp / f"rng_{ctx.rank}.pt")
    ctx.barrier()
    if ctx.is_main:
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        metrics.write(tmp / METRICS_FILE)
        checkpoints.write_marker(tmp, step=state["step"], kind="fomaml")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    ctx.barrier()


def load_resume(path, model: nn.Module, optimizer, ctx: DistContext) -> dict:
    """Load a ``save_resume`` folder into the (sharded) model and optimizer; returns its state."""
    import json
    from pathlib import Path

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, checkpoint_id=str(path), no_dist=not ctx.distributed)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    rng = path / f"rng_{ctx.rank}.pt"
    if rng.exists():
        torch.set_rng_state(torch.load(rng))
    return json.loads((path / "state.json").read_text())
