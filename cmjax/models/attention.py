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
  pass above as the linear map (dq, dk, dv) ↦ dO, with attention's VJP as its transpose — a blockwise Pallas
  backward (FlashAttention-2's, `_pallas_backward`) — so `jax.grad` of anything that uses the value
  transposes the linear_call instead of the kernel, and no L×L buffer appears in either direction. The
  tangent is wrapped once more in a `custom_jvp` whose own rule is the reference's second derivative in plain
  XLA ops: MeanFlow differentiates the value of a `jax.jvp` with respect to the parameters (the tangent under
  stop_gradient, which makes that rule dead code); a loss of the tangent itself gets a correct but unfused
  gradient. Not supported: `jax.vmap` of the JVP or gradient (linear_call has no batching rule in this JAX;
  `jax.vmap` of the value works) and second derivatives through the backward (Hessian-vector products).

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
@functools.partial(_flash.defjvp, symbolic_zeros=True)
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
    transpose = functools.partial(_attention_backward, blocks=blocks, live=live)
    return linear_call(callee, transpose, (q, k, v), live_tangents)


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


def _attention_backward(residuals, cotangent, *, blocks, live):
    """The transpose of (live tangents) ↦ dO at (q, k, v), i.e. attention's VJP: the blockwise Pallas
    backward (`_pallas_backward`), for the live ones."""
    cotangents = _pallas_backward(residuals, cotangent, blocks)
    return tuple(c for c, is_live in zip(cotangents, live) if is_live)


def _reference_tangent(q, k, v, live_tangents, *, live):
    return jax.jvp(reference_attention, (q, k, v), _full_tangents((q, k, v), live_tangents, live))[1]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class _Layout(NamedTuple):
    """Shapes of one call: [B, L, H, D] arrays become [B·H, L_pad, D], L padded to a multiple of its block."""
    b: int
    h: int
    d: int
    lq: int
    lk: int
    block_q: int
    block_k: int
    lq_pad: int
    lk_pad: int

    @classmethod
    def of(cls, q, k, blocks: _Blocks):
        b, lq, h, d = q.shape
        lk = k.shape[1]
        block_q = min(blocks.block_q, _round_up(lq, _SUBLANES))
        block_k = min(blocks.block_k, _round_up(lk, _SUBLANES))
        return cls(b, h, d, lq, lk, block_q, block_k, _round_up(lq, block_q), _round_up(lk, block_k))

    def heads_first(self, x, queries: bool):  # [B, L, H, D] → [B·H, L_pad, D]
        pad = (self.lq_pad - self.lq) if queries else (self.lk_pad - self.lk)
        x = x.transpose(0, 2, 1, 3).reshape(self.b * self.h, x.shape[1], self.d)
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0))) if pad else x

    def heads_last(self, x, queries: bool):  # the inverse
        length = self.lq if queries else self.lk
        return x[:, :length].reshape(self.b, self.h, length, self.d).transpose(0, 2, 1, 3)

    def cost(self, matmuls: int, operands, outputs) -> pl.CostEstimate:
        """What the compiler should assume for a kernel (XLA cannot count inside it): `matmuls` products of
        length D per (query, key) pair, one exp per pair, every operand and output read or written once."""
        pairs = self.b * self.h * self.lq_pad * self.lk_pad
        nbytes = sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in (*operands, *outputs))
        return pl.CostEstimate(flops=2 * matmuls * pairs * self.d, transcendentals=pairs, bytes_accessed=nbytes)


def _run(blocks: _Blocks, kernel, operands, *, grid, in_specs, out_shape, out_specs, matmuls, layout):
    """`pl.pallas_call`, in interpret mode where the program is lowered for a CPU (or as `blocks.interpret`)."""
    cost = layout.cost(matmuls, operands, jax.tree.leaves(out_shape))

    def call(interpret):
        return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
                              cost_estimate=cost, interpret=interpret)(*operands)

    if blocks.interpret is None:  # by the platform lowered for: interpret on CPU, compiled elsewhere
        return lax.platform_dependent(cpu=lambda: call(True), default=lambda: call(False))
    return call(blocks.interpret)


def _specs(layout: _Layout):
    """Block specs over a (batch·head, block) grid: one block of rows, all rows (looped over inside), and a
    row statistic [B·H, L_pad, 1] by block or whole."""
    d = layout.d
    return dict(
        q_block=pl.BlockSpec((None, layout.block_q, d), lambda i, j: (i, j, 0)),
        k_block=pl.BlockSpec((None, layout.block_k, d), lambda i, j: (i, j, 0)),
        q_all=pl.BlockSpec((None, layout.lq_pad, d), lambda i, j: (i, 0, 0)),
        k_all=pl.BlockSpec((None, layout.lk_pad, d), lambda i, j: (i, 0, 0)),
        stat_block=pl.BlockSpec((None, layout.block_q, 1), lambda i, j: (i, j, 0)),
        stat_all=pl.BlockSpec((None, layout.lq_pad, 1), lambda i, j: (i, 0, 0)),
    )


def _pallas_attention(primals, tangents, blocks: _Blocks):
    """O (tangents None) or dO of attention, by the Pallas kernel over a (batch·head, query block) grid."""
    q, k, v = primals
    layout = _Layout.of(q, k, blocks)
    operands = [layout.heads_first(x, i == 0) for i, x in enumerate(primals)]
    if tangents is not None:
        operands += [layout.heads_first(x.astype(q.dtype), i == 0) for i, x in enumerate(tangents)]
    sp = _specs(layout)
    in_specs = [sp["q_block"], sp["k_all"], sp["k_all"]] * (1 if tangents is None else 2)
    kernel = functools.partial(_attention_kernel, scale=1.0 / math.sqrt(layout.d), block_k=layout.block_k,
                               num_k_blocks=layout.lk_pad // layout.block_k, kv_len=layout.lk,
                               tangent=tangents is not None, with_lse=False)
    # Forward: q·kᵀ and p·v per (query, key) pair; the tangent pass adds dq·kᵀ, q·dkᵀ, (p·dS)·v and p·dv.
    out = _run(blocks, kernel, operands, grid=(layout.b * layout.h, layout.lq_pad // layout.block_q),
               in_specs=in_specs, out_shape=jax.ShapeDtypeStruct(operands[0].shape, q.dtype),
               out_specs=sp["q_block"], matmuls=2 if tangents is None else 6, layout=layout)
    return layout.heads_last(out, True)


def _pallas_backward(residuals, cotangent, blocks: _Blocks):
    """(q̄, k̄, v̄) of attention for the cotangent ḡ of O, blockwise (FlashAttention-2's backward, Dao 2023
    Algorithm 2, in three kernels): the forward again with each row's log-sum-exp L_i; δ_i = Σ_d ḡ_i·O_i; then
    with P_ij = exp(S_ij − L_i) and dS_ij = P_ij·(ḡ_i·v_j − δ_i): k̄ = s·Σ_i dS_ijᵀ·q_i and v̄ = Σ_i P_ijᵀ·ḡ_i
    per key block, q̄ = s·Σ_j dS_ij·k_j per query block. Nothing of size L×L is stored."""
    q, k, v = residuals
    layout = _Layout.of(q, k, blocks)
    f32 = jnp.float32
    qf, gf = layout.heads_first(q, True), layout.heads_first(cotangent.astype(q.dtype), True)
    kf, vf = layout.heads_first(k, False), layout.heads_first(v, False)
    sp = _specs(layout)
    scale = 1.0 / math.sqrt(layout.d)
    bh, n_q, n_k = layout.b * layout.h, layout.lq_pad // layout.block_q, layout.lk_pad // layout.block_k
    stat = jax.ShapeDtypeStruct((bh, layout.lq_pad, 1), f32)
    forward = functools.partial(_attention_kernel, scale=scale, block_k=layout.block_k, num_k_blocks=n_k,
                                kv_len=layout.lk, tangent=False, with_lse=True)
    out, lse = _run(blocks, forward, [qf, kf, vf], grid=(bh, n_q), in_specs=[sp["q_block"], sp["k_all"], sp["k_all"]],
                    out_shape=(jax.ShapeDtypeStruct(qf.shape, q.dtype), stat),
                    out_specs=(sp["q_block"], sp["stat_block"]), matmuls=2, layout=layout)
    delta = jnp.sum(gf.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    dkv = functools.partial(_dkv_kernel, scale=scale, block_q=layout.block_q, num_q_blocks=n_q,
                            block_k=layout.block_k, kv_len=layout.lk)
    dk, dv = _run(blocks, dkv, [qf, gf, lse, delta, kf, vf], grid=(bh, n_k),
                  in_specs=[sp["q_all"], sp["q_all"], sp["stat_all"], sp["stat_all"], sp["k_block"], sp["k_block"]],
                  out_shape=(jax.ShapeDtypeStruct(kf.shape, k.dtype),) * 2, out_specs=(sp["k_block"],) * 2,
                  matmuls=4, layout=layout)
    dq_kernel = functools.partial(_dq_kernel, scale=scale, block_k=layout.block_k, num_k_blocks=n_k,
                                  kv_len=layout.lk)
    dq = _run(blocks, dq_kernel, [qf, gf, lse, delta, kf, vf], grid=(bh, n_q),
              in_specs=[sp["q_block"], sp["q_block"], sp["stat_block"], sp["stat_block"], sp["k_all"], sp["k_all"]],
              out_shape=jax.ShapeDtypeStruct(qf.shape, q.dtype), out_specs=sp["q_block"], matmuls=3, layout=layout)
    return layout.heads_last(dq, True), layout.heads_last(dk, False), layout.heads_last(dv, False)


def _scores(a, b):
    """a·bᵀ in float32 (contracting the last axes, no transpose materialised)."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _transposed_product(a, b):
    """aᵀ·b in float32 (contracting the first axes)."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _key_mask(s, start, kv_len, block_k):
    """Scores of padded keys (only in the last block, which keeps ≥ 1 real key) → −∞; None if none exist."""
    if kv_len % block_k == 0:
        return None
    return start + lax.broadcasted_iota(jnp.int32, s.shape, 1) < kv_len


def _attention_kernel(*refs, scale, block_k, num_k_blocks, kv_len, tangent, with_lse):
    """One query block against all keys, a key block at a time (online softmax); with `tangent`, dO instead
    of O; with `with_lse`, each row's log-sum-exp as a second output (for the backward)."""
    if tangent:
        q_ref, k_ref, v_ref, dq_ref, dk_ref, dv_ref, out_ref = refs
    elif with_lse:
        q_ref, k_ref, v_ref, out_ref, lse_ref = refs
    else:
        q_ref, k_ref, v_ref, out_ref = refs
    f32 = jnp.float32
    q = q_ref[...]
    dq = dq_ref[...] if tangent else None
    rows, d = q.shape

    def body(j, carry):
        start = pl.multiple_of(j * block_k, block_k)
        keys = pl.ds(start, block_k)
        k, v = k_ref[keys, :], v_ref[keys, :]
        s = _scores(q, k) * scale
        valid = _key_mask(s, start, kv_len, block_k)
        if valid is not None:
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
        p_ds = p * ((_scores(dq, k) + _scores(q, dk)) * scale)
        if valid is not None:
            p_ds = jnp.where(valid, p_ds, 0.0)
        a, t = carry[3:]
        a = alpha * a + jnp.sum(p_ds, axis=1, keepdims=True)
        t = (alpha * t + jnp.dot(p_ds.astype(v.dtype), v, preferred_element_type=f32)
             + jnp.dot(p.astype(dv.dtype), dv, preferred_element_type=f32))
        return m_new, denom, acc, a, t

    init = (jnp.full((rows, 1), -jnp.inf, f32), jnp.zeros((rows, 1), f32), jnp.zeros((rows, d), f32))
    if tangent:
        init += (jnp.zeros((rows, 1), f32), jnp.zeros((rows, d), f32))
    carry = lax.fori_loop(0, num_k_blocks, body, init)
    inv_denom = 1.0 / carry[1]
    out = carry[2] * inv_denom
    if tangent:
        out = carry[4] * inv_denom - (carry[3] * inv_denom) * out
    out_ref[...] = out.astype(out_ref.dtype)
    if with_lse:
        lse_ref[...] = carry[0] + jnp.log(carry[1])


def _dkv_kernel(q_ref, g_ref, lse_ref, delta_ref, k_ref, v_ref, dk_ref, dv_ref, *, scale, block_q, num_q_blocks,
                block_k, kv_len):
    """k̄, v̄ of one key block, looping over query blocks (padded query rows have ḡ = 0: they add nothing)."""
    f32 = jnp.float32
    k, v = k_ref[...], v_ref[...]
    start = pl.program_id(1) * block_k

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
        q, g = q_ref[rows, :], g_ref[rows, :]
        p = jnp.exp(_scores(q, k) * scale - lse_ref[rows, :])
        valid = _key_mask(p, start, kv_len, block_k)
        if valid is not None:
            p = jnp.where(valid, p, 0.0)
        dv = dv + _transposed_product(p.astype(g.dtype), g)
        ds = p * (_scores(g, v) - delta_ref[rows, :])
        dk = dk + _transposed_product(ds.astype(q.dtype), q)
        return dk, dv

    zeros = jnp.zeros(k.shape, f32)
    dk, dv = lax.fori_loop(0, num_q_blocks, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, g_ref, lse_ref, delta_ref, k_ref, v_ref, dq_ref, *, scale, block_k, num_k_blocks, kv_len):
    """q̄ of one query block, looping over key blocks."""
    f32 = jnp.float32
    q, g, lse, delta = q_ref[...], g_ref[...], lse_ref[...], delta_ref[...]

    def body(j, dq):
        start = pl.multiple_of(j * block_k, block_k)
        keys = pl.ds(start, block_k)
        k, v = k_ref[keys, :], v_ref[keys, :]
        p = jnp.exp(_scores(q, k) * scale - lse)
        valid = _key_mask(p, start, kv_len, block_k)
        if valid is not None:
            p = jnp.where(valid, p, 0.0)
        ds = p * (_scores(g, v) - delta)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=f32)

    dq = lax.fori_loop(0, num_k_blocks, body, jnp.zeros(q.shape, f32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)
