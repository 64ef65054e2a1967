"""NCSN++ (Song et al. 2021) as configured by the CM CIFAR-10 release (`configs/cifar10_ve_cd.py`).

Defaults are the release's model settings: nf 128, ch_mult (2, 2, 2), 4 res blocks, attention at 16×16, BigGAN
res blocks with FIR [1, 3, 3, 1] resampling, skip_rescale, progressive "none" / progressive_input "residual"
(combine "sum"), Gaussian Fourier time embedding (scale 16), init_scale 0, conditional: 56,395,651 parameters.
Release settings with a single value here are not fields: nonlinearity "swish", normalization "GroupNorm",
embedding_type "fourier", double_heads False; `conv_size` and `attention_type` are in the release config but its
network never reads them, and score_sde's `centered` is gone from it (inputs arrive already scaled by c_in).

Time input: the release feeds its Fourier embedding `cond_t = 0.25·ln σ` (EDM's c_noise; `jcm/models/utils.py:
get_denoiser_fn`), not log σ as score_sde's VE NCSN++ did. cmjax hands every network `time_input =
250·ln(σ + 1e-44) = 1000·c_noise`, so this module embeds `time_input / 1000`. Option `time_embedding="positional"`
embeds the time input as given with openai's sinusoidal embedding instead: sCM's (Lu & Song 2024 §4.1)
identity time transform with positional embeddings, for the "trigflow" conditioning whose time input is t ∈ [0, π/2]
(there, the release's Fourier features of t/1000 at scale 16 barely change with t). `logvar_head=True` adds sCM's
adaptive-weight head (`layers.logvar_head`).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cmjax import errors
from cmjax.models import attention, layers
from cmjax.models import ncsnpp_layers as L

# cmjax's time input is 1000·c_noise (openai's ADM convention); the release's NCSN++ embeds c_noise itself.
TIME_INPUT_PER_C_NOISE = 1000.0


class NCSNpp(nn.Module):
    """The CM CIFAR-10 NCSN++ (`jcm/models/ncsnpp.py`); iCT uses the same network with fourier_scale 0.02."""

    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    nf: int = 128
    ch_mult: Sequence[int] = (2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: Sequence[int] = (16,)
    # CD/CT release configs use 0.0; the EDM teacher (cifar10_k_ve) 0.13; iCT 0.3.
    dropout: float = 0.0
    conditional: bool = True
    fourier_scale: float = 16.0
    resblock_type: str = "biggan"
    # Only read by the "ddpm" res blocks' Upsample/Downsample (BigGAN blocks resample inside themselves).
    resamp_with_conv: bool = True
    fir: bool = True
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    skip_rescale: bool = True
    progressive: str = "none"
    progressive_input: str = "residual"
    progressive_combine: str = "sum"
    init_scale: float = 0.0
    dtype: Any = jnp.float32
    remat: bool = False
    # How attention runs (cmjax.models.attention): "xla" (the release's einsum), "cudnn" (GPU), "flash" (Pallas,
    # with a fused JVP pass for sCM/MeanFlow's jax.jvp).
    attention_impl: str = "xla"
    # How the time input becomes features: "fourier" (the release's: Gaussian Fourier features, scale
    # fourier_scale, of c_noise = time_input/1000) | "positional" (openai's sinusoidal embedding, 2·nf channels, of
    # the time input as given: sCM's identity time transform c_noise(t) = t for the "trigflow" conditioning).
    time_embedding: str = "fourier"
    logvar_head: bool = False  # sCM's log-variance head w_φ(t) on the time features (layers.logvar_head)

    def _check(self, x_bhwc, class_labels_b):
        if class_labels_b is not None:
            raise errors.ConfigError(
                "class_labels_b given to NCSNpp, which is unconditional (as in the CM CIFAR-10 release); "
                "pass class_labels_b=None or use the 'unet' model with num_classes for class conditioning."
            )
        expected = (self.image_size, self.image_size, self.in_channels)
        if tuple(x_bhwc.shape[1:]) != expected:
            raise errors.ConfigError(
                f"NCSNpp expects inputs [B, {expected[0]}, {expected[1]}, {expected[2]}] (image_size, in_channels), "
                f"got {x_bhwc.shape}."
            )
        if self.image_size % 2 ** (len(self.ch_mult) - 1):
            raise errors.ConfigError(f"image_size {self.image_size} does not halve {len(self.ch_mult) - 1} times.")
        for key, value, allowed in (
            ("resblock_type", self.resblock_type, ("biggan", "ddpm")),
            ("progressive", self.progressive, ("none", "output_skip", "residual")),
            ("progressive_input", self.progressive_input, ("none", "input_skip", "residual")),
            ("progressive_combine", self.progressive_combine, ("sum", "cat")),
            ("time_embedding", self.time_embedding, ("fourier", "positional")),
        ):
            if value not in allowed:
                raise errors.ConfigError(f"NCSNpp {key}={value!r} is not one of {allowed}.")
        attention.check_implementation(self.attention_impl)

    @nn.compact
    def __call__(self, x_bhwc, time_input_b, class_labels_b=None, train: bool = False):
        self._check(x_bhwc, class_labels_b)
        dtype = jnp.dtype(self.dtype)
        nf, num_levels = self.nf, len(self.ch_mult)

        # Time embedding, float32: Fourier features of c_noise, then (if conditional) two dense layers.
        if self.time_embedding == "fourier":
            c_noise_b = jnp.asarray(time_input_b, jnp.float32) / TIME_INPUT_PER_C_NOISE
            # A [B, K] time input (MeanFlow's (t, t − r)): the same Fourier features of each column, concatenated.
            fourier = L.GaussianFourierProjection(nf, self.fourier_scale, name="time_fourier")
            temb = layers.embed_times(lambda c, _: fourier(c), c_noise_b, nf)
        else:
            temb = layers.embed_times(layers.timestep_embedding, time_input_b, 2 * nf)
        if self.logvar_head:
            layers.sow_logvar(self, temb)
        if self.conditional:
            temb = L.dense(4 * nf, name="time_dense_0", dtype=jnp.float32)(temb)
            temb = L.dense(4 * nf, name="time_dense_1", dtype=jnp.float32)(nn.swish(temb))
        else:
            temb = None

        # Rematerialise per block: activations inside a block are recomputed in the backward pass.
        res_cls = L.ResnetBlockBigGAN if self.resblock_type == "biggan" else L.ResnetBlockDDPM
        res_cls = nn.remat(res_cls, static_argnums=(3,)) if self.remat else res_cls
        attn_cls = nn.remat(L.AttnBlock) if self.remat else L.AttnBlock

        def res_block(name, h, out_ch=None, up=False, down=False):
            kwargs = dict(out_ch=out_ch, dropout=self.dropout, skip_rescale=self.skip_rescale,
                          init_scale=self.init_scale, dtype=dtype, name=name)
            if self.resblock_type == "biggan":
                kwargs.update(up=up, down=down, fir=self.fir, fir_kernel=tuple(self.fir_kernel))
            return res_cls(**kwargs)(h, temb, train)

        def attn_block(name, h):
            return attn_cls(skip_rescale=self.skip_rescale, init_scale=self.init_scale, dtype=dtype,
                            attention_impl=self.attention_impl, name=name)(h)

        def resample(name, h, up, out_ch=None, with_conv=self.resamp_with_conv):
            return L.Resample(up, out_ch=out_ch, with_conv=with_conv, fir=self.fir,
                              fir_kernel=tuple(self.fir_kernel), dtype=dtype, name=name)(h)

        def rescaled_sum(a, b):
            # A Python float keeps the compute dtype (a numpy scalar would promote bfloat16 to float32).
            return (a + b) / 2.0**0.5 if self.skip_rescale else a + b

        # Downsampling path; `skips` holds every activation the upsampling path concatenates.
        x = x_bhwc.astype(dtype)
        input_pyramid = x
        skips = [L.conv(nf, name="input_conv", dtype=dtype)(x)]
        for level in range(num_levels):
            for i in range(self.num_res_blocks):
                h = res_block(f"down_{level}_block_{i}", skips[-1], out_ch=nf * self.ch_mult[level])
                if h.shape[1] in self.attn_resolutions:
                    h = attn_block(f"down_{level}_attn_{i}", h)
                skips.append(h)
            if level == num_levels - 1:
                continue
            if self.resblock_type == "ddpm":
                h = resample(f"down_{level}_downsample", skips[-1], up=False)
            else:
                h = res_block(f"down_{level}_downsample", skips[-1], down=True)
            if self.progressive_input == "input_skip":
                input_pyramid = resample(f"down_{level}_pyramid", input_pyramid, up=False, with_conv=False)
                h = L.Combine(self.progressive_combine, dtype=dtype, name=f"down_{level}_combine")(input_pyramid, h)
            elif self.progressive_input == "residual":
                input_pyramid = resample(f"down_{level}_pyramid", input_pyramid, up=False,
                                         out_ch=h.shape[-1], with_conv=True)
                h = input_pyramid = rescaled_sum(input_pyramid, h)
            skips.append(h)

        h = skips[-1]
        h = res_block("mid_block_0", h)
        h = attn_block("mid_attn", h)
        h = res_block("mid_block_1", h)

        # Upsampling path.
        pyramid = None
        for level in reversed(range(num_levels)):
            for i in range(self.num_res_blocks + 1):
                h = res_block(f"up_{level}_block_{i}", jnp.concatenate([h, skips.pop()], axis=-1),
                              out_ch=nf * self.ch_mult[level])
            if h.shape[1] in self.attn_resolutions:
                h = attn_block(f"up_{level}_attn", h)
            if self.progressive == "output_skip":
                features = L.norm_act(h, name=f"up_{level}_pyramid_norm", dtype=dtype)
                out = L.conv(self.out_channels, name=f"up_{level}_pyramid_conv", dtype=dtype,
                             init_scale=self.init_scale)(features)
                if pyramid is not None:
                    pyramid = resample(f"up_{level}_pyramid_upsample", pyramid, up=True, with_conv=False)
                pyramid = out if pyramid is None else pyramid + out
            elif self.progressive == "residual":
                if pyramid is None:  # coarsest level: the pyramid starts from the trunk's features
                    features = L.norm_act(h, name=f"up_{level}_pyramid_norm", dtype=dtype)
                    pyramid = L.conv(h.shape[-1], name=f"up_{level}_pyramid_conv", dtype=dtype)(features)
                else:
                    pyramid = resample(f"up_{level}_pyramid_upsample", pyramid, up=True,
                                       out_ch=h.shape[-1], with_conv=True)
                    h = pyramid = rescaled_sum(pyramid, h)
            if level != 0:
                if self.resblock_type == "ddpm":
                    h = resample(f"up_{level}_upsample", h, up=True)
                else:
                    h = res_block(f"up_{level}_upsample", h, up=True)
        assert not skips, "every skip connection is consumed"

        if self.progressive == "output_skip":
            h = pyramid
        else:
            h = L.norm_act(h, name="out_norm", dtype=dtype)
            h = L.conv(self.out_channels, name="out_conv", dtype=dtype, init_scale=self.init_scale)(h)
        return h.astype(jnp.float32)
