"""LoRA adapters on both backends and merging them into a full checkpoint.

torch: peft (``LoraConfig`` + ``get_peft_model``; adapters saved as ``adapter_config.json`` +
``adapter_model.safetensors``; merged with ``merge_and_unload``). MLX: mlx-lm
(``linear_to_lora_layers``; adapters saved as ``adapter_config.json`` + ``adapters.safetensors``,
which ``mlx_lm.load(adapter_path=...)`` reads; merged with ``LoRALinear.fuse``). The config's
``lora`` block (``rlmeta.settings.LoraSettings``) drives both; scaling is alpha / r on both.
"""
from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path

from rlmeta.settings import LoraSettings

MLX_ADAPTER = "adapters.safetensors"
PEFT_ADAPTER = "adapter_model.safetensors"


def peft_config(cfg: LoraSettings):
    """``peft.LoraConfig`` of a ``lora`` block (the torch trainers and FOMAML share it)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")


def adapter_backend(path: str | Path) -> str:
    """``mlx`` or ``torch``: which backend wrote the adapter folder."""
    path = Path(path)
    if (path / MLX_ADAPTER).exists():
        return "mlx"
    if (path / PEFT_ADAPTER).exists() or (path / "adapter_model.bin").exists():
        return "torch"
    raise FileNotFoundError(f"{path}: no {MLX_ADAPTER} or {PEFT_ADAPTER}")


def apply_lora(policy, cfg: LoraSettings, seed: int = 0):
    """Wrap the policy's model with fresh LoRA adapters (in place); returns the policy.

    Base weights are frozen; only the adapters train. B starts at zero, so outputs are unchanged.
    """
    if policy.backend == "torch":
        import torch
        from peft import get_peft_model

        torch.manual_seed(seed)
        policy.model = get_peft_model(policy.model, peft_config(cfg))
    else:
        import mlx.core as mx
        from mlx_lm.tuner.utils import linear_to_lora_layers

        mx.random.seed(seed)
        policy.model.freeze()
        linear_to_lora_layers(policy.model, len(policy.model.layers), _mlx_params(policy.model, cfg))
        policy.lora = cfg
    return policy


@contextmanager
def mlx_adapters_off(model):
    """Inside the block every mlx-lm LoRA layer has scale 0, so the model computes the base's outputs exactly
    (``y + 0 * z``): the KL reference of a LoRA run without a second copy of the weights."""
    layers = [m for _, m in model.named_modules() if type(m).__name__ == "LoRALinear"]
    scales = [m.scale for m in layers]
    for m in layers:
        m.scale = 0.0
    try:
        yield
    finally:
        for m, scale in zip(layers, scales):
            m.scale = scale


def _mlx_params(model, cfg: LoraSettings) -> dict:
    """mlx-lm ``lora_parameters``: keys are module paths inside a layer ending in a target name."""
    targets = set(cfg.target_modules)
    keys = sorted({name for name, _ in model.layers[0].named_modules() if name.split(".")[-1] in targets})
    if not keys:
        from rlmeta.errors import UserError

        raise UserError(f"lora.target_modules {sorted(targets)}: no such module in the model's layers")
    return {"rank": cfg.r, "scale": cfg.alpha / cfg.r, "dropout": cfg.dropout, "keys": keys}


def save_adapter(policy, path: str | Path) -> Path:
    """Write only the adapter weights and config (atomic), in the backend's own format."""
    from rlmeta.io import atomic_dir

    with atomic_dir(path) as tmp:
        if policy.backend == "torch":
            policy.model.save_pretrained(tmp)
        else:
            import mlx.core as mx
            from mlx.utils import tree_flatten

            weights = {k: v for k, v in tree_flatten(policy.model.parameters())
                       if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}
            mx.save_safetensors(str(tmp / MLX_ADAPTER), weights)
            config = {"fine_tune_type": "lora", "num_layers": len(policy.model.layers),
                      "lora_parameters": _mlx_params(policy.model, policy.lora),
                      "rlmeta_lora": policy.lora.model_dump()}
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(path)


def load_adapter(policy, path: str | Path):
    """Attach a saved adapter, trainable, base frozen (in place; same backend as the one that wrote it)."""
    backend = adapter_backend(path)
    if backend != policy.backend:
        raise ValueError(f"{path} holds a {backend} adapter; load the policy with backend={backend}")
    if backend == "torch":
        from peft import PeftModel

        policy.model = PeftModel.from_pretrained(policy.model, str(path), is_trainable=True)
    else:
        from mlx_lm.tuner.utils import load_adapters

        policy.model.freeze()
        load_adapters(policy.model, str(path))
        saved = json.loads((Path(path) / "adapter_config.json").read_text()).get("rlmeta_lora")
        policy.lora = LoraSettings.model_validate(saved) if saved else None
    policy.model.eval()
    return policy


def mlx_merged_weights(model) -> dict:
    """HF-named weights of an MLX model with every LoRA layer fused in; the model is unchanged."""
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.parameters()))
    for name, module in model.named_modules():
        if hasattr(module, "fuse") and hasattr(module, "lora_a"):
            fused = module.fuse()
            for leaf in ("linear.weight", "linear.bias", "lora_a", "lora_b"):
                weights.pop(f"{name}.{leaf}", None)
            weights[f"{name}.weight"] = fused.weight
            if "bias" in fused:
                weights[f"{name}.bias"] = fused.bias
    return weights


def merge_lora(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Base checkpoint + adapter -> full checkpoint in the shared format (atomic)."""
    from rlmeta.policy import load_policy

    policy = load_policy(model_dir, adapter_backend(adapter_dir), lora=adapter_dir, dtype=dtype)
    return policy.save(out_dir)


def command(p: argparse.ArgumentParser):
    """``rlmeta merge-lora``: base checkpoint + adapter (peft or mlx-lm) -> a full portable checkpoint."""
    from rlmeta.cli import existing_dir, model_ref

    p.add_argument("--model", required=True, type=model_ref, help="base checkpoint folder (or hub id)")
    p.add_argument("--adapter", required=True, type=existing_dir,
                   help="adapter folder (written by rlmeta.policy.lora.save_adapter)")
    p.add_argument("--out", required=True, help="output checkpoint folder (replaced atomically)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return lambda a: print(merge_lora(a.model, a.adapter, a.out, a.dtype))
