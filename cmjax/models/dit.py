"""DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") as in facebookresearch/DiT models.py
(@ ed81ce2, the line numbers below), and SiT (Ma et al. 2024), which is the same network.

Layout: NHWC in and out. Patchify is a p×p stride-p conv (`x_embedder`, models.py:169, timm `PatchEmbed`), plus the
fixed 2-D sin-cos position embedding (models.py:174, 274-320: not a parameter here; the official `pos_embed` is a
frozen nn.Parameter). The conditioning vector c = t_embedder(t) + y_embedder(y) (models.py:240-243) drives every
adaLN-Zero block (models.py:101-122: shift/scale/gate ×2 from SiLU → Linear(6D), zero-initialised) and the final
layer (models.py:125-142). Attention is timm's: one qkv Linear with output rows [q | k | v], heads of
D/num_heads, softmax(qkᵀ/√d)v, a proj Linear; the MLP is fc1 → GELU(tanh) → fc2 at `mlp_ratio`·D.

Parameter tree: the official module paths with "." written "_" inside a block or the final layer
(`blocks.3.adaLN_modulation.1` → `blocks_3/adaLN_modulation_1`, `blocks.3.mlp.fc1` → `blocks_3/mlp_fc1`,
`blocks.3.attn.qkv` → `blocks_3/attn/qkv`, `final_layer.linear` → `final_layer_linear`, `t_embedder.mlp.0` →
`t_embedder/mlp_0`), leaves `kernel`/`bias`/`embedding`; `cmjax.interop.dit` maps it to diffusers'
`DiTTransformer2DModel`.

Time input. The network embeds `time_input_b` as given (256-d frequency embedding [cos | sin], models.py:41-59, then
Linear-SiLU-Linear): whatever `parameterization.network_time_input` (or the method's own input) produces. The
official DiT is fed integer DDPM steps t ∈ [0, 999]; SiT (willisma/SiT) and MeanFlow feed flow-matching time
t ∈ [0, 1] to the same embedder; cmjax's consistency methods feed 250·ln σ (openai's ADM convention, the same as
every other cmjax network). So "SiT" is this class with the time input of the method that trains it; the registry
entry "sit" is an alias. A two-time input [B, 2] (MeanFlow's (t, t − r)) is embedded by two embedders,
`t_embedder` and `h_embedder`, summed with the label embedding (Gsunshine/meanflow models/models_dit.py:182,
218-221).
`freq_shift` is the frequency denominator's shift: 0 for the official DiT/SiT/MeanFlow (f_i = 10000^(−i/128)),
1 for diffusers' `DiTTransformer2DModel`, whose `CombinedTimestepLabelEmbeddings` uses
`Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)` (f_i = 10000^(−i/127)).

Labels: an `nn.Embed` of num_classes rows, plus the official "no class" row at index num_classes when
`null_label` (models.py:73-74; DiT has it whenever class_dropout_prob > 0, MeanFlow always, models_dit.py:83).
A negative label (`layers.NULL_LABEL`, what `layers.drop_labels` and the guided teachers pass) selects that row;
without the row it adds no embedding (the convention of cmjax's other networks). `label_dropout` is DiT's
`class_dropout_prob` (training only).

`learn_sigma` (off by default: consistency and flow models predict one tensor shaped like the input) gives the
final layer the official 2·out_channels outputs ([ε | Σ], models.py:165); the network returns the first
out_channels (so official or diffusers DiT weights load, e.g. as a teacher), the Σ half is dropped.

Precision: parameters float32; the time/label/position embeddings, the conditioning MLPs, LayerNorm, the
modulation and the final layer in float32; the attention and MLP matmuls in `dtype` (bfloat16 on accelerators),
the residual stream in float32.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmjax import errors
from cmjax.models import attention, layers

FREQUENCY_EMBEDDING_SIZE = 256  # TimestepEmbedder's frequency_embedding_size (models.py:31)
LAYER_NORM_EPS = 1e-6  # every LayerNorm of the official DiT (models.py:107,109,131)
# `attention_impl` → `jax.nn.dot_product_attention(implementation=...)`.

# Official init (models.py:183-216): xavier_uniform Linears, N(0, 0.02) time MLP and label table, the patch conv
# xavier_uniform over its [out, in·p·p] view, zeros for every adaLN modulation and the final linear.
_XAVIER = nn.initializers.xavier_uniform()
_PATCH_INIT = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)
_NORMAL_002 = nn.initializers.normal(0.02)
_ZEROS = nn.initializers.zeros_init()


def _dense(features: int, name: str, *, init=_XAVIER, dtype: Any = jnp.float32) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=nn.with_logical_partitioning(init, layers.DENSE_KERNEL_AXES),
                    bias_init=nn.with_logical_partitioning(_ZEROS, layers.DENSE_BIAS_AXES), name=name)


def _layer_norm(x):
    """LayerNorm without affine parameters (elementwise_affine=False, eps 1e-6), two-pass variance, in float32."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS)


def _modulate(x, shift, scale):
    """models.py:19-20: x·(1 + scale) + shift, per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]


def sincos_1d(embed_dim: int, pos) -> np.ndarray:
    """MAE's 1-D sin-cos embedding (models.py:303-321): [sin(pos·ω) | cos(pos·ω)], ω_i = 10000^(−i/(D/2))."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", np.asarray(pos, np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@functools.lru_cache(maxsize=16)
def sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """The fixed position embedding [grid², D] (models.py:274-300): the first half embeds each token's column
    (meshgrid's first output), the second half its row; rows of the table run over tokens row-major, float32."""
    if embed_dim % 4:
        raise errors.ConfigError(f"DiT hidden_size={embed_dim} must be a multiple of 4 (2-D sin-cos embedding).")
    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    emb = np.concatenate([sincos_1d(embed_dim // 2, grid_w), sincos_1d(embed_dim // 2, grid_h)], axis=1)
    return emb.astype(np.float32)


class TimestepEmbedder(nn.Module):
    """models.py:27-64: 256-d frequency features [cos | sin] → Linear → SiLU → Linear, in float32."""

    hidden_size: int
    freq_shift: int = 0

    @nn.compact
    def __call__(self, t_b):
        features = layers.timestep_embedding(t_b, FREQUENCY_EMBEDDING_SIZE, freq_shift=self.freq_shift)
        h = _dense(self.hidden_size, "mlp_0", init=_NORMAL_002)(features)
        return _dense(self.hidden_size, "mlp_2", init=_NORMAL_002)(nn.silu(h))


class Attention(nn.Module):
    """timm `Attention` (qkv_bias=True): qkv Linear with rows [q | k | v] (heads inside each), SDPA, proj."""

    num_heads: int
    dtype: Any = jnp.float32
    attention_impl: str = "xla"
    dropout: float = 0.0

    def attend(self, q, k, v):
        """softmax(q·kᵀ/√d)·v per head on [B, T, H, d]: `cmjax.models.attention` ("xla", "cudnn", or the Pallas
        "flash" kernel with a fused JVP, for sCM/MeanFlow on fused attention)."""
        return attention.dot_product_attention(q, k, v, implementation=self.attention_impl)

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, tokens, width = x.shape
        head_dim = width // self.num_heads
        qkv = _dense(3 * width, "qkv", dtype=self.dtype)(x.astype(self.dtype))
        qkv = qkv.reshape(b, tokens, 3, self.num_heads, head_dim)
        out = self.attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(b, tokens, width)
        out = _dense(width, "proj", dtype=self.dtype)(out)
        return nn.Dropout(self.dropout, deterministic=not train)(out)


class DiTBlock(nn.Module):
    """adaLN-Zero block (models.py:101-122)."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    dtype: Any = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, c, train: bool = False):
        d = self.hidden_size
        modulation = _dense(6 * d, "adaLN_modulation_1", init=_ZEROS)(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, axis=-1)
        attn = Attention(self.num_heads, self.dtype, self.attention_impl, self.dropout, name="attn")
        h = attn(_modulate(_layer_norm(x), shift_msa, scale_msa), train)
        x = x + gate_msa[:, None] * h.astype(jnp.float32)
        h = _modulate(_layer_norm(x), shift_mlp, scale_mlp).astype(self.dtype)
        h = nn.gelu(_dense(int(d * self.mlp_ratio), "mlp_fc1", dtype=self.dtype)(h), approximate=True)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)  # diffusers' FeedForward dropout
        h = _dense(d, "mlp_fc2", dtype=self.dtype)(h)
        return x + gate_mlp[:, None] * h.astype(jnp.float32)


class DiT(nn.Module):
    """DiT / SiT; defaults are DiT-XL/2 on 32×32×4 latents (674,834,720 parameters + the frozen 294,912-entry
    position table the official count of 675,129,632 includes, with learn_sigma and 1001 label rows)."""

    image_size: int = 32
    in_channels: int = 4
    out_channels: int = 4
    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: int = 2
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # 0: unconditional (no label embedder)
    null_label: bool = False  # the "no class" row, index num_classes (official when class_dropout_prob > 0)
    label_dropout: float = 0.0  # training only: DiT's class_dropout_prob (layers.drop_labels)
    dropout: float = 0.0  # attention-output and MLP-hidden dropout (diffusers' DiT `dropout`; 0 in the official)
    learn_sigma: bool = False
    freq_shift: int = 0  # 0: official DiT/SiT/MeanFlow time features; 1: diffusers' DiTTransformer2DModel
    dtype: Any = jnp.float32
    remat: bool = False
    attention_impl: str = "xla"  # cmjax.models.attention: "xla" (reference) | "cudnn" (GPU) | "flash" (Pallas)
    logvar_head: bool = False  # sCM's log-variance head on the time features (layers.logvar_head)
    # iMF's auxiliary v-head (layers.VELOCITY; Lyy-iiis/imeanflow models/imfDiT.py `v_heads`, `v_final_layer`): the
    # last `velocity_head_depth` blocks are duplicated as a branch of their own with its own final layer, the
    # shared trunk being the first depth − velocity_head_depth blocks (iMF: 8 of each size's depth). Sown, not
    # returned; not exported.
    velocity_head: bool = False
    velocity_head_depth: int = 8

    def _check(self, x_bhwc, class_labels_b):
        attention.check_implementation(self.attention_impl)
        if self.hidden_size % self.num_heads:
            raise errors.ConfigError(f"DiT hidden_size={self.hidden_size} is not divisible by "
                                     f"num_heads={self.num_heads}.")
        _, height, width, channels = x_bhwc.shape
        if height != width or height % self.patch_size or channels != self.in_channels:
            raise errors.ConfigError(
                f"DiT (image_size={self.image_size}, in_channels={self.in_channels}, patch_size={self.patch_size}) "
                f"got inputs {tuple(x_bhwc.shape[1:])}: they must be square, divisible by the patch size and have "
                "in_channels channels.")
        if self.num_classes and class_labels_b is None:
            raise errors.ConfigError(f"This DiT is class-conditional (num_classes={self.num_classes}); pass "
                                     "class_labels_b.")
        if not self.num_classes and class_labels_b is not None:
            raise errors.ConfigError("class_labels_b given to an unconditional DiT (num_classes = 0).")

    def _label_embedding(self, class_labels_b, train):
        table = nn.Embed(self.num_classes + int(self.null_label), self.hidden_size, param_dtype=jnp.float32,
                         embedding_init=nn.with_logical_partitioning(_NORMAL_002, layers.EMBEDDING_AXES),
                         name="y_embedder")
        labels = jnp.asarray(layers.drop_labels(self, class_labels_b, self.label_dropout, train), jnp.int32)
        if self.null_label:  # the official null row (LabelEmbedder.token_drop, models.py:86)
            return table(jnp.where(labels < 0, self.num_classes, labels))
        return layers.label_embedding(table, labels)

    @nn.compact
    def __call__(self, x_bhwc, time_input_b, class_labels_b=None, train: bool = False):
        self._check(x_bhwc, class_labels_b)
        b, size, _, _ = x_bhwc.shape
        p, d = self.patch_size, self.hidden_size
        dtype = jnp.dtype(self.dtype)
        grid = size // p

        x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=jnp.float32, param_dtype=jnp.float32,
                    kernel_init=nn.with_logical_partitioning(_PATCH_INIT, layers.CONV_KERNEL_AXES),
                    bias_init=nn.with_logical_partitioning(_ZEROS, layers.CONV_BIAS_AXES),
                    name="x_embedder")(jnp.asarray(x_bhwc, jnp.float32))
        x = x.reshape(b, grid * grid, d) + sincos_2d(d, grid)[None]

        time_input = jnp.asarray(time_input_b, jnp.float32)
        columns = [time_input] if time_input.ndim == 1 else [time_input[:, k] for k in range(time_input.shape[1])]
        if self.logvar_head:
            layers.sow_logvar(self, layers.embed_times(
                functools.partial(layers.timestep_embedding, freq_shift=self.freq_shift), time_input,
                FREQUENCY_EMBEDDING_SIZE))
        names = ["t_embedder", "h_embedder"] + [f"t_embedder_{k}" for k in range(2, len(columns))]
        c = sum(TimestepEmbedder(d, self.freq_shift, name=n)(col) for n, col in zip(names, columns))
        if self.num_classes:
            c = c + self._label_embedding(class_labels_b, train)

        block = nn.remat(DiTBlock, static_argnums=(3,)) if self.remat else DiTBlock
        head_depth = min(self.velocity_head_depth, self.depth) if self.velocity_head else 0
        if self.velocity_head and self.velocity_head_depth < 1:
            raise errors.ConfigError(f"DiT velocity_head_depth={self.velocity_head_depth}: the v-head needs at least "
                                     "one block.")
        branch = None
        for i in range(self.depth):
            if i == self.depth - head_depth:
                branch = x  # where iMF's v-head branches off the shared trunk
            x = block(d, self.num_heads, self.mlp_ratio, self.dropout, dtype, self.attention_impl,
                      name=f"blocks_{i}")(x, c, train)
        if self.velocity_head:
            v = branch
            for j in range(head_depth):
                v = block(d, self.num_heads, self.mlp_ratio, self.dropout, dtype, self.attention_impl,
                          name=f"velocity_blocks_{j}")(v, c, train)
            layers.sow_velocity(self, self._final_layer(v, c, "velocity_final_layer", self.out_channels))
        out_channels = self.out_channels * (2 if self.learn_sigma else 1)
        return self._final_layer(x, c, "final_layer", out_channels)[..., :self.out_channels]

    def _final_layer(self, x, c, name: str, out_channels: int):
        """adaLN final layer and unpatchify (models.py:125-143, 218-231), NHWC: [B, h, w, p, q, C] →
        [B, h·p, w·q, C]; float32."""
        b, tokens, d = x.shape
        p, grid = self.patch_size, int(round(tokens ** 0.5))
        shift, scale = jnp.split(_dense(2 * d, f"{name}_adaLN_modulation_1", init=_ZEROS)(nn.silu(c)), 2, -1)
        x = _dense(p * p * out_channels, f"{name}_linear", init=_ZEROS)(_modulate(_layer_norm(x), shift, scale))
        x = x.reshape(b, grid, grid, p, p, out_channels).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, grid * p, grid * p, out_channels).astype(jnp.float32)
