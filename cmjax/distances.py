"""Distances d(a, b) → [B] of the consistency objectives, selected by `config.method.<name>.distance`.

A leaf: it imports nothing from cmjax. The distances with a network (LPIPS' VGG16) live with the metrics and
are named here lazily, "module:function" like the model registry, so importing this module loads no network
and nothing registers itself at import. Such a distance is `fn(params, a, b)`; its weights come from
`load_params(name, path)` and enter the train step as an argument, never as a constant.
"""
from __future__ import annotations

import importlib
import math
from typing import Callable

import jax.numpy as jnp

from cmjax import errors


def l2_distance(a, b):
    """Mean squared error per sample (openai `mean_flat((a − b)²)`)."""
    return jnp.mean(jnp.square(a - b).reshape(a.shape[0], -1), axis=1)


def l1_distance(a, b):
    """Mean absolute error per sample."""
    return jnp.mean(jnp.abs(a - b).reshape(a.shape[0], -1), axis=1)


def pseudo_huber_distance(a, b, c):
    """√(‖a − b‖² + c²) − c over the whole sample (iCT §3.3). c = 0 is the plain L2 norm (ECT CIFAR-10);
    the floor inside the square root keeps its gradient finite where a = b.
    """
    squared_norm = jnp.sum(jnp.square(a - b).reshape(a.shape[0], -1), axis=1)
    return jnp.sqrt(jnp.maximum(squared_norm + c**2, 1e-20)) - c


def ict_huber_c(sample_shape) -> float:
    """c = 0.00054·√d, d the data dimension (iCT §3.3: 0.03 for CIFAR-10's d = 3072)."""
    return 0.00054 * math.sqrt(math.prod(sample_shape))


# name -> "module:function" of fn(a, b) or, for a distance with a network, fn(params, a, b).
_DISTANCES: dict[str, str | Callable] = {
    "l2": "cmjax.distances:l2_distance",
    "l1": "cmjax.distances:l1_distance",
    "pseudo_huber": "cmjax.distances:pseudo_huber_distance",
    "lpips": "cmjax.metrics.lpips:lpips_maxpool_training_distance",  # CM CIFAR-10 (JAX release): max pooling
    "lpips_avgpool": "cmjax.metrics.lpips:lpips_avgpool_training_distance",  # piq replace_pooling=True
}
# name -> "module:function" `load(path or None) -> params` of the distances with a network.
_WEIGHT_LOADERS: dict[str, str | Callable] = {
    "lpips": "cmjax.metrics.lpips:load_params",
    "lpips_avgpool": "cmjax.metrics.lpips:load_params",
}


def names() -> list[str]:
    return sorted(_DISTANCES)


def register(name: str, fn: str | Callable, *, load_params: str | Callable | None = None) -> None:
    """Adds a distance by name (an explicit call, e.g. from a test or a user's script; nothing calls it at
    import). `fn` and `load_params` are callables or "module:function" strings."""
    _DISTANCES[name] = fn
    if load_params is not None:
        _WEIGHT_LOADERS[name] = load_params


def _resolve(entry: str | Callable, name: str) -> Callable:
    if callable(entry):
        return entry
    module_name, function_name = entry.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise errors.ConfigError(f"distance {name!r} needs {module_name}, which this installation lacks ({err}); "
                         f"use one of {names()}.") from err
    return getattr(module, function_name)


def _check(name: str) -> None:
    if name not in _DISTANCES:
        raise errors.ConfigError(f"Unknown distance {name!r}; choose one of {names()}.")


def has_network(name: str) -> bool:
    """Whether distance `name` carries network weights (which the train step takes as an argument)."""
    _check(name)
    return name in _WEIGHT_LOADERS


def load_params(name: str, path: str | None = None):
    """The network weights distance `name` needs (read from `path`, else its default file); None for the
    distances without a network (l2, l1, pseudo_huber)."""
    if not has_network(name):
        return None
    return _resolve(_WEIGHT_LOADERS[name], name)(path)


def get(name: str, sample_shape, huber_c: float | None = None, params=None) -> Callable:
    """Distance `name` as `fn(a, b) -> [B]`: pseudo-Huber with `huber_c` (None: iCT's c for `sample_shape`),
    a distance with a network with its weights `params` bound."""
    _check(name)
    fn = _resolve(_DISTANCES[name], name)
    if has_network(name):
        if params is None:
            raise errors.ConfigError(f"distance {name!r} needs its network weights as distance_params (training "
                             "loads them from config.distance_weights).")
        return lambda a, b: fn(params, a, b)
    if name == "pseudo_huber":
        c = ict_huber_c(sample_shape) if huber_c is None else huber_c
        return lambda a, b: fn(a, b, c)
    return fn
