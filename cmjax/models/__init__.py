"""Network registry: `config.model.name` selects a Linen module; the other keys of `config.model` are its fields.

Every network is called as `module.apply({"params": p}, x_bhwc, time_input_b, class_labels_b=None,
train=False, rngs={"dropout": key})` and returns an array shaped like `x_bhwc`. `time_input_b` is the
noise conditioning produced by `cmjax.parameterization.network_time_input` (250·ln σ, openai's ADM
convention: 1000·c_noise); each network documents how it embeds it. A two-time input [B, 2] (MeanFlow's
(t, t − r), `parameterization.meanflow_time_input`) gets each column embedded and concatenated
(`layers.embed_times`).
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmjax import errors
from cmjax.models import layers
from cmjax.models.layers import NULL_LABEL  # noqa: F401  (the null class of classifier-free guidance)

# name -> "module:Class"; imported lazily so that a heavy network costs nothing until selected.
_REGISTRY = {
    "mlp": "cmjax.models.toy:MLP",
    "unet": "cmjax.models.unet:UNet",
    "ncsnpp": "cmjax.models.ncsnpp:NCSNpp",
    "dit": "cmjax.models.dit:DiT",
    # SiT (Ma et al. 2024) is DiT's network trained as a flow on t ∈ [0, 1]: the same class, whose time input is
    # whatever the method feeds (cmjax.models.dit's docstring).
    "sit": "cmjax.models.dit:DiT",
}


# Names recipes already use for networks that do not exist yet, with what they need.
PLANNED: dict[str, str] = {}


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(model_config: Mapping[str, Any]) -> nn.Module:
    """Builds the network named by `model_config["name"]` with the remaining keys as its fields."""
    cfg = dict(model_config)
    name = cfg.pop("name", None)
    if name in PLANNED:
        raise errors.ConfigError(f"Network {name!r} is not in cmjax yet: {PLANNED[name]}")
    if name not in _REGISTRY:
        raise errors.ConfigError(f"Unknown config.model.name {name!r}; choose one of {names()}.")
    module_path, cls_name = _REGISTRY[name].split(":")
    cls = getattr(importlib.import_module(module_path), cls_name)
    fields = set(getattr(cls, "__dataclass_fields__", {})) - {"parent", "name"}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise errors.ConfigError(
            f"Model {name!r} has no setting(s) {unknown} (config.model); its settings are {sorted(fields)}."
        )
    return cls(**cfg)


# Top-level parameter names of the auxiliary heads (`logvar_head`, `velocity_head`): read only by training
# objectives, absent from a teacher an sCD student starts from (fresh there) and from exports.
AUXILIARY_HEAD_PREFIXES = ("logvar_linear", "velocity_")


def is_auxiliary_head(name: str) -> bool:
    return name.startswith(AUXILIARY_HEAD_PREFIXES)


def apply_with_heads(module: nn.Module, variables, *args, **kwargs):
    """(output, heads) of `module.apply(variables, *args, **kwargs)`: `heads` maps each auxiliary head the network
    sows to its value — "logvar" (sCM's log-variance head, `layers.logvar_head`), "velocity" (iMF's v-head,
    `layers.sow_velocity`) — and lacks the heads the network does not have."""
    out, state = module.apply(variables, *args, mutable=["intermediates"], **kwargs)
    sown = state.get("intermediates", {})
    return out, {name: sown[name][0] for name in (layers.LOGVAR, layers.VELOCITY) if name in sown}


def apply_with_logvar(module: nn.Module, variables, *args, **kwargs):
    """(output, logvar_b) of `module.apply(variables, *args, **kwargs)`: the value its log-variance head
    (`logvar_head=True`, `layers.logvar_head`) sows, or None for a network without one."""
    out, heads = apply_with_heads(module, variables, *args, **kwargs)
    return out, heads.get(layers.LOGVAR)


# ----------------------------------------------------------------------------------------------
# Network inputs of a config: shapes for `init` and `eval_shape`.


def image_shape(config) -> tuple[int, int, int]:
    """(H, W, C) of the configured dataset's images; checked against the model's own fields, if it has them."""
    from cmjax.data import datasets  # the dataset table; imported here so that networks load without TensorFlow

    shape = tuple(datasets.get_spec(config.data.name).image_shape)
    model = config.model
    if "image_size" in model and (model.image_size, model.image_size) != shape[:2] or (
            "in_channels" in model and model.in_channels != shape[2]):
        raise errors.ConfigError(
            f"Dataset {config.data.name!r} yields images {shape} but the model expects "
            f"({model.get('image_size')}, {model.get('image_size')}, {model.get('in_channels')}); set "
            "config.model.image_size / in_channels to match.")
    return shape


def sample_inputs(config, batch_size: int = 1):
    """Dummy network inputs (x, time input, labels or None) of the configured shapes; the time input is [B], or
    [B, K] for a method that conditions on K scalars (`methods.time_inputs`: MeanFlow's (t, t − r), K = 2; iMF's
    guidance-conditioned network adds (1 − 1/ω, t_min, t_max), K = 5)."""
    from cmjax import methods  # the method table; imported here so that networks load without the objectives

    x = jnp.zeros((batch_size, *image_shape(config)), jnp.float32)
    labels = jnp.zeros((batch_size,), jnp.int32) if config.model.get("num_classes") else None
    k = methods.time_inputs(config.method.name, config.method.get(config.method.name))
    return x, jnp.zeros((batch_size,) if k == 1 else (batch_size, k), jnp.float32), labels


def init_params(module, config, key):
    """Float32 parameters of `module`, logical-axis boxes removed (the rules in `sharding` read shapes)."""
    x, t, labels = sample_inputs(config)
    return nn.meta.unbox(module.init({"params": key}, x, t, labels)["params"])


def boxed_param_shapes(module, config, key):
    """Shapes of `module`'s parameters with their logical-axis boxes (what FSDP partition rules read)."""
    x, t, labels = sample_inputs(config)
    return jax.eval_shape(lambda k: module.init({"params": k}, x, t, labels)["params"], key)
