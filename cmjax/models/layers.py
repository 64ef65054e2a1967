"""Shared Flax building blocks and the logical axis names that `cmjax.sharding` maps onto the mesh.

Parameters carry logical axis names (`nn.with_logical_partitioning`), never mesh axes, so a network
is written once and sharded by rules: large kernels are FSDP-sharded along their output features,
small parameters stay replicated.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Logical axis names used by every network's parameters.
CONV_KERNEL_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")  # HWIO
DENSE_KERNEL_AXES = ("embed_in", "embed_out")
CONV_BIAS_AXES = ("conv_out",)
DENSE_BIAS_AXES = ("embed_out",)
NORM_AXES = ("norm",)
EMBEDDING_AXES = ("vocab", "embed_out")

# PyTorch's default Linear/Conv init (kaiming_uniform with a=√5) is U(±1/√fan_in): variance_scaling(1/3, uniform).
TORCH_DEFAULT_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def dense(features: int, *, name: str, dtype: Any = jnp.float32, zero_init: bool = False) -> nn.Dense:
    """A Dense layer with float32 parameters named by logical axes; `zero_init` is openai's `zero_module`."""
    kernel_init = nn.initializers.zeros_init() if zero_init else TORCH_DEFAULT_KERNEL_INIT
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, DENSE_KERNEL_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), DENSE_BIAS_AXES),
        name=name,
    )


def conv(
    features: int,
    kernel_size: int,
    *,
    name: str,
    stride: int = 1,
    dtype: Any = jnp.float32,
    zero_init: bool = False,
) -> nn.Conv:
    """A same-padded NHWC convolution (PyTorch `padding=k//2`) with HWIO float32 kernels named by logical axes."""
    kernel_init = nn.initializers.zeros_init() if zero_init else TORCH_DEFAULT_KERNEL_INIT
    pad = kernel_size // 2
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        # Explicit symmetric padding: for stride 2, "SAME" would pad (0, 1) where PyTorch pads (1, 1).
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, CONV_KERNEL_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), CONV_BIAS_AXES),
        name=name,
    )


class GroupNorm32(nn.Module):
    """openai `normalization(channels)`: GroupNorm, 32 groups, eps 1e-5, in float32, cast back to the input dtype."""

    num_groups: int = 32
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x_bhwc):
        channels = x_bhwc.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), NORM_AXES), (channels,), jnp.float32
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), NORM_AXES), (channels,), jnp.float32
        )
        x = x_bhwc.astype(jnp.float32)
        batch, groups = x.shape[0], self.num_groups
        spatial = tuple(range(1, x.ndim - 1))
        count = x.size // (batch * groups)

        # Per-channel sums over the spatial axes first (a reduction over major axes with channels minor), then
        # over each group's channels: 1.6× faster forward + backward on XLA:CPU than one reduction over the
        # (spatial, channel-in-group) axes of an [B, H, W, G, C/G] view (docs/performance.md), same numbers.
        def group_mean(per_channel_sum):  # [B, C] → [B, 1, …, 1, C]: each channel gets its group's mean
            group = per_channel_sum.reshape(batch, groups, channels // groups).sum(-1) / count
            return jnp.repeat(group, channels // groups, axis=-1).reshape((batch,) + (1,) * len(spatial) + (channels,))

        centered = x - group_mean(x.sum(spatial))
        # Two-pass variance, as PyTorch computes it; E[x²]−E[x]² loses digits on large activations.
        var = group_mean(jnp.square(centered).sum(spatial))
        return (centered * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(x_bhwc.dtype)


def timestep_embedding(time_input_b, dim: int, max_period: float = 10000.0, freq_shift: int = 0):
    """openai `timestep_embedding` (ADM): [cos(t·f), sin(t·f)] with f_i = max_period^(−i/(dim/2 − freq_shift)),
    float32.

    Equals diffusers' `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=freq_shift)`; openai's and the
    official DiT's are freq_shift = 0, diffusers' DiT (`CombinedTimestepLabelEmbeddings`) uses 1.
    """
    half = dim // 2
    # Frequencies rounded once from float64, so every backend multiplies by the same float32 constants.
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / (half - freq_shift)).astype(np.float32)
    args = jnp.asarray(time_input_b, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def pixel_norm(x, axis: int = -1, eps: float = 1e-8):
    """Normalises each feature vector to unit RMS along `axis` (Karras et al. 2018 pixel norm; sCM's AdaGN option)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + eps))).astype(x.dtype)


def double_pixel_norm(scale_shift):
    """sCM §4.1's "adaptive double normalisation" of AdaGN: the scale half and the shift half of the per-block
    [scale | shift] vector each pixel-normalised on its own (`pixel_norm` of the whole vector mixes the two)."""
    scale, shift = jnp.split(scale_shift, 2, axis=-1)
    return jnp.concatenate([pixel_norm(scale), pixel_norm(shift)], axis=-1)


# Hooks selected by name from `config.model`: how the time input becomes features, and how the per-block
# AdaGN scale/shift vector is normalised before use. The ADM UNet uses "positional" and "none".
TIME_EMBEDDINGS: dict[str, Callable[..., Any]] = {"positional": timestep_embedding}
EMB_NORMS: dict[str, Callable[[Any], Any]] = {"none": lambda e: e, "pixel_norm": pixel_norm,
                                              "double_pixel_norm": double_pixel_norm}

# ----------------------------------------------------------------------------------------------
# The log-variance head (`logvar_head` of every network): sCM's learned adaptive weight w_φ(t) = −logvar(t)
# (Lu & Song 2024 §4.2; EDM2's `logvar_linear`). As in FastGen (`fastgen/networks/EDM/network.py:487,571` for
# DDPM++/NCSN++, `:678` for ADM), one linear layer maps the network's own time features (the embedding of its
# time input, before the embedding MLP) to one scalar per sample. The network's output is unchanged: the value
# is sown into the "intermediates" collection, which only a caller that asks for it (`apply_with_logvar`) sees,
# so samplers, evaluation and export read the main output alone.
LOGVAR = "logvar"


def logvar_head(time_features_bc):
    """logvar_b = Dense(1)(time features) in float32, zero-initialised (logvar = 0: weight 1 at the start)."""
    out = dense(1, name="logvar_linear", zero_init=True)(jnp.asarray(time_features_bc, jnp.float32))
    return out[:, 0]


def sow_logvar(module: nn.Module, time_features_bc) -> None:
    """Builds the head inside `module`'s compact call and sows its value as intermediates["logvar"]."""
    module.sow("intermediates", LOGVAR, logvar_head(time_features_bc))


# ----------------------------------------------------------------------------------------------
# The auxiliary velocity head (`velocity_head` of the MLP and the ADM UNet): improved MeanFlow's v-head (iMF §4.1;
# Lyy-iiis/imeanflow models/imfDiT.py: a branch of its own after the shared blocks, `v_heads` + `v_final_layer`),
# predicting the instantaneous velocity v(z_t, t) beside the main output u. Like the log-variance head it is sown
# into "intermediates" (only `models.apply_with_heads` callers see it): samplers and export read u alone.
VELOCITY = "velocity"


def sow_velocity(module: nn.Module, velocity) -> None:
    """Sows the velocity head's output (shaped like the network's input) as intermediates["velocity"]."""
    module.sow("intermediates", VELOCITY, jnp.asarray(velocity, jnp.float32))


# The null class of classifier-free guidance: a class-conditional network given this label adds no class
# embedding (EDM's networks read an all-zero one-hot label the same way). Labels >= 0 are unchanged.
NULL_LABEL = -1


def drop_labels(module: nn.Module, class_labels_b, rate: float, train: bool):
    """Classifier-free guidance training (EDM's `label_dropout`, DiT's `class_dropout_prob`): in training, each
    label becomes the null label with probability `rate` (drawn from the "dropout" stream); unchanged otherwise."""
    if not rate or not train:
        return class_labels_b
    drop = jax.random.bernoulli(module.make_rng("dropout"), rate, jnp.shape(class_labels_b))
    return jnp.where(drop, NULL_LABEL, class_labels_b)


def label_embedding(embed: nn.Module, class_labels_b):
    """`embed(labels)`, zero for the null label (NULL_LABEL, or any negative label)."""
    labels = jnp.asarray(class_labels_b)
    vectors = embed(jnp.maximum(labels, 0))
    return jnp.where((labels >= 0)[:, None], vectors, jnp.zeros_like(vectors))


def upsample_nearest_2x(x_bhwc):
    """Nearest-neighbour 2× upsampling (`F.interpolate(scale_factor=2, mode="nearest")`)."""
    return jnp.repeat(jnp.repeat(x_bhwc, 2, axis=1), 2, axis=2)


def avg_pool_2x(x_bhwc):
    """2×2 average pooling with stride 2 (`avg_pool_nd(kernel_size=2, stride=2)`)."""
    b, h, w, c = x_bhwc.shape
    return x_bhwc.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def embed_times(embed_fn: Callable[..., Any], time_input, dim: int):
    """A time input [B] → embed_fn(t, dim) [B, dim]; a two-time (or K-scalar) input [B, K] → the K embeddings
    of its columns concatenated, [B, K·dim], for the network's first embedding layer to mix (MeanFlow's
    (t, t − r): the CIFAR-10 release concatenates the two positional embeddings the same way, Gsunshine/py-meanflow
    meanflow/models/unet.py:370-374). A network's parameters differ only in that layer's input width."""
    time_input = jnp.asarray(time_input, jnp.float32)
    if time_input.ndim == 1:
        return embed_fn(time_input, dim)
    return jnp.concatenate([embed_fn(time_input[:, k], dim) for k in range(time_input.shape[1])], axis=-1)
