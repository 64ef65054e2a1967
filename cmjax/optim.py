"""The optax optimizer from `config.optim`: Adam / RAdam / AdamW with warmup, inverse-sqrt or cosine decay, clipping.

One chain serves every optimizer, so every setting applies to all of them (the CM release's RAdam path dropped
warmup and clipping):

    clip_by_global_norm → scale_by_{adam,radam} → add_decayed_weights (adamw) → scale_by_learning_rate(schedule)

The schedule's step is the number of updates already applied (optax's own count, 0 for the first update), so an
update skipped for a non-finite loss does not advance warmup or decay; see `train_state.updates_applied`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cmjax import errors

OPTIMIZERS = ("adam", "radam", "adamw")
DECAYS = ("constant", "inverse_sqrt", "cosine")


def default_config() -> ml_collections.ConfigDict:
    """Every key of `config.optim`, with the settings iCT uses on CIFAR-10 (RAdam, lr 1e-4, no decay)."""
    config = ml_collections.ConfigDict()
    config.optimizer = "radam"  # "adam" | "radam" | "adamw"
    config.learning_rate = 1e-4  # peak learning rate, reached after warmup
    config.b1 = 0.9  # first-moment decay
    config.b2 = 0.999  # second-moment decay
    config.eps = 1e-8  # added to the root of the second moment
    config.weight_decay = 0.0  # decoupled weight decay, multiplied by the learning rate; adamw only
    config.warmup_steps = 0  # linear ramp of the learning rate from 0 to peak over this many updates; 0 = none
    # "constant" | "inverse_sqrt": peak / sqrt(max(step / decay_start_step, 1)) | "cosine": from peak at the end
    # of warmup to 0 at total_steps (short runs: the last, small steps sharpen 1-step samples; configs/digits.py)
    config.decay = "constant"
    config.decay_start_step = 0  # updates before inverse_sqrt decay starts (EDM2's ref_batches); > 0 for it
    config.grad_clip_norm = 0.0  # clip gradients to this global L2 norm before the moments; 0 or None = off
    return config


VALID_KEYS = tuple(default_config().keys())


def _as_dict(optim_config: Mapping[str, Any]) -> dict[str, Any]:
    to_dict = getattr(optim_config, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else dict(optim_config)


def validate(optim_config: Mapping[str, Any], total_steps: int) -> dict[str, Any]:
    """Checks `config.optim` against `default_config()`'s keys and legal values; returns it as a plain dict."""
    cfg = _as_dict(optim_config)
    unknown = sorted(set(cfg) - set(VALID_KEYS))
    if unknown:
        raise errors.ConfigError(f"Unknown optimizer setting(s) {unknown}; the valid keys are {sorted(VALID_KEYS)}.")
    missing = sorted(set(VALID_KEYS) - set(cfg))
    if missing:
        raise errors.ConfigError(
            f"Missing optimizer setting(s) {missing}; start from cmjax.optim.default_config(), which holds "
            f"every key {sorted(VALID_KEYS)}."
        )
    if cfg["optimizer"] not in OPTIMIZERS:
        raise errors.ConfigError(f"optim.optimizer={cfg['optimizer']!r} is not one of {list(OPTIMIZERS)}.")
    if cfg["decay"] not in DECAYS:
        raise errors.ConfigError(f"optim.decay={cfg['decay']!r} is not one of {list(DECAYS)}.")
    if not cfg["learning_rate"] > 0:
        raise errors.ConfigError(f"optim.learning_rate={cfg['learning_rate']} must be positive.")
    for key in ("b1", "b2"):
        if not 0.0 <= cfg[key] < 1.0:
            raise errors.ConfigError(f"optim.{key}={cfg[key]} must lie in [0, 1).")
    if not cfg["eps"] > 0:
        raise errors.ConfigError(
            f"optim.eps={cfg['eps']} must be positive (it keeps the Adam denominator away from 0).")
    if cfg["weight_decay"] < 0:
        raise errors.ConfigError(f"optim.weight_decay={cfg['weight_decay']} must be >= 0.")
    if cfg["weight_decay"] and cfg["optimizer"] != "adamw":
        raise errors.ConfigError(
            f"optim.weight_decay={cfg['weight_decay']} with optim.optimizer={cfg['optimizer']!r}: decoupled "
            "weight decay belongs to adamw; set optimizer='adamw' or weight_decay=0."
        )
    if int(total_steps) <= 0:
        raise errors.ConfigError(f"total_steps={total_steps} must be positive.")
    if cfg["warmup_steps"] < 0 or int(cfg["warmup_steps"]) != cfg["warmup_steps"]:
        raise errors.ConfigError(f"optim.warmup_steps={cfg['warmup_steps']} must be a whole number >= 0.")
    if cfg["warmup_steps"] > total_steps:
        raise errors.ConfigError(
            f"optim.warmup_steps={cfg['warmup_steps']} exceeds the {total_steps} training steps, so the learning "
            f"rate never reaches its peak; set warmup_steps <= {total_steps}."
        )
    if cfg["decay"] == "inverse_sqrt" and not cfg["decay_start_step"] > 0:
        raise errors.ConfigError(
            f"optim.decay='inverse_sqrt' needs optim.decay_start_step > 0 (got {cfg['decay_start_step']}); "
            "it is the update count where the decay begins (EDM2: 70000 at batch 2048)."
        )
    if cfg["grad_clip_norm"] is not None and cfg["grad_clip_norm"] < 0:
        raise errors.ConfigError(f"optim.grad_clip_norm={cfg['grad_clip_norm']} must be >= 0 (0 or None turns it off).")
    return cfg


def learning_rate_schedule(optim_config: Mapping[str, Any], total_steps: int) -> Callable[[Any], jax.Array]:
    """lr(k), k = updates applied: a linear warm-up from 0 to peak over `warmup_steps`, then constant, or
    cosine to 0 at `total_steps` (Loshchilov & Hutter 2017 without restarts; optax's own schedules), or
    peak / sqrt(max(k / decay_start, 1)) (inverse_sqrt, EDM2 eq. 69: optax has no such schedule, so it is
    written here), multiplied by the warm-up ramp."""
    cfg = validate(optim_config, total_steps)
    peak = float(cfg["learning_rate"])
    warmup_steps = int(cfg["warmup_steps"])
    if cfg["decay"] == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, max(int(total_steps), warmup_steps + 1))
    elif warmup_steps:  # linear_schedule holds its end value after `warmup_steps`
        schedule = optax.linear_schedule(0.0, peak, warmup_steps)
    else:
        schedule = optax.constant_schedule(peak)
    if cfg["decay"] == "inverse_sqrt":
        decay_start = float(cfg["decay_start_step"])
        warmed = schedule
        schedule = lambda step: warmed(step) / jnp.sqrt(jnp.maximum(step / decay_start, 1.0))  # noqa: E731

    def learning_rate_fn(step) -> jax.Array:
        return jnp.asarray(schedule(jnp.asarray(step, jnp.float32)), jnp.float32)

    return learning_rate_fn


def make_optimizer(
    optim_config: Mapping[str, Any], total_steps: int
) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
    """(optax chain, learning_rate_fn) from `config.optim`; `learning_rate_fn(step)` is the float32 schedule."""
    cfg = validate(optim_config, total_steps)
    learning_rate_fn = learning_rate_schedule(cfg, total_steps)
    b1, b2, eps = float(cfg["b1"]), float(cfg["b2"]), float(cfg["eps"])
    parts = []
    if cfg["grad_clip_norm"]:
        # Clip the raw gradient, before it enters the moments (as torch's clip_grad_norm_ before step()).
        parts.append(optax.clip_by_global_norm(float(cfg["grad_clip_norm"])))
    if cfg["optimizer"] == "radam":
        parts.append(optax.scale_by_radam(b1=b1, b2=b2, eps=eps))
    else:
        parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    if cfg["optimizer"] == "adamw":
        # Decoupled (Loshchilov & Hutter): the decay skips the moments and is scaled by the scheduled lr.
        parts.append(optax.add_decayed_weights(float(cfg["weight_decay"])))
    parts.append(optax.scale_by_learning_rate(learning_rate_fn))
    return optax.chain(*parts), learning_rate_fn
