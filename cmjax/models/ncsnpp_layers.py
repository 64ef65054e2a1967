"""NCSN++ building blocks (Song et al. 2021, score_sde; as used by the CM CIFAR-10 release `jcm/models/layerspp.py`).

FIR resampling follows StyleGAN2's `upfirdn_2d` with the padding of the release's `up_or_down_sampling.py`,
written as depthwise convolutions (zero insertion = `lhs_dilation`, decimation = stride) so XLA fuses them.
Initialisers follow DDPM: `variance_scaling(scale, "fan_avg", "uniform")`, with scale 0 replaced by 1e-10
(the release's "init_scale 0" is near-zero, not exactly zero). GroupNorm uses min(C//4, 32) groups and flax's
epsilon 1e-6, computed in float32 whatever the compute dtype.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmjax.models import attention, layers

# ---------------------------------------------------------------------------------------------------------------
# Initialisers and plain layers
# ---------------------------------------------------------------------------------------------------------------


def ddpm_init(scale: float = 1.0):
    """DDPM `default_init`: variance_scaling(scale, fan_avg, uniform); scale 0 becomes 1e-10 as in the release."""
    return nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, "fan_avg", "uniform")


def conv(features: int, *, name: str, dtype: Any, kernel_size: int = 3, stride: int = 1, init_scale: float = 1.0):
    """Release `ddpm_conv3x3`/`ddpm_conv1x1`: SAME-padded conv, DDPM init, zero bias, float32 parameters."""
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding="SAME",
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(ddpm_init(init_scale), layers.CONV_KERNEL_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), layers.CONV_BIAS_AXES),
        name=name,
    )


def dense(features: int, *, name: str, dtype: Any, init_scale: float = 1.0):
    """Release `nn.Dense(kernel_init=default_init())` and `NIN` (a per-pixel dense layer): DDPM init, zero bias."""
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(ddpm_init(init_scale), layers.DENSE_KERNEL_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), layers.DENSE_BIAS_AXES),
        name=name,
    )


def group_norm(channels: int, *, name: str):
    """Release GroupNorm: min(C//4, 32) groups, epsilon 1e-6, float32 statistics and parameters."""
    return nn.GroupNorm(
        num_groups=min(channels // 4, 32),
        epsilon=1e-6,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), layers.NORM_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), layers.NORM_AXES),
        name=name,
    )


def norm_act(h, *, name: str, dtype: Any):
    """swish(GroupNorm(h)) in float32, handed back in the compute dtype."""
    return nn.swish(group_norm(h.shape[-1], name=name)(h.astype(jnp.float32))).astype(dtype)


class GaussianFourierProjection(nn.Module):
    """score_sde `GaussianFourierProjection`: [sin(2π·t·W), cos(2π·t·W)], W ~ N(0, scale²), never trained.

    W lives in "params" (as in the release, so released checkpoints map onto it) behind `stop_gradient`:
    its gradient is exactly zero, so Adam/RAdam leave it unchanged; a weight-decaying optimizer must mask it.
    """

    embedding_size: int = 128
    scale: float = 16.0

    @nn.compact
    def __call__(self, t_b):
        w = self.param(
            "W",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=self.scale), layers.DENSE_BIAS_AXES),
            (self.embedding_size,),
            jnp.float32,
        )
        w = jax.lax.stop_gradient(w)
        proj = jnp.asarray(t_b, jnp.float32)[:, None] * w[None, :] * (2.0 * math.pi)
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


# ---------------------------------------------------------------------------------------------------------------
# FIR resampling (StyleGAN2 upfirdn_2d)
# ---------------------------------------------------------------------------------------------------------------


def fir_kernel_2d(kernel_1d: Sequence[float], gain: float = 1.0) -> np.ndarray:
    """StyleGAN2 `_setup_kernel`: outer(k, k) normalised to sum `gain`, so a constant image keeps its value."""
    k = np.asarray(kernel_1d, np.float32)
    k2 = np.outer(k, k) if k.ndim == 1 else k
    return (k2 / k2.sum() * gain).astype(np.float32)


def upfirdn_2d(x_bhwc, kernel_2d: np.ndarray, *, up: int = 1, down: int = 1, pad0: int = 0, pad1: int = 0):
    """StyleGAN2 `upfirdn_2d` per channel: zero-insert by `up`, pad (pad0, pad1), convolve, keep every `down`-th."""
    if pad0 < 0 or pad1 < 0:
        raise ValueError(f"upfirdn_2d supports non-negative padding only, got ({pad0}, {pad1}).")
    channels = x_bhwc.shape[-1]
    # A true convolution: lax convolutions correlate, so flip the kernel (a no-op for symmetric kernels).
    k = jnp.asarray(kernel_2d[::-1, ::-1], x_bhwc.dtype)
    k_hwio = jnp.tile(k[:, :, None, None], (1, 1, 1, channels))
    # StyleGAN2 inserts up-1 zeros after every pixel, the last one included; lhs_dilation omits those trailing
    # zeros, so they are added to the far padding.
    padding = ((pad0, pad1 + up - 1),) * 2
    return jax.lax.conv_general_dilated(
        x_bhwc,
        k_hwio,
        window_strides=(down, down),
        padding=padding,
        lhs_dilation=(up, up),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels,
    )


def upsample_2d(x_bhwc, kernel_1d: Sequence[float], factor: int = 2):
    """StyleGAN2 `upsample_2d`: ×factor with the FIR filter (gain factor² so a constant stays constant)."""
    k = fir_kernel_2d(kernel_1d, gain=factor**2)
    p = k.shape[0] - factor
    return upfirdn_2d(x_bhwc, k, up=factor, pad0=(p + 1) // 2 + factor - 1, pad1=p // 2)


def downsample_2d(x_bhwc, kernel_1d: Sequence[float], factor: int = 2):
    """StyleGAN2 `downsample_2d`: FIR low-pass, then keep every factor-th pixel."""
    k = fir_kernel_2d(kernel_1d)
    p = k.shape[0] - factor
    return upfirdn_2d(x_bhwc, k, down=factor, pad0=(p + 1) // 2, pad1=p // 2)


def naive_upsample_2d(x_bhwc, factor: int = 2):
    """Nearest-neighbour upsampling (the release's `fir=False` path)."""
    return jnp.repeat(jnp.repeat(x_bhwc, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x_bhwc, factor: int = 2):
    """Average pooling over factor×factor blocks (the release's `fir=False` path)."""
    b, h, w, c = x_bhwc.shape
    return x_bhwc.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


class FIRConv(nn.Module):
    """StyleGAN2 `Conv2d` with fused FIR resampling (`upsample_conv_2d` / `conv_downsample_2d`), factor 2.

    Parameters are named "weight" (HWIO) and "bias" as in the release's `up_or_down_sampling.Conv2d`.
    """

    features: int
    kernel_size: int = 3
    up: bool = False
    down: bool = False
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc):
        if self.up and self.down:
            raise ValueError("FIRConv resamples up or down, not both.")
        ks = self.kernel_size
        w = self.param(
            "weight",
            nn.with_logical_partitioning(ddpm_init(), layers.CONV_KERNEL_AXES),
            (ks, ks, x_bhwc.shape[-1], self.features),
            jnp.float32,
        ).astype(self.dtype)
        x = x_bhwc.astype(self.dtype)
        conv = lambda y, padding, lhs_dilation=(1, 1), stride=1: jax.lax.conv_general_dilated(  # noqa: E731
            y, w, (stride, stride), padding, lhs_dilation=lhs_dilation, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        if self.up:
            # Transposed conv (stride 2, VALID) then the FIR blur; the padding is TF's conv2d_transpose VALID
            # padding and the release's (p+1)//2+1, p//2+1 blur padding with p = len(k) - 2 - (ks - 1).
            factor = 2
            far = factor - 1 + max(ks - factor, 0)
            y = conv(x, ((ks - 1, far), (ks - 1, far)), lhs_dilation=(factor, factor))
            k = fir_kernel_2d(self.fir_kernel, gain=factor**2)
            p = (k.shape[0] - factor) - (ks - 1)
            y = upfirdn_2d(y, k, pad0=(p + 1) // 2 + factor - 1, pad1=p // 2 + 1)
        elif self.down:
            # FIR blur first (padded once for both ops), then the strided VALID conv.
            k = fir_kernel_2d(self.fir_kernel)
            p = (k.shape[0] - 2) + (ks - 1)
            y = conv(upfirdn_2d(x, k, pad0=(p + 1) // 2, pad1=p // 2), "VALID", stride=2)
        else:
            y = conv(x, "SAME")
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), layers.CONV_BIAS_AXES),
            (self.features,), jnp.float32,
        )
        return y + bias.astype(self.dtype)


class Resample(nn.Module):
    """Release `layerspp.Upsample` / `layerspp.Downsample`: FIR or naive, with or without a 3×3 conv."""

    up: bool
    out_ch: Optional[int] = None
    with_conv: bool = False
    fir: bool = True
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc):
        out_ch = self.out_ch or x_bhwc.shape[-1]
        if self.fir and self.with_conv:
            return FIRConv(out_ch, 3, up=self.up, down=not self.up, fir_kernel=self.fir_kernel,
                           dtype=self.dtype, name="conv")(x_bhwc)
        if self.fir:
            return (upsample_2d if self.up else downsample_2d)(x_bhwc, self.fir_kernel)
        if self.up:
            h = naive_upsample_2d(x_bhwc)
            return conv(out_ch, name="conv", dtype=self.dtype)(h) if self.with_conv else h
        if self.with_conv:
            return conv(out_ch, name="conv", dtype=self.dtype, stride=2)(x_bhwc)
        return naive_downsample_2d(x_bhwc)


# ---------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------


class AttnBlock(nn.Module):
    """Release `AttnBlockpp`: single-head self-attention over pixels, q/k/v init 0.1, output init `init_scale`."""

    skip_rescale: bool = True
    init_scale: float = 0.0
    dtype: Any = jnp.float32
    # "xla": the release's einsum attention below; "flash" / "cudnn": cmjax.models.attention (one head of c).
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x_bhwc):
        b, h, w, c = x_bhwc.shape
        y = group_norm(c, name="norm")(x_bhwc.astype(jnp.float32)).astype(self.dtype)
        q, k, v = (dense(c, name=n, dtype=self.dtype, init_scale=0.1)(y) for n in ("q", "k", "v"))
        if self.attention_impl == "xla":
            logits = jnp.einsum("bhwc,bHWc->bhwHW", q, k).astype(jnp.float32) * c**-0.5
            weights = jax.nn.softmax(logits.reshape(b, h, w, h * w), axis=-1).reshape(b, h, w, h, w)
            y = jnp.einsum("bhwHW,bHWc->bhwc", weights.astype(self.dtype), v)
        else:
            q, k, v = (a.reshape(b, h * w, 1, c) for a in (q, k, v))
            y = attention.dot_product_attention(q, k, v, implementation=self.attention_impl).reshape(b, h, w, c)
        y = dense(c, name="out", dtype=self.dtype, init_scale=self.init_scale)(y)
        out = x_bhwc + y
        return out / math.sqrt(2.0) if self.skip_rescale else out


class ResnetBlockBigGAN(nn.Module):
    """Release `ResnetBlockBigGANpp`: norm-act, FIR up/down of both paths, conv, +temb, norm-act, dropout, conv."""

    out_ch: Optional[int] = None
    up: bool = False
    down: bool = False
    dropout: float = 0.0
    fir: bool = True
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    skip_rescale: bool = True
    init_scale: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc, temb_bd, train: bool):
        in_ch = x_bhwc.shape[-1]
        out_ch = self.out_ch or in_ch
        x = x_bhwc.astype(self.dtype)
        h = norm_act(x, name="norm_0", dtype=self.dtype)
        if self.up or self.down:
            if self.fir:
                resample = lambda y: (upsample_2d if self.up else downsample_2d)(y, self.fir_kernel)  # noqa: E731
            else:
                resample = naive_upsample_2d if self.up else naive_downsample_2d
            h, x = resample(h), resample(x)
        h = conv(out_ch, name="conv_0", dtype=self.dtype)(h)
        if temb_bd is not None:
            h = h + dense(out_ch, name="temb_proj", dtype=self.dtype)(nn.swish(temb_bd))[:, None, None, :]
        h = norm_act(h, name="norm_1", dtype=self.dtype)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv(out_ch, name="conv_1", dtype=self.dtype, init_scale=self.init_scale)(h)
        if in_ch != out_ch or self.up or self.down:
            x = conv(out_ch, name="skip", dtype=self.dtype, kernel_size=1)(x)
        out = x + h
        return out / math.sqrt(2.0) if self.skip_rescale else out


class ResnetBlockDDPM(nn.Module):
    """Release `ResnetBlockDDPMpp`: the DDPM residual block (no resampling; a NIN shortcut when channels change)."""

    out_ch: Optional[int] = None
    dropout: float = 0.0
    skip_rescale: bool = True
    init_scale: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc, temb_bd, train: bool):
        in_ch = x_bhwc.shape[-1]
        out_ch = self.out_ch or in_ch
        x = x_bhwc.astype(self.dtype)
        h = conv(out_ch, name="conv_0", dtype=self.dtype)(norm_act(x, name="norm_0", dtype=self.dtype))
        if temb_bd is not None:
            h = h + dense(out_ch, name="temb_proj", dtype=self.dtype)(nn.swish(temb_bd))[:, None, None, :]
        h = norm_act(h, name="norm_1", dtype=self.dtype)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv(out_ch, name="conv_1", dtype=self.dtype, init_scale=self.init_scale)(h)
        if in_ch != out_ch:
            # The release's NIN shortcut keeps NIN's own default init scale of 0.1.
            x = dense(out_ch, name="skip", dtype=self.dtype, init_scale=0.1)(x)
        out = x + h
        return out / math.sqrt(2.0) if self.skip_rescale else out


class Combine(nn.Module):
    """Release `Combine`: 1×1 conv of the pyramid to the trunk's width, then "sum" or "cat"."""

    method: str = "sum"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pyramid_bhwc, h_bhwc):
        y = conv(h_bhwc.shape[-1], name="conv", dtype=self.dtype, kernel_size=1)(pyramid_bhwc)
        if self.method == "sum":
            return y + h_bhwc
        if self.method == "cat":
            return jnp.concatenate([y, h_bhwc], axis=-1)
        raise ValueError(f"Unknown progressive_combine {self.method!r}; choose 'sum' or 'cat'.")
