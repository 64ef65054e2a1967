"""Multi-head attention softmax(q·kᵀ/√D)·v on [B, L, H, D] arrays, by implementation; "flash" has a JVP rule.

`dot_product_attention(q, k, v, implementation=...)` is what the networks call (`attention_impl` of the UNet and
NCSN++): "xla" is `jax.nn.dot_product_attention` (the reference, the default), "cudnn" its cuDNN fused kernel
(GPU only), "flash" a Pallas flash-attention kernel (online softmax over key blocks: the L×L score matrix is
never stored) that also supports forward-mode AD, which sCM's and MeanFlow's `jax.jvp` through the network
needs (`cmjax.jvp.value_and_jvp`, mode "exact") and which fused kernels usually lack.

The JVP (a second fused pass). With S = q·kᵀ·s (s = 1/√D), P = softmax(S) row-wise and O = P·V, a tangent
(dq, dk, dv) gives dS = (dq·kᵀ + q·dkᵀ)·s and, from softmax's Jacobian diag(P) − P·Pᵀ per row,

    dO_i = Σ_j P_ij·(dS_ij·v_j + dv_j) − (Σ_j P_ij·dS_ij)·O_i.

Every sum runs over keys with the same weights P_ij = exp(S_ij − m_i)/ℓ_i as the forward pass, so one pass
over key blocks carries the running max m and denominator ℓ of the online softmax plus the accumulators
Σ p̃, Σ p̃·v (→ O), Σ p̃·dS (a scalar per row) and Σ p̃·(dS·v + dv), all rescaled by exp(m_old − m_new) when the
max moves, and divides by ℓ at the end (p̃ = exp(S − m), unnormalised). Memory stays O(L·D) per head. This is
the identity behind sCM's JVP of flash attention (Lu & Song 2024, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", arXiv:2410.11081, appendix on the JVP of flash attention — its text was not
read here, so the section is not confirmed) and rCM's FlashAttention-2 JVP kernel (Zheng et al. 2025,
arXiv:2510.08431: per its abstract a Triton kernel that fuses the tangent into the forward pass; cmjax keeps a
separate pass so that the value stays differentiable on its own).

How both `jax.jvp` and `jax.grad` compose (JAX 0.10.2; a Pallas call has no transpose rule, and `jax.jvp` of
a `custom_vjp` function is an error):
  `flash_attention` is a `custom_jvp` whose primal is the Pallas forward kernel and whose rule returns
  (flash_attention(q, k, v), tangent). The tangent is a `jax.custom_derivatives.linear_call`: the Pallas JVP
  kernel above as the linear map (dq, dk, dv) ↦ dO, with the attention backward (XLA's VJP of the reference:
  recomputes the L×L scores) as its transpose, so `jax.grad` of anything that uses the value transposes the
  linear_call instead of the kernel. The tangent is wrapped once more in a `custom_jvp` whose own rule is the
  reference's second derivative in plain XLA ops: MeanFlow differentiates the value of a `jax.jvp` with
  respect to the parameters (the tangent under stop_gradient), which differentiates the tangent pass too.
  Reverse mode is therefore correct everywhere but fused only in its forward half: the backward holds the
  L×L scores (a Pallas backward kernel is future work).

Backends: `pl.pallas_call` lowers to Mosaic on TPU and Triton on GPU; on CPU it runs in Pallas's interpret
mode (`interpret=None` picks it by the platform the program is lowered for, `lax.platform_dependent`, so a
CPU machine compiling for a TPU topology lowers the Mosaic kernel). Sequence lengths that a block does not
divide are padded and the padded keys masked. Inputs and outputs keep their dtype; scores, the softmax and
the accumulators are float32.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero, linear_call
from jax.experimental import pallas as pl

from cmjax import errors

IMPLEMENTATIONS = ("xla", "cudnn", "flash")
# Block sizes of the flash kernel along queries and keys: the MXU's 128 on TPU; clipped to the (8-rounded)
# sequence length for short sequences. Multiples of 8 (a TPU tile has 8 sublanes).
BLOCK_Q = 128
BLOCK_K = 128
_SUBLANES = 8


def check_implementation(implementation: str) -> None:
    """A ConfigError unless `implementation` is one of `IMPLEMENTATIONS` (the networks' `attention_impl`)."""
    if implementation not in IMPLEMENTATIONS:
        raise errors.ConfigError(f"attention_impl={implementation!r} is not one of {list(IMPLEMENTATIONS)} "
                                 "(config.model.attention_impl): xla is the default, flash the JVP-capable kernel.")


def dot_product_attention(q, k, v, *, implementation: str = "xla", block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
                          interpret: Optional[bool] = None):
    """softmax(q·kᵀ/√D)·v per head on q [B, Lq, H, D], k and v [B, Lk, H, D] (`jax.nn.dot_product_attention`'s
    layout), by `implementation`: "xla", "cudnn" (GPU only) or "flash" (`flash_attention`)."""
    check_implementation(implementation)
    if implementation == "xla":
        return jax.nn.dot_product_attention(q, k, v)
    if implementation == "cudnn":
        if jax.default_backend() != "gpu":
            raise errors.ConfigError(f"attention_impl='cudnn' runs cuDNN's fused kernel, which needs an NVIDIA GPU; "
                                     f"this program runs on {jax.default_backend()!r}: use 'xla' or 'flash'.")
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    return flash_attention(q, k, v, block_q=block_q, block_k=block_k, interpret=interpret)


def reference_attention(q, k, v):
    """softmax(q·kᵀ/√D)·v in float32 XLA ops (the flash kernel's derivatives and tests compare to it)."""
    f32 = jnp.float32
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(f32), k.astype(f32)) / math.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v.astype(f32)).astype(q.dtype)


class _Blocks(NamedTuple):
    block_q: int
    block_k: int
    interpret: Optional[bool]


def flash_attention(q, k, v, *, block_q: int = BLOCK_Q, block_k: int = BLOCK_K, interpret: Optional[bool] = None):
    """Flash attention (Pallas) on [B, L, H, D] with forward- and reverse-mode derivatives (module docstring)."""
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"flash_attention takes q [B, Lq, H, D] and k, v [B, Lk, H, D]; got {q.shape}, {k.shape}, "
                         f"{v.shape}.")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
    for name, value in (("block_q", block_q), ("block_k", block_k)):
        if value <= 0 or value % _SUBLANES:
            raise errors.ConfigError(f"flash attention {name}={value}: use a positive multiple of {_SUBLANES}.")
    return _flash(q, k, v, _Blocks(block_q, block_k, interpret))


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _flash(q, k, v, blocks):
    return _pallas_attention((q, k, v), None, blocks)


# Symbolic zeros: a tangent that is zero (k and v when only q moves) stays out of the linear_call's linear
# arguments, whose transpose rule requires every linear argument to be an unknown of the linearisation.
_flash.defjvp(lambda blocks, primals, tangents: _flash_jvp(blocks, primals, tangents), symbolic_zeros=True)


def _flash_jvp(blocks, primals, tangents):
    live = tuple(not isinstance(t, SymbolicZero) for t in tangents)
    # The value by a recursive call, so that an outer transformation (MeanFlow's grad of a jvp's value) sees
    # this custom_jvp again rather than the raw kernel.
    value = _flash(*primals, blocks)
    if not any(live):
        return value, jnp.zeros_like(value)
    return value, _flash_tangent(*primals, tuple(t for t in tangents if not isinstance(t, SymbolicZero)), blocks, live)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _flash_tangent(q, k, v, live_tangents, blocks, live):
    """dO, linear in the live tangents (of q, k, v where `live`): the Pallas JVP pass, transposed by the
    attention backward."""
    callee = functools.partial(_tangent_pass, blocks=blocks, live=live)
    return linear_call(callee, functools.partial(_attention_backward, live=live), (q, k, v), live_tangents)


@_flash_tangent.defjvp
def _flash_tangent_jvp(blocks, live, primals, tangents):
    # Second derivatives (the tangent pass differentiated again) in XLA ops: transposable, rarely needed; a
    # stop_gradient on the tangent makes them dead code.
    reference = functools.partial(_reference_tangent, live=live)
    return _flash_tangent(*primals, blocks, live), jax.jvp(reference, primals, tangents)[1]


def _full_tangents(primals, live_tangents, live):
    it = iter(live_tangents)
    return tuple(next(it) if is_live else jnp.zeros_like(p) for p, is_live in zip(primals, live))


def _tangent_pass(residuals, live_tangents, *, blocks, live):
    return _pallas_attention(residuals, _full_tangents(residuals, live_tangents, live), blocks)


def _attention_backward(residuals, cotangent, *, live):
    """The transpose of (live tangents) ↦ dO at (q, k, v): XLA's VJP of the reference, for the live ones."""
    cotangents = jax.vjp(reference_attention, *residuals)[1](cotangent)
    return tuple(c for c, is_live in zip(cotangents, live) if is_live)


def _reference_tangent(q, k, v, live_tangents, *, live):
    return jax.jvp(reference_attention, (q, k, v), _full_tangents((q, k, v), live_tangents, live))[1]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pallas_attention(primals, tangents, blocks: _Blocks):
    """O (tangents None) or dO of attention, by the Pallas kernel over a (batch·head, query block) grid."""
    q, k, v = primals
    b, lq, h, d = q.shape
    lk = k.shape[1]
    block_q = min(blocks.block_q, _round_up(lq, _SUBLANES))
    block_k = min(blocks.block_k, _round_up(lk, _SUBLANES))
    lq_pad, lk_pad = _round_up(lq, block_q), _round_up(lk, block_k)

    def heads_first(x, pad):  # [B, L, H, D] → [B·H, L + pad, D]
        x = x.transpose(0, 2, 1, 3).reshape(b * h, x.shape[1], d)
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0))) if pad else x

    pads = (lq_pad - lq, lk_pad - lk, lk_pad - lk)
    operands = [heads_first(x, p) for x, p in zip(primals, pads)]
    if tangents is not None:
        operands += [heads_first(x.astype(q.dtype), p) for x, p in zip(tangents, pads)]
    q_spec = pl.BlockSpec((None, block_q, d), lambda i, j: (i, j, 0))
    kv_spec = pl.BlockSpec((None, lk_pad, d), lambda i, j: (i, 0, 0))  # whole keys per program; looped in blocks
    in_specs = [q_spec, kv_spec, kv_spec] * (1 if tangents is None else 2)
    kernel = functools.partial(_attention_kernel, scale=1.0 / math.sqrt(d), block_k=block_k,
                               num_k_blocks=lk_pad // block_k, kv_len=lk, tangent=tangents is not None)
    # The cost the compiler should assume for the kernel (XLA cannot count inside it): per (query, key) pair
    # 2 matmuls of D (q·kᵀ, p·v) forward; the tangent pass adds dq·kᵀ, q·dkᵀ, (p·dS)·v and p·dv.
    matmuls = 2 if tangents is None else 6
    cost = pl.CostEstimate(flops=2 * matmuls * b * h * lq_pad * lk_pad * d, transcendentals=b * h * lq_pad * lk_pad,
                           bytes_accessed=sum(int(x.size) * x.dtype.itemsize for x in operands)
                           + b * h * lq_pad * d * q.dtype.itemsize)

    def call(interpret):
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((b * h, lq_pad, d), q.dtype),
                              grid=(b * h, lq_pad // block_q), in_specs=in_specs, out_specs=q_spec,
                              cost_estimate=cost, interpret=interpret)(*operands)

    if blocks.interpret is None:  # by the platform lowered for: interpret on CPU, compiled elsewhere
        out = lax.platform_dependent(cpu=lambda: call(True), default=lambda: call(False))
    else:
        out = call(blocks.interpret)
    return out[:, :lq].reshape(b, h, lq, d).transpose(0, 2, 1, 3)


def _attention_kernel(*refs, scale, block_k, num_k_blocks, kv_len, tangent):
    """One query block against all keys, a key block at a time (online softmax); with `tangent`, dO too."""
    if tangent:
        q_ref, k_ref, v_ref, dq_ref, dk_ref, dv_ref, out_ref = refs
    else:
        q_ref, k_ref, v_ref, out_ref = refs
    f32 = jnp.float32
    q = q_ref[...]
    dq = dq_ref[...] if tangent else None
    rows = q.shape[0]

    def scores(a, b):  # a·bᵀ, float32
        return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=f32)

    def body(j, carry):
        start = pl.multiple_of(j * block_k, block_k)
        keys = pl.ds(start, block_k)
        k, v = k_ref[keys, :], v_ref[keys, :]
        s = scores(q, k) * scale
        valid = None
        if kv_len % block_k:  # padded keys exist (only in the last block, which keeps ≥ 1 real key)
            valid = start + lax.broadcasted_iota(jnp.int32, s.shape, 1) < kv_len
            s = jnp.where(valid, s, -jnp.inf)
        m, denom, acc = carry[:3]
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new)
        denom = alpha * denom + jnp.sum(p, axis=1, keepdims=True)
        acc = alpha * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=f32)
        if not tangent:
            return m_new, denom, acc
        dk, dv = dk_ref[keys, :], dv_ref[keys, :]
        p_ds = p * ((scores(dq, k) + scores(q, dk)) * scale)
        if valid is not None:
            p_ds = jnp.where(valid, p_ds, 0.0)
        a, t = carry[3:]
        a = alpha * a + jnp.sum(p_ds, axis=1, keepdims=True)
        t = (alpha * t + jnp.dot(p_ds.astype(v.dtype), v, preferred_element_type=f32)
             + jnp.dot(p.astype(dv.dtype), dv, preferred_element_type=f32))
        return m_new, denom, acc, a, t

    d = q.shape[1]
    init = (jnp.full((rows, 1), -jnp.inf, f32), jnp.zeros((rows, 1), f32), jnp.zeros((rows, d), f32))
    if tangent:
        init += (jnp.zeros((rows, 1), f32), jnp.zeros((rows, d), f32))
    carry = lax.fori_loop(0, num_k_blocks, body, init)
    inv_l = 1.0 / carry[1]
    out = carry[2] * inv_l
    if tangent:
        out = carry[4] * inv_l - (carry[3] * inv_l) * out
    out_ref[...] = out.astype(out_ref.dtype)
