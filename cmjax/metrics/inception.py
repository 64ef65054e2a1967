"""The FID variant of Inception-v3 in Flax, and the one-time converter of its published PyTorch weights.

FID (Heusel et al. 2017) and IS (Salimans et al. 2016) are defined by TensorFlow's 2015-12-05 Inception graph.
pytorch-fid ports that graph as torchvision's Inception-v3 with 1008 classes and patched blocks
(`pytorch_fid.inception.FIDInceptionA/C/E_1/E_2`): average pools that ignore the zero padding, and a max pool in
the last block. `FIDInception` below is that network, parameter for parameter. It takes images in [0, 1] and
feeds them to the network by one of two protocols (`PROTOCOLS`, `config.eval.fid_protocol`):

- "tf_legacy": what the 2015 graph itself does to the uint8 image it is given at `ExpandDims:0`: TF1's
  `ResizeBilinear` to 299×299 (align_corners=False, *no* half-pixel offset: source = dst·in/out, edge-clamped,
  no antialias), then (x − 128)/128. This is the protocol of the published tables: openai's ADM evaluator
  (CM ImageNet-64/LSUN; its torch port emulates the same resize, evaluations/inception_v3.py:312-327) and
  clean-fid's `legacy_tensorflow` (the CM CIFAR-10 JAX release, jcm/metrics.py:117-148; ECT uses the same
  detector and resize).
- "pytorch_fid": pytorch-fid's input path: `F.interpolate(..., align_corners=False)` (half-pixel centres, no
  antialias) to 299×299, then 2x − 1.

It returns the 2048-d pool3 features (FID, precision/recall) and the 1008 logits of the IS: pool3 @ W of the
graph's `softmax/logits` layer *without its bias*, as the ADM evaluator (evaluations/evaluator.py:627-638) and
ECT (`no_output_bias=True`) compute the Inception Score.

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (URL and checksum prefix below) converted once to
`.npz` by `convert_state_dict` / `convert_file`; torch is needed only for that step:

  python -m cmjax.metrics.inception --input=pt_inception-2015-12-05-6726825d.pth [--output=PATH.npz]
  python -m cmjax.metrics.inception --download   # fetches the file (network) and converts it
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmjax import errors

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
# torch.hub's convention: the file name ends in the first hex digits of the file's SHA-256.
WEIGHTS_SHA256_PREFIX = "6726825d"
DEFAULT_WEIGHTS = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cmjax",
                               "pt_inception-2015-12-05-6726825d.npz")
INPUT_SIZE = 299  # the 2015 graph (and pytorch-fid) resizes every image to 299×299
PROTOCOLS = ("tf_legacy", "pytorch_fid")
MIN_INPUT_SIZE = 75  # the smallest input the strided, unpadded stem accepts
FEATURE_DIM = 2048
NUM_LOGITS = 1008
BN_EPSILON = 1e-3  # torchvision BasicConv2d


class BasicConv(nn.Module):
    """torchvision `BasicConv2d`: convolution without bias, batch norm (eps 1e-3, running statistics), ReLU."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        pad = [(self.padding[0], self.padding[0]), (self.padding[1], self.padding[1])]
        x = nn.Conv(self.features, self.kernel, strides=self.strides, padding=pad, use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
        return nn.relu(x)


def _avg_pool_same(x):
    """3×3 stride-1 average pool that ignores the zero padding (TensorFlow's; pytorch-fid's patch)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """`FIDInceptionA` (Mixed_5b/c/d)."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """torchvision `InceptionB` (Mixed_6a), unpatched."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """`FIDInceptionC` (Mixed_6b..e)."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """torchvision `InceptionD` (Mixed_7a), unpatched."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """`FIDInceptionE_1` (Mixed_7b: padding-free average pool) / `FIDInceptionE_2` (Mixed_7c: max pool)."""

    max_pool: bool

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.max_pool:  # pytorch-fid: the TF graph max-pools here (unlike the paper)
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_same(x)
        bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of PyTorch's bilinear `interpolate(align_corners=False)` along one axis (no antialias)."""
    # In float32, as PyTorch's CPU kernel computes the source coordinates.
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5),
                     np.float32(0.0))
    low = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    frac = (src - low.astype(np.float32)).astype(np.float64)
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.arange(out_size), low), 1.0 - frac)
    np.add.at(matrix, (np.arange(out_size), high), frac)
    return matrix.astype(np.float32)


def resize_matrix_tf_legacy(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of TF1's `ResizeBilinear` (align_corners=False, half_pixel_centers=False) along one axis:
    source coordinate dst·(in/out), lower = ⌊src⌋, upper = min(⌈src⌉, in − 1), no antialias."""
    # In float32, as TensorFlow's kernel (LegacyScaler) computes the source coordinates.
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    low = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    high = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
    frac = (src - np.floor(src)).astype(np.float64)
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.arange(out_size), low), 1.0 - frac)
    np.add.at(matrix, (np.arange(out_size), high), frac)
    return matrix.astype(np.float32)


def preprocess(images_bhwc, size: int = INPUT_SIZE, protocol: str = "pytorch_fid"):
    """[0, 1] RGB → the network's input at size×size by `protocol` (module docstring): "pytorch_fid" half-pixel
    bilinear resize then 2x − 1; "tf_legacy" the 2015 graph's TF1 resize then (255x − 128)/128. Grey images are
    repeated to RGB."""
    if protocol not in PROTOCOLS:
        raise errors.ConfigError(f"Unknown FID protocol {protocol!r} (config.eval.fid_protocol); choose one of "
                                 f"{list(PROTOCOLS)}.")
    matrix = resize_matrix_tf_legacy if protocol == "tf_legacy" else resize_matrix
    x = jnp.asarray(images_bhwc, jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (size, size):
        rows, cols = matrix(x.shape[1], size), matrix(x.shape[2], size)
        x = jnp.einsum("ph,bhwc->bpwc", rows, x, precision=jax.lax.Precision.HIGHEST)
        x = jnp.einsum("qw,bpwc->bpqc", cols, x, precision=jax.lax.Precision.HIGHEST)
    if protocol == "tf_legacy":
        return (255.0 * x - 128.0) / 128.0
    return 2.0 * x - 1.0


class UnbiasedLogits(nn.Module):
    """The graph's `softmax/logits` layer as the Inception Score uses it: pool3 @ W. The bias is kept in the
    weights (the converted file has it) but not added, as the ADM evaluator and ECT compute IS."""

    @nn.compact
    def __call__(self, pool):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (pool.shape[-1], NUM_LOGITS))
        self.param("bias", nn.initializers.zeros_init(), (NUM_LOGITS,))  # loaded, deliberately unused
        return jnp.dot(pool, kernel)


class FIDInception(nn.Module):
    """pytorch-fid's `InceptionV3([3])` + the 1008-way `fc`: images [B, H, W, 3|1] in [0, 1] →
    {"pool": [B, 2048], "logits": [B, 1008]} (logits = pool @ fc.kernel, no bias: `UnbiasedLogits`), with the
    input path of `protocol` (pytorch-fid's by default here; evaluation passes config.eval.fid_protocol)."""

    input_size: int = INPUT_SIZE
    protocol: str = "pytorch_fid"

    @nn.compact
    def __call__(self, images_bhwc):
        if self.input_size < MIN_INPUT_SIZE:
            raise errors.ConfigError(
                f"Inception needs inputs of at least {MIN_INPUT_SIZE} pixels; got {self.input_size}.")
        x = preprocess(images_bhwc, self.input_size, self.protocol)
        x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits = UnbiasedLogits(name="fc")(pool)
        return {"pool": pool, "logits": logits}


# ---------------------------------------------------------------------------------------------------------------
# Weights: PyTorch state dict → flat npz → Flax variables.


def _flax_name(torch_key: str) -> tuple[str, str] | None:
    """'Mixed_5b.branch1x1.conv.weight' → ('params', 'Mixed_5b/branch1x1/conv/kernel'); None for unused keys."""
    *path, leaf = torch_key.split(".")
    if leaf == "num_batches_tracked" or path[:1] == ["AuxLogits"]:
        return None
    if path[-1] == "conv":
        return "params", "/".join(path + ["kernel"])
    if path[-1] == "bn":
        collection, name = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                            "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}[leaf]
        return collection, "/".join(path + [name])
    if path == ["fc"]:
        return "params", "fc/" + {"weight": "kernel", "bias": "bias"}[leaf]
    raise KeyError(f"Unexpected key {torch_key!r} in an Inception state dict.")


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """pytorch-fid Inception state dict (tensors or arrays) → {"params/Mixed_5b/...": array} in Flax layouts:
    conv (out, in, kh, kw) → (kh, kw, in, out); fc (out, in) → (in, out)."""
    flat = {}
    for key, value in state_dict.items():
        name = _flax_name(key)
        if name is None:
            continue
        array = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, np.float32)
        if name[1].endswith("conv/kernel"):
            array = array.transpose(2, 3, 1, 0)
        elif name[1] == "fc/kernel":
            array = array.T
        flat["/".join(name)] = np.ascontiguousarray(array)
    return flat


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_file(pth_path: str, npz_path: str = DEFAULT_WEIGHTS, *, check_hash: bool = True) -> str:
    """Converts pytorch-fid's `.pth` (checked against WEIGHTS_SHA256_PREFIX) to the `.npz` `load_variables` reads."""
    import torch  # only the converter needs torch

    if check_hash and not sha256_of(pth_path).startswith(WEIGHTS_SHA256_PREFIX):
        raise errors.ConfigError(
            f"{pth_path!r} is not pytorch-fid's pt_inception-2015-12-05 file (SHA-256 does not start "
            f"with {WEIGHTS_SHA256_PREFIX}); download it from {WEIGHTS_URL}.")
    state_dict = torch.load(pth_path, map_location="cpu", weights_only=True)
    save_npz(convert_state_dict(state_dict), npz_path)
    return npz_path


def download_and_convert(npz_path: str = DEFAULT_WEIGHTS) -> str:
    """Downloads WEIGHTS_URL (needs a network; torch.hub checks the SHA-256 prefix) and converts it."""
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        pth = os.path.join(tmp, os.path.basename(WEIGHTS_URL))
        torch.hub.download_url_to_file(WEIGHTS_URL, pth, hash_prefix=WEIGHTS_SHA256_PREFIX)
        return convert_file(pth, npz_path)


def save_npz(flat: Mapping[str, np.ndarray], npz_path: str) -> None:
    """Writes the flat arrays atomically (a reader never sees half a file)."""
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    os.makedirs(os.path.dirname(os.path.abspath(npz_path)), exist_ok=True)
    partial = f"{npz_path}.tmp{os.getpid()}"
    with open(partial, "wb") as f:
        f.write(buffer.getvalue())
    os.replace(partial, npz_path)


def save_variables(variables: Mapping[str, Any], npz_path: str) -> None:
    """Flax variables of `FIDInception` → the flat `.npz` that `load_variables` reads."""
    flat = {"/".join([collection, *(str(k.key) for k in keys)]): np.asarray(leaf, np.float32)
            for collection in ("params", "batch_stats")
            for keys, leaf in jax.tree_util.tree_leaves_with_path(variables[collection])}
    save_npz(flat, npz_path)


def _template(input_size: int = MIN_INPUT_SIZE):
    """The module's variables as shapes (nothing computed)."""
    zeros = jnp.zeros((1, input_size, input_size, 3), jnp.float32)
    return jax.eval_shape(lambda: FIDInception(input_size).init(jax.random.key(0), zeros))


def missing_weights_message(path: str) -> str:
    return (f"Inception weights {path!r} not found. Convert pytorch-fid's file once (torch needed only for this): "
            f"`python -m cmjax.metrics.inception --download --output={path}` with a network, or download "
            f"{WEIGHTS_URL} and run `python -m cmjax.metrics.inception --input=pt_inception-2015-12-05-6726825d.pth "
            f"--output={path}`; or set config.eval.inception_weights.")


@functools.lru_cache(maxsize=2)
def load_variables(path: str = DEFAULT_WEIGHTS) -> dict[str, Any]:
    """{"params": ..., "batch_stats": ...} of `FIDInception` from a converted `.npz`; names and shapes checked."""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise errors.MissingFileError(missing_weights_message(path))
    template = _template()
    expected = {"/".join([collection, *(str(k.key) for k in keys)]): leaf
                for collection in ("params", "batch_stats")
                for keys, leaf in jax.tree_util.tree_leaves_with_path(template[collection])}
    with np.load(path, allow_pickle=False) as stored:
        names = set(stored.files)
        if names != set(expected):
            raise errors.ConfigError(
                f"{path!r} is not a converted FID Inception: missing {sorted(set(expected) - names)[:5]}, "
                f"unexpected {sorted(names - set(expected))[:5]}.")
        flat = {}
        for name, leaf in expected.items():
            if stored[name].shape != leaf.shape:
                raise errors.ConfigError(f"{path!r}: {name} has shape {stored[name].shape}, expected {leaf.shape}.")
            flat[name] = np.asarray(stored[name], np.float32)
    variables: dict[str, Any] = {}
    for name, value in flat.items():
        node = variables
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return variables


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Convert pytorch-fid's Inception weights to cmjax's .npz.")
    parser.add_argument("--input", help="pt_inception-2015-12-05-6726825d.pth (downloaded from WEIGHTS_URL)")
    parser.add_argument("--download", action="store_true", help=f"download {WEIGHTS_URL} first (network)")
    parser.add_argument("--output", default=DEFAULT_WEIGHTS, help="the .npz to write (config.eval.inception_weights)")
    args = parser.parse_args(argv)
    if args.download:
        print(download_and_convert(os.path.expanduser(args.output)))
    elif args.input:
        print(convert_file(args.input, os.path.expanduser(args.output)))
    else:
        parser.error("give --input=PATH.pth or --download")


if __name__ == "__main__":
    main()
