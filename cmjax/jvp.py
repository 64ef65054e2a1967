"""The value of a function and its directional derivative (a Jacobian-vector product), for sCM's tangent.

sCM (Lu & Song 2024) needs dF⁻/dt along the PF-ODE: the JVP of F_θ⁻(x_t/σd, t) at (x_t, t) with tangents
(cos t·sin t·dx_t/dt, cos t·sin t). Two modes:
  "exact": `jax.jvp` (forward-mode AD; one extra forward-mode pass through the network).
  "finite_difference": the central difference (fn(p + h·v) − fn(p − h·v)) / (2h) along the tangent v, with a
      scalar step h (default `FD_STEP` = 1e-3, the value of FastGen's `jvp_finite_diff_eps`, which FastGen
      scales by |t| and applies along the noising path in float64; cmjax moves along the tangent line in
      float32). Error: O(h²) truncation plus O(ε_f32·|fn|/h) rounding. Measured on the test MLP (sCT gradient,
      largest-component error relative to the largest component): with the "trigflow" time conditioning
      (c_noise = t) 3e-5 at h = 1e-3 and 3e-4 at 1e-4; with "trigflow_edm" (c_noise = 250·ln(σd·tan t), a
      step h moves it by 250·h) 8 % at 1e-3 and 0.1 % at 1e-4 — use h = 1e-4 there. For networks without a
      forward-mode rule (custom kernels) or to check "exact".
Primals and tangents are cast to float32 whatever the network's compute dtype (sCM computes the JVP in fp32
when training in bf16). `fn` must be deterministic: pass it a fixed dropout key.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from cmjax import errors

FD_STEP = 1e-3
MODES = ("exact", "finite_difference")


def value_and_jvp(fn: Callable, primals: Sequence, tangents: Sequence, *, mode: str = "exact",
                  step: float = FD_STEP, has_aux: bool = False):
    """(fn(*primals), d/dh fn(*(p + h·v))|_{h=0}) in float32, by `mode` ("exact" or "finite_difference").
    has_aux: `fn` returns (value, aux) and the result is (value, derivative, aux), aux at the primals (for a
    network head that rides along, iMF's v-head: `jax.jvp(..., has_aux=True)` as Lyy-iiis/imeanflow imf.py)."""
    primals = tuple(jnp.asarray(p, jnp.float32) for p in primals)
    tangents = tuple(jnp.asarray(v, jnp.float32) for v in tangents)
    if len(primals) != len(tangents):
        raise ValueError(f"{len(primals)} primals but {len(tangents)} tangents.")
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    if mode == "exact":
        if has_aux:
            value, derivative, aux = jax.jvp(fn, primals, tangents, has_aux=True)
            return f32(value), f32(derivative), aux
        value, derivative = jax.jvp(fn, primals, tangents)
        return f32(value), f32(derivative)
    if mode == "finite_difference":
        value_only = (lambda *a: fn(*a)[0]) if has_aux else fn
        center = fn(*primals)
        value, aux = (center[0], center[1]) if has_aux else (center, None)
        plus = f32(value_only(*(p + step * v for p, v in zip(primals, tangents))))
        minus = f32(value_only(*(p - step * v for p, v in zip(primals, tangents))))
        derivative = (plus - minus) / (2.0 * step)
        return (f32(value), derivative, aux) if has_aux else (f32(value), derivative)
    raise errors.ConfigError(f"Unknown jvp_mode {mode!r}; choose one of {list(MODES)}.")
