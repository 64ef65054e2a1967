"""The ADM UNet (Dhariwal & Nichol 2021) as released in openai/consistency_models `cm/unet.py` (`UNetModel`).

Layout, NHWC. Parameter tree: every module is named after its openai state-dict path with "." before an index
written "_" (`input_blocks.5.1.qkv` → `input_blocks_5_1/qkv`), and leaves are `kernel`/`bias`/`scale`/`embedding`
for openai's `weight`/`bias`; `cmjax.interop.openai` turns one into the other by that rule.

Precision follows openai's fp16 recipe: the time/label embedding and the output head run in float32, the
torso (input, middle and output blocks) in `dtype`; GroupNorm always normalises in float32.

sCM options (Lu & Song 2024 §4.1), all off by default: the positional time embedding takes the time input as
given, so the "trigflow" conditioning (time input t ∈ [0, π/2]) is sCM's identity time transform c_noise(t) = t
with positional embeddings, on the same O(1) scale as EDM's c_noise = ¼·ln σ that EDM's own ADM embeds;
`emb_norm="double_pixel_norm"` pixel-normalises AdaGN's scale and shift separately (sCM's adaptive double
normalisation); `logvar_head=True` adds the adaptive-weight head (`layers.logvar_head`).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cmjax import errors
from cmjax.models import attention as attention_lib
from cmjax.models import layers


class ResBlock(nn.Module):
    """openai `ResBlock`: GN→SiLU→conv, + time embedding (or AdaGN scale-shift), GN→SiLU→dropout→zero conv, + skip."""

    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    up: bool = False
    down: bool = False
    deterministic: bool = True
    emb_norm: str = "none"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, emb):
        in_channels = x.shape[-1]
        h = nn.silu(layers.GroupNorm32(name="in_layers_0")(x))
        # Resampling sits between the first activation and the first conv, for both paths (openai h_upd/x_upd).
        if self.up:
            h, x = layers.upsample_nearest_2x(h), layers.upsample_nearest_2x(x)
        elif self.down:
            h, x = layers.avg_pool_2x(h), layers.avg_pool_2x(x)
        h = layers.conv(self.out_channels, 3, name="in_layers_2", dtype=self.dtype)(h)

        emb_width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        emb_out = layers.dense(emb_width, name="emb_layers_1", dtype=self.dtype)(nn.silu(emb))
        emb_out = emb_out.astype(h.dtype)[:, None, None, :]
        out_norm = layers.GroupNorm32(name="out_layers_0")
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(layers.EMB_NORMS[self.emb_norm](emb_out), 2, axis=-1)
            h = out_norm(h) * (1 + scale) + shift
        else:
            h = out_norm(h + emb_out)
        h = nn.silu(h)
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
        h = layers.conv(self.out_channels, 3, name="out_layers_3", dtype=self.dtype, zero_init=True)(h)

        if in_channels != self.out_channels:
            x = layers.conv(self.out_channels, 1, name="skip_connection", dtype=self.dtype)(x)
        return x + h


class AttentionBlock(nn.Module):
    """openai `AttentionBlock` (flash path): GN, 1×1 qkv conv with rows [all q | all k | all v], zero proj_out."""

    num_heads: int
    dtype: Any = jnp.float32
    attention_dtype: Any = jnp.float32
    attention_impl: str = "xla"  # cmjax.models.attention.IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x):
        b, height, width, channels = x.shape
        head_dim = channels // self.num_heads
        qkv = layers.conv(3 * channels, 1, name="qkv", dtype=self.dtype)(layers.GroupNorm32(name="norm")(x))
        # Channel index = part·C + head·head_dim + d, i.e. einops "(three h d)" as in cm/unet.py's flash path.
        qkv = qkv.reshape(b, height * width, 3, self.num_heads, head_dim).astype(self.attention_dtype)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # softmax(q·kᵀ/√head_dim)·v, per head; "xla" is jax.nn.dot_product_attention itself.
        attended = attention_lib.dot_product_attention(q, k, v, implementation=self.attention_impl)
        attended = attended.reshape(b, height, width, channels).astype(self.dtype)
        h = layers.conv(channels, 1, name="proj_out", dtype=self.dtype, zero_init=True)(attended)
        return x + h


class Downsample(nn.Module):
    """openai `Downsample`: a stride-2 3×3 conv `op` (conv_resample) or 2×2 average pooling."""

    use_conv: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.use_conv:
            return layers.conv(x.shape[-1], 3, stride=2, name="op", dtype=self.dtype)(x)
        return layers.avg_pool_2x(x)


class Upsample(nn.Module):
    """openai `Upsample`: nearest 2× then an optional 3×3 conv `conv` (conv_resample)."""

    use_conv: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = layers.upsample_nearest_2x(x)
        if self.use_conv:
            x = layers.conv(x.shape[-1], 3, name="conv", dtype=self.dtype)(x)
        return x


class UNet(nn.Module):
    """ADM UNet, openai `UNetModel` semantics; defaults are the CM ImageNet-64 release (295,899,267 parameters)."""

    image_size: int = 64
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 192
    channel_mult: Sequence[int] = (1, 2, 3, 4)
    num_res_blocks: int = 3
    # Image resolutions (openai's command-line convention), not downsampling rates.
    attention_resolutions: Sequence[int] = (32, 16, 8)
    num_heads: int = 1
    num_head_channels: int = 64  # −1: use num_heads heads at every width instead of fixed-width heads
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    conv_resample: bool = True
    dropout: float = 0.0
    num_classes: Optional[int] = 1000  # None or 0: unconditional
    dtype: Any = jnp.float32
    attention_dtype: Any = jnp.float32
    # How attention runs (cmjax.models.attention): "xla" (the reference), "cudnn" (GPU), "flash" (Pallas, with
    # a fused JVP pass for sCM/MeanFlow's jax.jvp).
    attention_impl: str = "xla"
    remat: bool = False
    # Hooks (cmjax.models.layers): how the time input is embedded, how AdaGN scale/shift is normalised.
    time_embedding: str = "positional"
    emb_norm: str = "none"
    # sCM's log-variance head w_φ(t) on the time features (layers.logvar_head); False: none (openai's network).
    logvar_head: bool = False
    # One more label row, index num_classes = "no class", for classifier-free guidance trained in (MeanFlow).
    null_label: bool = False
    # Training only: the fraction of class labels replaced by the null label (layers.drop_labels), so the
    # network also learns the unconditional prediction that classifier-free guidance needs (EDM's label_dropout).
    label_dropout: float = 0.0
    # iMF's auxiliary v-head (layers.VELOCITY): an output head of its own (GroupNorm, SiLU, zero conv) beside
    # `out` on the decoder's last features; iMF's transformer branches 8 blocks deep instead.
    velocity_head: bool = False

    def _heads(self, channels: int) -> int:
        if self.num_head_channels == -1:
            return self.num_heads
        if channels % self.num_head_channels:
            raise errors.ConfigError(
                f"Width {channels} is not divisible by num_head_channels={self.num_head_channels}.")
        return channels // self.num_head_channels

    @nn.compact
    def __call__(self, x_bhwc, time_input_b, class_labels_b=None, train: bool = False):
        for field, value, choices in (
            ("time_embedding", self.time_embedding, layers.TIME_EMBEDDINGS),
            ("emb_norm", self.emb_norm, layers.EMB_NORMS),
        ):
            if value not in choices:
                raise errors.ConfigError(f"UNet {field}={value!r} is not one of {sorted(choices)}.")
        attention_lib.check_implementation(self.attention_impl)
        if self.emb_norm == "double_pixel_norm" and not self.use_scale_shift_norm:
            raise errors.ConfigError("UNet emb_norm='double_pixel_norm' normalises AdaGN's scale and shift: it needs "
                                     "use_scale_shift_norm=True (or use emb_norm='pixel_norm' / 'none').")
        dtype = jnp.dtype(self.dtype)
        res_block = nn.remat(ResBlock) if self.remat else ResBlock
        attn_block = nn.remat(AttentionBlock) if self.remat else AttentionBlock

        def resblock(out_channels, name, up=False, down=False):
            return res_block(
                out_channels,
                dropout=self.dropout,
                use_scale_shift_norm=self.use_scale_shift_norm,
                up=up,
                down=down,
                deterministic=not train,
                emb_norm=self.emb_norm,
                dtype=dtype,
                name=name,
            )

        def attention(channels, name):
            return attn_block(
                self._heads(channels), dtype=dtype, attention_dtype=jnp.dtype(self.attention_dtype),
                attention_impl=self.attention_impl, name=name)

        # Time (and label) embedding in float32, as openai keeps `time_embed` out of its fp16 conversion.
        time_embed_dim = 4 * self.model_channels
        t_features = layers.embed_times(layers.TIME_EMBEDDINGS[self.time_embedding], time_input_b, self.model_channels)
        if self.logvar_head:
            layers.sow_logvar(self, t_features)
        emb = layers.dense(time_embed_dim, name="time_embed_0")(t_features)
        emb = layers.dense(time_embed_dim, name="time_embed_2")(nn.silu(emb))
        if self.num_classes:
            if class_labels_b is None:
                raise errors.ConfigError(
                    f"This UNet is class-conditional (num_classes={self.num_classes}); pass class_labels_b."
                )
            label_emb = nn.Embed(
                self.num_classes + int(self.null_label),
                time_embed_dim,
                embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), layers.EMBEDDING_AXES),
                name="label_emb",
            )
            emb = emb + layers.label_embedding(
                label_emb, layers.drop_labels(self, class_labels_b, self.label_dropout, train))

        ch = int(self.channel_mult[0] * self.model_channels)
        h = layers.conv(ch, 3, name="input_blocks_0_0", dtype=dtype)(x_bhwc.astype(dtype))
        skips = [h]
        index, ds = 1, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                ch = int(mult * self.model_channels)
                h = resblock(ch, f"input_blocks_{index}_0")(h, emb)
                if self.image_size // ds in self.attention_resolutions:
                    h = attention(ch, f"input_blocks_{index}_1")(h)
                skips.append(h)
                index += 1
            if level != len(self.channel_mult) - 1:
                name = f"input_blocks_{index}_0"
                if self.resblock_updown:
                    h = resblock(ch, name, down=True)(h, emb)
                else:
                    h = Downsample(self.conv_resample, dtype=dtype, name=name)(h)
                skips.append(h)
                index += 1
                ds *= 2

        h = resblock(ch, "middle_block_0")(h, emb)
        h = attention(ch, "middle_block_1")(h)
        h = resblock(ch, "middle_block_2")(h, emb)

        index = 0
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                ch = int(mult * self.model_channels)
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = resblock(ch, f"output_blocks_{index}_0")(h, emb)
                sub = 1
                if self.image_size // ds in self.attention_resolutions:
                    h = attention(ch, f"output_blocks_{index}_1")(h)
                    sub = 2
                if level and i == self.num_res_blocks:
                    name = f"output_blocks_{index}_{sub}"
                    if self.resblock_updown:
                        h = resblock(ch, name, up=True)(h, emb)
                    else:
                        h = Upsample(self.conv_resample, dtype=dtype, name=name)(h)
                    ds //= 2
                index += 1

        # Output head in float32 (openai casts back to the input dtype before `out`).
        h = h.astype(jnp.float32)
        if self.velocity_head:
            hv = nn.silu(layers.GroupNorm32(name="velocity_out_0")(h))
            layers.sow_velocity(self, layers.conv(self.out_channels, 3, name="velocity_out_2", zero_init=True)(hv))
        h = nn.silu(layers.GroupNorm32(name="out_0")(h))
        out = layers.conv(self.out_channels, 3, name="out_2", zero_init=True)(h)
        return out.astype(jnp.float32)
