"""TrainState: step, parameters, optimizer state, EMA copies by rate, the target network; and its pure update.

The state is one explicit pytree, so `jax.jit(create, out_shardings=sharding.state_shardings(...))` creates it
already sharded and the train step donates it whole. Skipping a non-finite step is a `lax.cond` inside the same
compiled program, never a Python branch on a device value.

Step counting: `step` counts every call of `apply_gradients`, skipped or not, so the data stream and the RNG
(`fold_in(seed, step)`) advance the same way whether or not a step was skipped. The optimizer's own count, and
with it the learning-rate schedule and Adam's bias correction, counts only applied updates:
`updates_applied(state) = step - skipped_steps`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax


class TrainState(flax.struct.PyTreeNode):
    """Everything a training step reads and writes; every field is a pytree of arrays (target may be None)."""

    step: jax.Array  # int32 scalar: train steps taken, skipped ones included
    params: Any  # online network θ (float32, unboxed)
    opt_state: optax.OptState
    ema: dict[str, Any]  # ema_key(rate) -> EMA copy of θ, for evaluation
    target_params: Optional[Any]  # θ⁻ for ct/cd (target EMA); None when the method has no target network
    nonfinite_steps: jax.Array  # int32 scalar: consecutive steps skipped for a non-finite loss or gradient
    skipped_steps: jax.Array  # int32 scalar: all steps skipped so far


def ema_key(rate: Union[float, str]) -> str:
    """The dict key of an EMA rate: its shortest round-trip decimal ("0.9999", "0.99993"; float32 rates alike)."""
    if isinstance(rate, str):
        try:
            rate = float(rate)
        except ValueError:
            raise ValueError(f"EMA rate {rate!r} is not a number; rates look like 0.9999.") from None
    if not isinstance(rate, (float, int, np.floating, np.integer)) or not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"EMA rate {rate!r} must be a number in [0, 1); 0.9999 keeps a long average, 0 copies θ.")
    # Shortest digits at the rate's own precision, so np.float32(0.9999) and 0.9999 share one key.
    return np.format_float_positional(rate if isinstance(rate, np.floating) else float(rate), trim="-")


def _copy(tree: Any) -> Any:
    # Distinct buffers, so the whole state can be donated even when `create` runs eagerly.
    return jax.tree.map(jnp.copy, tree)


def create(params: Any, optimizer: optax.GradientTransformation, ema_rates: Sequence[float], keep_target: bool,
           ema_start: Any = None) -> TrainState:
    """A fresh state at step 0; the target starts equal to θ, every EMA copy equal to θ or, when given, to
    `ema_start` (a student starting from a teacher: θ = its online weights, EMAs = its EMA). Accepts boxed or
    plain params."""
    params = nn.meta.unbox(params)  # `module.init` returns nn.Partitioned boxes; the state holds plain arrays
    ema_start = params if ema_start is None else nn.meta.unbox(ema_start)
    keys = [ema_key(rate) for rate in ema_rates]
    if len(set(keys)) != len(keys):
        raise ValueError(f"EMA rates {list(ema_rates)} repeat a rate; list each rate once.")
    # Three separate zeros, not one shared buffer, so that an eagerly created state can be donated.
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema={key: _copy(ema_start) for key in keys},
        target_params=_copy(params) if keep_target else None,
        nonfinite_steps=jnp.zeros((), jnp.int32),
        skipped_steps=jnp.zeros((), jnp.int32),
    )


def _ema_update(average: Any, params: Any, rate, complement) -> Any:
    """average ← rate·average + complement·params with complement = 1 − rate, in float32."""
    rate, complement = jnp.asarray(rate, jnp.float32), jnp.asarray(complement, jnp.float32)
    return jax.tree.map(
        lambda a, p: (rate * a.astype(jnp.float32) + complement * p.astype(jnp.float32)).astype(a.dtype),
        average,
        params,
    )


def _all_finite(loss, grads) -> jax.Array:
    finite = jnp.all(jnp.isfinite(jnp.asarray(loss)))
    for g in jax.tree.leaves(grads):
        finite = finite & jnp.all(jnp.isfinite(g))
    return finite


def apply_gradients(
    state: TrainState,
    grads: Any,
    optimizer: optax.GradientTransformation,
    *,
    target_ema: Optional[Any] = None,
    loss: Any,
) -> TrainState:
    """One optimizer step, then EMA and target updates from the new θ (CM Alg. 3); skipped if anything is non-finite.

    `target_ema` is μ(k) (a traced float32 is fine) and is required when the state keeps a target network.
    A non-finite `loss` or gradient leaves params, opt_state, EMA and target as they were, adds one to
    `nonfinite_steps` and `skipped_steps`; a finite step resets `nonfinite_steps` to 0. `step` always advances.
    """
    if state.target_params is not None and target_ema is None:
        raise ValueError(
            "This state keeps a target network (ct/cd), so apply_gradients needs target_ema=μ(k) "
            "(e.g. from cmjax.schedules); pass target_ema=0.0 to copy θ into the target."
        )
    grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads)
    finite = _all_finite(loss, grads)
    mu = None if state.target_params is None else jnp.asarray(target_ema, jnp.float32)

    def updated():
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # (1 − r) from the exact decimal key: float32(1 − 0.9999) keeps digits that 1 − float32(0.9999) loses.
        ema = {key: _ema_update(average, params, float(key), 1.0 - float(key)) for key, average in state.ema.items()}
        target = None if mu is None else _ema_update(state.target_params, params, mu, 1.0 - mu)
        return params, opt_state, ema, target

    def unchanged():
        return state.params, state.opt_state, state.ema, state.target_params

    # A branch inside the program, not in Python: one executable for finite and skipped steps, and NaNs from a
    # bad gradient never reach the state. (Per-leaf jnp.where selects compile several times slower on CPU.)
    params, opt_state, ema, target = jax.lax.cond(finite, updated, unchanged)
    return state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        ema=ema,
        target_params=target,
        nonfinite_steps=jnp.where(finite, 0, state.nonfinite_steps + 1).astype(jnp.int32),
        skipped_steps=(state.skipped_steps + jnp.where(finite, 0, 1)).astype(jnp.int32),
    )


def ema_params(state: TrainState, rate: Union[float, str]) -> Any:
    """The EMA copy of θ kept at `rate` (a float or its key string)."""
    key = ema_key(rate)
    if key not in state.ema:
        raise KeyError(
            f"No EMA copy at rate {key}; this state keeps rates {sorted(state.ema)}. Add the rate to the "
            "config's EMA rates before training, or evaluate one of these."
        )
    return state.ema[key]


def updates_applied(state: TrainState) -> jax.Array:
    """Optimizer updates actually applied (step minus skipped steps): the step to give `learning_rate_fn` for logs."""
    return state.step - state.skipped_steps
