"""Toy networks for low-dimensional data (2-D mixtures): an MLP with a sinusoidal time embedding (of each column
of a [B, K] time input, e.g. MeanFlow's (t, t − r), concatenated: `layers.embed_times`)."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cmjax import errors
from cmjax.models import layers


def sinusoidal_embedding(time_input, dim: int, max_period: float = 10000.0):
    """openai `timestep_embedding`: [cos(t·f_j), sin(t·f_j)], f_j = max_period^(−j/(dim/2)), in float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(time_input, jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class MLP(nn.Module):
    """Residual MLP F(x_in, t) for vectors; the time embedding is added to every hidden layer.

    Inputs of any trailing shape are flattened and the output is reshaped back, so the same network
    serves 2-D points ([B, 2]) and tiny images.
    """

    hidden_dim: int = 128
    num_layers: int = 3
    time_embed_dim: int = 64
    num_classes: int = 0
    dropout: float = 0.0
    dtype: Any = jnp.float32
    remat: bool = False
    logvar_head: bool = False  # sCM's log-variance head w_φ(t) on the time features (layers.logvar_head)
    null_label: bool = False  # one more label row, index num_classes = "no class" (MeanFlow's guidance)
    label_dropout: float = 0.0  # training only: labels replaced by the null label (layers.drop_labels)
    velocity_head: bool = False  # iMF's auxiliary v-head: one residual block and an output layer of its own

    def _dense(self, features, name, zero_init=False):
        init = nn.initializers.zeros_init() if zero_init else nn.initializers.lecun_normal()
        return nn.Dense(
            features,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(init, layers.DENSE_KERNEL_AXES),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), layers.DENSE_BIAS_AXES),
            name=name,
        )

    @nn.compact
    def __call__(self, x, time_input, class_labels=None, train: bool = False):
        batch_shape = x.shape
        h = x.reshape(x.shape[0], -1).astype(self.dtype)
        emb = layers.embed_times(sinusoidal_embedding, time_input, self.time_embed_dim)
        if self.logvar_head:
            layers.sow_logvar(self, emb)
        emb = nn.silu(self._dense(self.hidden_dim, "time_embed_0")(emb))
        emb = self._dense(self.hidden_dim, "time_embed_1")(emb)
        if self.num_classes:
            if class_labels is None:
                raise errors.ConfigError("This MLP is class-conditional (num_classes > 0): pass class_labels.")
            emb = emb + layers.label_embedding(
                nn.Embed(self.num_classes + int(self.null_label), self.hidden_dim, name="label_emb"),
                layers.drop_labels(self, class_labels, self.label_dropout, train))
        elif class_labels is not None:
            raise errors.ConfigError("class_labels given to an unconditional MLP (num_classes = 0).")
        h = self._dense(self.hidden_dim, "input")(h)
        block = nn.remat(_ResidualBlock, static_argnums=(3,)) if self.remat else _ResidualBlock
        for i in range(self.num_layers):
            h = block(self.hidden_dim, self.dropout, self.dtype, name=f"block_{i}")(h, emb, train)
        if self.velocity_head:  # branches off the shared trunk, as iMF's v-head does (layers.VELOCITY)
            hv = block(self.hidden_dim, self.dropout, self.dtype, name="velocity_block")(h, emb, train)
            hv = nn.silu(nn.LayerNorm(dtype=jnp.float32, name="velocity_norm")(hv))
            hv = self._dense(math.prod(batch_shape[1:]), "velocity_output", zero_init=True)(hv)
            layers.sow_velocity(self, hv.astype(jnp.float32).reshape(batch_shape))
        h = nn.silu(nn.LayerNorm(dtype=jnp.float32, name="out_norm")(h))
        out = self._dense(math.prod(batch_shape[1:]), "output", zero_init=True)(h)
        return out.astype(jnp.float32).reshape(batch_shape)


class _ResidualBlock(nn.Module):
    features: int
    dropout: float
    dtype: Any

    @nn.compact
    def __call__(self, h, emb, train):
        dense = lambda name: nn.Dense(  # noqa: E731
            self.features, dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), layers.DENSE_KERNEL_AXES),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), layers.DENSE_BIAS_AXES),
            name=name)
        y = nn.silu(nn.LayerNorm(dtype=jnp.float32, name="norm")(h))
        y = dense("dense_0")(y) + dense("emb_proj")(nn.silu(emb))
        y = nn.silu(y)
        y = nn.Dropout(self.dropout, deterministic=not train)(y)
        return h + dense("dense_1")(y)
