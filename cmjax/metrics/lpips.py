"""LPIPS with VGG16 (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"), in Flax: a metric and the `lpips` training distance of consistency distillation (CM 2023).

d(x, y) = Σ_l mean_hw(Σ_c w_lc·(φ̂_l(x) − φ̂_l(y))²_c), with φ_l the VGG16 activations relu1_2, relu2_2, relu3_3,
relu4_3, relu5_3 of the inputs scaled by the `lpips` package's ScalingLayer, φ̂ those activations normalised to
unit length over channels, and w_l the package's linear heads (v0.1). Images are NHWC in [−1, 1].

Weights: torchvision's ImageNet VGG16 (`VGG16_URL`) and the linear heads shipped inside the `lpips` package
(`lpips/weights/v0.1/vgg.pth`), converted once into one .npz by

    python -m cmjax.metrics.lpips --convert [--vgg vgg16-397923af.pth | --download] [--out PATH]

(torch is needed only there). `load_params()` reads `default_weights_path()` (~/.cache/cmjax/lpips_vgg16.npz).

As a training distance (`config.method.<method>.distance = "lpips"`) the CM release setting applies: images narrower
than 256 pixels are upsampled bilinearly to 224×224 first (openai `cm/karras_diffusion.py`). The release fed
piq's LPIPS with `replace_pooling=True`, i.e. VGG with average pooling; `lpips` here keeps the `lpips`
package's max pooling and `lpips_avgpool` is the release's variant. The network weights are an argument
of the train step (`config.distance_weights`), never a constant of the compiled program.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cmjax import errors

# torchvision's `VGG16_Weights.IMAGENET1K_V1` (what `lpips.pretrained_networks.vgg16` loads).
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
# The linear heads: a file of the installed `lpips` package (pip install lpips; also in
# github.com/richzhang/PerceptualSimilarity at lpips/weights/v0.1/vgg.pth).
LPIPS_HEADS_PACKAGE_FILE = ("lpips", "weights/v0.1/vgg.pth")
FORMAT = "cmjax_lpips_vgg16_v1"
WEIGHTS_FILENAME = "lpips_vgg16.npz"

# lpips' ScalingLayer: (x − shift)/scale on [−1, 1] inputs (= ImageNet mean/std on [0, 1] inputs).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# VGG16 configuration "D": (channels, convolutions) per block; LPIPS taps the last ReLU of each block and
# never uses the fifth pooling layer.
VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
# CM 2023 release: images narrower than 256 are upsampled bilinearly to 224 before LPIPS.
CM_RESIZE = 224
CM_RESIZE_BELOW = 256


def _conv_names() -> list[str]:
    return [f"conv{b}_{i}" for b, (_, n) in enumerate(VGG16_BLOCKS, start=1) for i in range(1, n + 1)]


def _torch_feature_indices() -> list[int]:
    """Indices of the convolutions in torchvision's `vgg16().features` (a ReLU after each, a pool per block)."""
    indices, position = [], 0
    for _, n in VGG16_BLOCKS:
        for _ in range(n):
            indices.append(position)
            position += 2
        position += 1
    return indices


# ----------------------------------------------------------------------------------------------
# The network.


class VGG16Features(nn.Module):
    """The five LPIPS taps of VGG16 (relu1_2 … relu5_3); `pooling` "max" (torchvision) or "avg" (piq's
    `replace_pooling=True`, the CM release)."""

    pooling: str = "max"
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x_bhwc: jax.Array) -> list[jax.Array]:
        if self.pooling not in ("max", "avg"):
            raise errors.ConfigError(f"LPIPS pooling must be 'max' or 'avg'; got {self.pooling!r}.")
        pool = nn.max_pool if self.pooling == "max" else nn.avg_pool
        taps = []
        for block, (features, convs) in enumerate(VGG16_BLOCKS, start=1):
            if block > 1:
                x_bhwc = pool(x_bhwc, (2, 2), strides=(2, 2))
            for i in range(1, convs + 1):
                x_bhwc = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), precision=self.precision,
                                 name=f"conv{block}_{i}")(x_bhwc)
                x_bhwc = nn.relu(x_bhwc)
            taps.append(x_bhwc)
        return taps


def _unit_normalize(features, eps=1e-10):
    """φ / (‖φ‖₂ over channels + ε) (lpips `normalize_tensor`); the gradient stays finite where φ = 0."""
    squared = jnp.sum(jnp.square(features), axis=-1, keepdims=True)
    positive = squared > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
    return features / (norm + eps)


class LPIPS(nn.Module):
    """Per-image LPIPS [B] of two NHWC batches in [−1, 1] (Zhang et al. 2018, VGG16, v0.1 heads)."""

    pooling: str = "max"
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x_bhwc: jax.Array, y_bhwc: jax.Array) -> jax.Array:
        vgg = VGG16Features(self.pooling, self.precision, name="vgg")
        # Two calls, not one on the concatenated batch: a training target is under stop_gradient, so only
        # x's pass needs a backward pass.
        taps_x, taps_y = (vgg((a.astype(jnp.float32) - jnp.asarray(SHIFT)) / jnp.asarray(SCALE))
                          for a in (x_bhwc, y_bhwc))
        total = jnp.zeros((x_bhwc.shape[0],), jnp.float32)
        for k, (tap_x, tap_y) in enumerate(zip(taps_x, taps_y)):
            head = self.param(f"lin{k}", nn.initializers.ones_init(), (tap_x.shape[-1],), jnp.float32)
            diff = jnp.square(_unit_normalize(tap_x) - _unit_normalize(tap_y))
            total = total + jnp.mean(jnp.sum(diff * head, axis=-1), axis=(1, 2))
        return total


def resize_bilinear(x_bhwc: jax.Array, size: int) -> jax.Array:
    """size×size bilinear resize as torch's `F.interpolate(mode="bilinear", align_corners=False)` (no antialias)."""
    batch, _, _, channels = x_bhwc.shape
    return jax.image.resize(x_bhwc, (batch, size, size, channels), "bilinear", antialias=False)


@functools.partial(jax.jit, static_argnames=("pooling", "resize", "precision"))
def lpips_distance(params, x_bhwc, y_bhwc, *, pooling: str = "max", resize: int | None = None,
                   precision: Any = jax.lax.Precision.HIGHEST) -> jax.Array:
    """LPIPS [B] of images in [−1, 1] (NHWC; grayscale is repeated to RGB), equal to
    `lpips.LPIPS(net="vgg")(x, y)` for `pooling="max"`. `resize`: first resize both to resize×resize
    bilinearly (the CM release used 224); `pooling="avg"` is piq's `replace_pooling=True`."""
    if x_bhwc.shape != y_bhwc.shape or x_bhwc.shape[-1] not in (1, 3):
        raise errors.ConfigError(f"LPIPS needs two NHWC batches of one shape with 1 or 3 channels; got "
                         f"{x_bhwc.shape} and {y_bhwc.shape}.")
    if x_bhwc.shape[-1] == 1:
        x_bhwc, y_bhwc = (jnp.repeat(a, 3, axis=-1) for a in (x_bhwc, y_bhwc))
    if resize is not None:
        x_bhwc, y_bhwc = resize_bilinear(x_bhwc, resize), resize_bilinear(y_bhwc, resize)
    return LPIPS(pooling, precision).apply({"params": params}, x_bhwc, y_bhwc)


def make_training_distance(resize: int | None = CM_RESIZE, pooling: str = "max",
                           precision: Any = None) -> Callable:
    """The CM training distance `fn(params, a, b) -> [B]`: images narrower than 256 are first resized to
    `resize` (CM 2023 release: 224, bilinear). `precision` None is the backend's default matmul precision
    (bfloat16 passes on TPU): a loss, not a reported number."""

    def distance(params, a, b):
        size = resize if resize is not None and a.shape[2] < CM_RESIZE_BELOW else None
        return lpips_distance(params, a, b, pooling=pooling, resize=size, precision=precision)

    return distance


# ----------------------------------------------------------------------------------------------
# Weights: conversion (torch) and loading (numpy only).


def default_weights_path() -> str:
    """`$XDG_CACHE_HOME/cmjax/lpips_vgg16.npz` (default `~/.cache/cmjax/lpips_vgg16.npz`)."""
    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return os.path.join(cache, "cmjax", WEIGHTS_FILENAME)


def convert_state_dicts(vgg_state_dict, heads_state_dict) -> dict[str, np.ndarray]:
    """Flat float32 arrays for `load_params` from torchvision's VGG16 state dict (`features.N.*`, or the
    bare `N.*` of `vgg16().features`) and the lpips heads (`lin{k}.model.1.weight`, shape [1, C, 1, 1]).
    Conv kernels go from torch's (out, in, kh, kw) to Flax's (kh, kw, in, out)."""
    vgg = {k.removeprefix("features."): np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
           for k, v in vgg_state_dict.items()}
    arrays = {"format": np.asarray(FORMAT)}
    for name, index in zip(_conv_names(), _torch_feature_indices()):
        for part in ("weight", "bias"):
            if f"{index}.{part}" not in vgg:
                raise KeyError(f"VGG16 state dict lacks features.{index}.{part} ({name}); expected "
                               f"torchvision's vgg16 weights ({VGG16_URL}).")
        arrays[f"vgg/{name}/kernel"] = vgg[f"{index}.weight"].transpose(2, 3, 1, 0).astype(np.float32)
        arrays[f"vgg/{name}/bias"] = vgg[f"{index}.bias"].astype(np.float32)
    for k in range(len(VGG16_BLOCKS)):
        head = heads_state_dict[f"lin{k}.model.1.weight"]
        head = np.asarray(head.detach().cpu().numpy() if hasattr(head, "detach") else head)
        arrays[f"lin{k}"] = head.reshape(-1).astype(np.float32)
    return arrays


def package_heads_path() -> str:
    """The v0.1 VGG linear heads inside the installed `lpips` package."""
    package, relative = LPIPS_HEADS_PACKAGE_FILE
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise errors.MissingFileError("The `lpips` package is not installed (pip install lpips); its "
                                f"{relative} holds the LPIPS linear heads. Or pass --heads PATH.")
    return os.path.join(list(spec.submodule_search_locations)[0], relative)


def convert(vgg_path: str | None, out_path: str, heads_path: str | None = None, download: bool = False) -> str:
    """Reads torchvision's VGG16 checkpoint (or downloads `VGG16_URL` with torch.hub if `download`) and the
    lpips heads, writes the .npz that `load_params` reads; returns `out_path`."""
    import torch  # the converter is the only place torch is needed

    if download:
        vgg = torch.hub.load_state_dict_from_url(VGG16_URL, map_location="cpu", progress=True)
    elif vgg_path is None or not os.path.exists(vgg_path):
        raise errors.MissingFileError(f"No VGG16 checkpoint at {vgg_path!r}: download torchvision's {VGG16_URL} "
                                "and pass --vgg PATH, or pass --download.")
    else:
        vgg = torch.load(vgg_path, map_location="cpu", weights_only=True)
    heads = torch.load(heads_path or package_heads_path(), map_location="cpu", weights_only=True)
    arrays = convert_state_dicts(vgg, heads)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp_path = out_path + ".tmp.npz"
    np.savez(tmp_path, **arrays)
    os.replace(tmp_path, out_path)
    return out_path


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    images = jnp.zeros((1, 32, 32, 3))
    shapes = jax.eval_shape(lambda: LPIPS().init(jax.random.key(0), images, images)["params"])
    return {k: v.shape for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}


def load_params(path: str | None = None) -> dict[str, Any]:
    """The LPIPS parameters (a pytree of float32 numpy arrays) from the converted .npz at `path`
    (default `default_weights_path()`)."""
    path = path or default_weights_path()
    command = "python -m cmjax.metrics.lpips --convert --download --out " + path
    if not os.path.exists(path):
        raise errors.MissingFileError(f"LPIPS weights not found at {path}. Convert them once (needs torch and the "
                                f"lpips package) with: {command}")
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    if str(arrays.pop("format", "")) != FORMAT:
        raise errors.ConfigError(f"{path} is not a {FORMAT} file; convert again with: {command}")
    expected = _expected_shapes()
    wrong = sorted(k for k in expected if k not in arrays or arrays[k].shape != expected[k])
    if wrong or set(arrays) != set(expected):
        raise errors.ConfigError(f"{path} does not hold LPIPS VGG16 weights (mismatched: {wrong[:5]}); convert again "
                         f"with: {command}")
    return traverse_util.unflatten_dict(arrays, sep="/")


# The training distances `cmjax.distances` names ("lpips", "lpips_avgpool"): fn(params, a, b) -> [B].
lpips_maxpool_training_distance = make_training_distance()
lpips_avgpool_training_distance = make_training_distance(pooling="avg")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cmjax.metrics.lpips", description=__doc__.split("\n")[0])
    parser.add_argument("--convert", action="store_true", help="convert torchvision VGG16 + lpips heads to .npz")
    parser.add_argument("--vgg", default=os.path.expanduser("~/.cache/torch/hub/checkpoints/vgg16-397923af.pth"),
                        help=f"torchvision's VGG16 checkpoint ({VGG16_URL})")
    parser.add_argument("--download", action="store_true", help="download the VGG16 checkpoint with torch.hub")
    parser.add_argument("--heads", default=None, help="lpips linear heads (default: the lpips package's vgg.pth)")
    parser.add_argument("--out", default=default_weights_path(), help="where to write the .npz")
    args = parser.parse_args(argv)
    if not args.convert:
        parser.error("nothing to do: pass --convert")
    print(f"Wrote {convert(args.vgg, args.out, args.heads, download=args.download)}")


if __name__ == "__main__":
    main()
