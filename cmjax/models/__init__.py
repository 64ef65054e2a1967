"""Network registry: `config.model.name` selects a Linen module; the other keys of `config.model` are its fields.

Every network is called as `module.apply({"params": p}, x_bhwc, time_input_b, class_labels_b=None,
train=False, rngs={"dropout": key})` and returns an array shaped like `x_bhwc`. `time_input_b` is the
noise conditioning produced by `cmjax.parameterization.network_time_input` (250·ln σ, openai's ADM
convention: 1000·c_noise); each network documents how it embeds it.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

import flax.linen as nn

# name -> "module:Class"; imported lazily so that a heavy network costs nothing until selected.
_REGISTRY = {
    "mlp": "cmjax.models.toy:MLP",
    "unet": "cmjax.models.unet:UNet",
    "ncsnpp": "cmjax.models.ncsnpp:NCSNpp",
}


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(model_config: Mapping[str, Any]) -> nn.Module:
    """Builds the network named by `model_config["name"]` with the remaining keys as its fields."""
    cfg = dict(model_config)
    name = cfg.pop("name", None)
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model name {name!r}; choose one of {names()}.")
    module_path, cls_name = _REGISTRY[name].split(":")
    cls = getattr(importlib.import_module(module_path), cls_name)
    fields = set(getattr(cls, "__dataclass_fields__", {})) - {"parent", "name"}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise ValueError(
            f"Model {name!r} has no setting(s) {unknown}; its settings are {sorted(fields)}."
        )
    return cls(**cfg)
