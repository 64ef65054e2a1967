"""The SD-VAE: diffusers' `AutoencoderKL` (Rombach et al. 2022, the kl-f8 autoencoder of Stable Diffusion) in Flax.

An image x_bhwc in [−1, 1] → encoder → `quant_conv` → the moments of a diagonal Gaussian posterior (mean, logvar)
of the *unscaled* latent z_bhwc (H/8 × W/8 × 4 for the SD config); z → `post_quant_conv` → decoder → an image on
the [−1, 1] scale (not clipped). Diffusion and consistency models train on the *scaled* latent
`to_model_latent(z, scaling_factor) = scaling_factor·z` (0.18215 for SD; LDM paper §4.3.2, App. D.1), and hand
`from_model_latent(...)` back to `decode`, as diffusers' pipelines do.

Use: `module.apply({"params": p}, x, method="encode")` → (mean, logvar); `method="decode"` → image;
`posterior_sample(mean, logvar, key)` draws z. `cmjax.interop.vae.load_autoencoder(folder)` builds the module and
its parameters from a diffusers folder.

The network follows diffusers 0.42 `models/autoencoders/vae.py` (`Encoder`, `Decoder`) with its blocks
`DownEncoderBlock2D`, `UNetMidBlock2D` and `UpDecoderBlock2D` (`models/unets/unet_2d_blocks.py`): ResnetBlock2D
without a time embedding, GroupNorm eps 1e-6, stride-2 downsampling convs with diffusers' asymmetric (0, 1)
padding, nearest 2× upsampling then a 3×3 conv, and one single-head self-attention (head width = channels) in
each mid block. Parameter paths are diffusers' state-dict keys with "." before an index written "_"
(`encoder.down_blocks.0.resnets.1.conv1.weight` → `encoder/down_blocks_0/resnets_1/conv1/kernel`), so the
converter is a rename plus layout changes (torch conv (out, in, kh, kw) ↔ Flax (kh, kw, in, out)).

Precision: parameters float32; convs and attention run in `dtype` (bfloat16 halves the activation memory of
encoding a dataset), GroupNorm always normalises in float32, and the moments (encoder head, `quant_conv`) and the
decoded image (decoder head) are computed in float32.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmjax.models import layers

# diffusers' `DiagonalGaussianDistribution` clamps the log-variance to this range (autoencoders/vae.py:693).
LOGVAR_RANGE = (-30.0, 20.0)
# GroupNorm and attention-norm epsilon of every VAE block (`resnet_eps=1e-6` in Encoder/Decoder).
NORM_EPS = 1e-6

# stabilityai/sd-vae-ft-ema and sd-vae-ft-mse (and the `vae/` of Stable Diffusion v1): their config.json, as copied in
# huggingface.co/PixArt-alpha/PixArt-alpha commit f827cab `sd-vae-ft-ema/config.json` and in many
# `vae/config.json` files naming `_name_or_path: stabilityai/sd-vae-ft-mse`: block_out_channels [128, 256, 512, 512],
# 4× DownEncoderBlock2D / UpDecoderBlock2D, layers_per_block 2, latent_channels 4, norm_num_groups 32, act_fn silu,
# sample_size 256; no scaling_factor key, so diffusers' default 0.18215 (autoencoder_kl.py:90). 83,653,863 parameters
# (tests/test_interop_vae.py counts diffusers' model built from this config).
SD_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    norm_num_groups=32, sample_size=256, scaling_factor=0.18215)

# A tiny VAE for tests and the embedded end-to-end run: two levels (latents at H/2 × W/2 × 4), one resnet per
# encoder level, 8 → 16 channels in 4 groups, 43,711 parameters; 32×32 RGB images as it is, 8×8 digits with
# in_channels = out_channels = 1.
SMALL_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
    norm_num_groups=4, sample_size=32, scaling_factor=0.18215)


def posterior_moments(moments_bhwc):
    """(mean, logvar) of the quant_conv output [B, h, w, 2·latent]: its channel halves, logvar clamped to
    [−30, 20] (diffusers `DiagonalGaussianDistribution.__init__`); float32."""
    mean, logvar = jnp.split(jnp.asarray(moments_bhwc, jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)


def posterior_sample(mean, logvar, key):
    """z = mean + exp(logvar/2)·ε, ε ~ N(0, I) (diffusers `DiagonalGaussianDistribution.sample`); float32."""
    mean = jnp.asarray(mean, jnp.float32)
    noise = jax.random.normal(key, mean.shape, jnp.float32)
    return mean + jnp.exp(0.5 * jnp.asarray(logvar, jnp.float32)) * noise


def to_model_latent(z, scaling_factor: float, shift_factor: Optional[float] = None):
    """The latent a diffusion model sees: (z − shift)·scale (SD: 0.18215·z; SD3/FLUX VAEs also shift)."""
    return (jnp.asarray(z, jnp.float32) - (shift_factor or 0.0)) * scaling_factor


def from_model_latent(z_model, scaling_factor: float, shift_factor: Optional[float] = None):
    """The inverse of `to_model_latent`: the unscaled latent `decode` takes, z_model/scale + shift."""
    return jnp.asarray(z_model, jnp.float32) / scaling_factor + (shift_factor or 0.0)


def downsampling_factor(module: "AutoencoderKL") -> int:
    """Image pixels per latent pixel along each axis: 2^(levels − 1) (8 for the SD config)."""
    return 2 ** (len(module.block_out_channels) - 1)


def latent_shape(module: "AutoencoderKL", image_hw: Sequence[int]) -> tuple[int, int, int]:
    """(h, w, latent_channels) of the latent of an image of (H, W) pixels."""
    factor = downsampling_factor(module)
    return image_hw[0] // factor, image_hw[1] // factor, module.latent_channels


def _norm(groups: int, name: str) -> nn.Module:
    return layers.GroupNorm32(num_groups=groups, epsilon=NORM_EPS, name=name)


class ResnetBlock(nn.Module):
    """diffusers `ResnetBlock2D` (temb_channels=None): GN→SiLU→conv1, GN→SiLU→conv2, + x (1×1 conv_shortcut where
    the width changes); dropout is 0 in every VAE config and is left out."""

    out_channels: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = layers.conv(self.out_channels, 3, name="conv1", dtype=self.dtype)(nn.silu(_norm(self.groups, "norm1")(x)))
        h = layers.conv(self.out_channels, 3, name="conv2", dtype=self.dtype)(nn.silu(_norm(self.groups, "norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = layers.conv(self.out_channels, 1, name="conv_shortcut", dtype=self.dtype)(x)
        return x + h


class Attention(nn.Module):
    """diffusers `Attention(_from_deprecated_attn_block=True)` of the VAE mid block: GroupNorm, one head as wide as
    the block, Linear to_q/to_k/to_v/to_out.0 over the h·w positions, + residual (rescale factor 1)."""

    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, height, width, channels = x.shape
        h = _norm(self.groups, "group_norm")(x).reshape(b, height * width, 1, channels)
        q, k, v = (layers.dense(channels, name=name, dtype=self.dtype)(h) for name in ("to_q", "to_k", "to_v"))
        attended = jax.nn.dot_product_attention(q, k, v)  # softmax(q·kᵀ/√channels)·v
        out = layers.dense(channels, name="to_out_0", dtype=self.dtype)(attended.reshape(b, height * width, channels))
        return x + out.reshape(b, height, width, channels).astype(x.dtype)


class MidBlock(nn.Module):
    """diffusers `UNetMidBlock2D` (num_layers=1): resnet, attention (if `add_attention`), resnet."""

    groups: int
    add_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        x = ResnetBlock(channels, self.groups, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = Attention(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock(channels, self.groups, self.dtype, name="resnets_1")(x)


class Block(nn.Module):
    """diffusers `DownEncoderBlock2D` / `UpDecoderBlock2D`: `num_layers` resnets, then `resample` (or none, at the
    last level), in a submodule named `downsamplers_0` / `upsamplers_0` holding one conv `conv`."""

    out_channels: int
    num_layers: int
    groups: int
    resample: Optional[str] = None  # "down" | "up" | None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{j}")(x)
        if self.resample:
            x = _Resample(self.out_channels, down=self.resample == "down", dtype=self.dtype,
                          name=f"{self.resample}samplers_0")(x)
        return x


class _Resample(nn.Module):
    """`Downsample2D(padding=0)`: pad (0, 1) at the bottom/right, a 3×3 stride-2 conv; `Upsample2D`: nearest 2×,
    a 3×3 conv. The conv is named `conv`, as in diffusers."""

    channels: int
    down: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if not self.down:
            return layers.conv(self.channels, 3, name="conv", dtype=self.dtype)(layers.upsample_nearest_2x(x))
        # Stride 2 with padding (0, 1): diffusers' F.pad(x, (0, 1, 0, 1)) then a VALID conv (`padding=0`).
        return nn.Conv(
            self.channels, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(layers.TORCH_DEFAULT_KERNEL_INIT, layers.CONV_KERNEL_AXES),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), layers.CONV_BIAS_AXES),
            name="conv")(x)


class Encoder(nn.Module):
    """diffusers `Encoder(double_z=True)`: conv_in, DownEncoderBlock2D per width (all but the last halve the size),
    mid block, GN→SiLU→conv_out to 2·latent channels (float32 head)."""

    latent_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    groups: int
    add_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc):
        widths = tuple(self.block_out_channels)
        h = layers.conv(widths[0], 3, name="conv_in", dtype=self.dtype)(x_bhwc.astype(self.dtype))
        for level, width in enumerate(widths):
            h = Block(width, self.layers_per_block, self.groups, "down" if level != len(widths) - 1 else None,
                      self.dtype, name=f"down_blocks_{level}")(h)
        h = MidBlock(self.groups, self.add_attention, self.dtype, name="mid_block")(h)
        h = nn.silu(_norm(self.groups, "conv_norm_out")(h.astype(jnp.float32)))
        return layers.conv(2 * self.latent_channels, 3, name="conv_out")(h)


class Decoder(nn.Module):
    """diffusers `Decoder` (norm_type="group"): conv_in, mid block, UpDecoderBlock2D per width in reverse order
    (layers_per_block + 1 resnets; all but the last double the size), GN→SiLU→conv_out (float32 head)."""

    out_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    groups: int
    add_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z_bhwc):
        widths = tuple(reversed(self.block_out_channels))
        h = layers.conv(widths[0], 3, name="conv_in", dtype=self.dtype)(z_bhwc.astype(self.dtype))
        h = MidBlock(self.groups, self.add_attention, self.dtype, name="mid_block")(h)
        for level, width in enumerate(widths):
            h = Block(width, self.layers_per_block + 1, self.groups, "up" if level != len(widths) - 1 else None,
                      self.dtype, name=f"up_blocks_{level}")(h)
        h = nn.silu(_norm(self.groups, "conv_norm_out")(h.astype(jnp.float32)))
        return layers.conv(self.out_channels, 3, name="conv_out")(h)


class AutoencoderKL(nn.Module):
    """diffusers `AutoencoderKL` with DownEncoderBlock2D / UpDecoderBlock2D blocks and SiLU (every SD-family VAE);
    field names and defaults are diffusers' config keys, set here to sd-vae-ft-ema's (`SD_CONFIG`).

    `scaling_factor` / `shift_factor` do not enter the network (as in diffusers): they are the latent scaling that
    `to_model_latent` / `from_model_latent` apply, kept with the weights they belong to. `sample_size` is metadata
    (the training resolution; diffusers' tiling threshold): any H, W divisible by `downsampling_factor` work.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    sample_size: int = 256
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Any = jnp.float32

    def setup(self):
        common = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                      groups=self.norm_num_groups, add_attention=self.mid_block_add_attention,
                      dtype=jnp.dtype(self.dtype))
        self.encoder = Encoder(self.latent_channels, **common)
        self.decoder = Decoder(self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = layers.conv(2 * self.latent_channels, 1, name="quant_conv")
        if self.use_post_quant_conv:
            self.post_quant_conv = layers.conv(self.latent_channels, 1, name="post_quant_conv")

    def encode(self, x_bhwc):
        """(mean, logvar) [B, H/f, W/f, latent] of the posterior q(z | x) of the unscaled latent, float32."""
        moments = self.encoder(x_bhwc)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        return posterior_moments(moments)

    def decode(self, z_bhwc):
        """The image [B, H, W, out_channels] (float32, [−1, 1] scale, not clipped) of an unscaled latent."""
        z = jnp.asarray(z_bhwc, jnp.float32)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x_bhwc):
        """Reconstruction through the posterior mean (diffusers `forward(sample_posterior=False)`); builds every
        parameter, so `init` uses it."""
        mean, _ = self.encode(x_bhwc)
        return self.decode(mean)


def init_params(module: AutoencoderKL, key, image_hw: Sequence[int] | None = None):
    """Float32 parameters of `module` (logical-axis boxes removed), built on one image of `image_hw` pixels
    (default: the smallest size the network takes, `downsampling_factor` pixels)."""
    size = tuple(image_hw) if image_hw else (downsampling_factor(module),) * 2
    x = jnp.zeros((1, *size, module.in_channels), jnp.float32)
    return nn.meta.unbox(module.init({"params": key}, x)["params"])


def param_shapes(module: AutoencoderKL):
    """ShapeDtypeStructs of `module`'s parameters (jax.eval_shape: nothing is computed or allocated)."""
    return jax.eval_shape(lambda k: init_params(module, k), jax.random.key(0))
