"""Name and layout maps: `cmjax.models.unet.UNet` params ↔ openai `cm/unet.py` state dicts, and their files.

Naming rule (flax → openai): join the path with ".", writing each `name_<digits>` segment as `name.<digits>`
(`input_blocks_5_1/qkv/kernel` → `input_blocks.5.1.qkv.weight`); leaves `kernel`, `scale`, `embedding` become
`weight`. Layouts: conv kernels HWIO → OIHW, Dense kernels (in, out) → (out, in), embeddings unchanged.

Attention qkv rows. `cm/unet.py`'s `AttentionBlock` defaults to `attention_type="flash"` and `UNetModel` never
overrides it (its `use_new_attention_order` flag is accepted and ignored), so the released CM checkpoints were
trained with `QKVFlashAttention`, whose einops pattern "b (three h d) s" orders the 3C rows
[all q heads | all k heads | all v heads]; diffusers' conversion script splits them with `chunk(3)`, which agrees.
Our `AttentionBlock` uses the same order, so the map is a plain transpose. guided-diffusion checkpoints and
cm's non-flash `QKVAttentionLegacy` order rows per head, [q_h k_h v_h]; `legacy_qkv_to_flash_order` converts those.

Files: `save_state_dict` / `load_state_dict` read and write `.pt` (`torch.save` of a plain state dict, what
`cm`'s `load_state_dict` and the released `cd_imagenet64_l2.pt`, `edm_imagenet64_ema.pt`, … hold; needs torch)
and `.safetensors` (safetensors' numpy API, no torch). `openai_unet_kwargs` gives the `cm.unet.UNetModel`
constructor arguments that build the matching network.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmjax import errors

_INDEXED = re.compile(r"_(\d+)(?=_|$)")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def openai_name(path: tuple[str, ...]) -> str:
    """The openai state-dict key of a flattened flax parameter path (see the module docstring's rule)."""
    *modules, leaf = path
    return ".".join([_INDEXED.sub(r".\1", m) for m in modules] + [_LEAF_NAMES[leaf]])


def _flat_params(params) -> dict[tuple[str, ...], Any]:
    params = nn.meta.unbox(params)
    params = params.get("params", params)
    flat = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
        flat[tuple(k.key for k in key_path)] = leaf
    return flat


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel" and len(shape) == 4:  # HWIO → OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if path[-1] == "kernel" and len(shape) == 2:  # (in, out) → (out, in)
        return (shape[1], shape[0])
    return tuple(shape)


def _to_torch_layout(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and array.ndim == 4:
        return np.transpose(array, (3, 2, 0, 1))
    if path[-1] == "kernel" and array.ndim == 2:
        return array.T
    return array


def _from_torch_layout(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if path[-1] == "kernel" and array.ndim == 2:
        return array.T
    return array


# Parameters that only training reads: sCM's log-variance head (`config.model.logvar_head`, the adaptive weight
# w(t) of sCT/sCD's loss) and iMF's auxiliary v-head (`config.model.velocity_head`, its v-loss). Samplers never
# call them, openai's and diffusers' UNets have no such layers: not exported (`models.AUXILIARY_HEAD_PREFIXES`).
def without_training_heads(params):
    """`params` without the auxiliary heads' top-level subtrees (`models.is_auxiliary_head`: a UNet trained with
    an sCM log-variance head or an iMF v-head)."""
    from cmjax import models

    return {k: v for k, v in params.items() if not models.is_auxiliary_head(k)}


def openai_state_dict_shapes(params) -> dict[str, tuple[int, ...]]:
    """openai key → torch shape, for a UNet parameter tree (arrays or `jax.eval_shape` structs)."""
    return {openai_name(p): _torch_shape(p, tuple(leaf.shape)) for p, leaf in _flat_params(params).items()}


def to_openai_state_dict(params) -> dict[str, np.ndarray]:
    """The UNet's parameters as an openai `cm/unet.py` state dict (float32 numpy, torch layouts)."""
    return {
        openai_name(p): np.ascontiguousarray(_to_torch_layout(p, np.asarray(jax.device_get(leaf), np.float32)))
        for p, leaf in _flat_params(params).items()
    }


def from_openai_state_dict(state_dict: Mapping[str, Any], params_template) -> dict:
    """A UNet parameter tree (nested dicts of float32 numpy) from an openai state dict, shaped like `params_template`.

    Raises a ValueError naming every missing, unexpected or mis-shaped key.
    """
    flat = _flat_params(params_template)
    by_name = {openai_name(p): p for p in flat}
    missing = sorted(set(by_name) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(by_name))
    wrong = [
        f"{name}: checkpoint {tuple(np.shape(state_dict[name]))}, model {_torch_shape(path, tuple(flat[path].shape))}"
        for name, path in by_name.items()
        if name in state_dict and tuple(np.shape(state_dict[name])) != _torch_shape(path, tuple(flat[path].shape))
    ]
    if missing or unexpected or wrong:
        raise errors.ConfigError(
            "The openai state dict does not match this UNet configuration "
            f"(check model_channels, channel_mult, num_res_blocks, attention_resolutions, num_classes). "
            f"Missing: {missing[:8]}{'…' if len(missing) > 8 else ''}; unexpected: {unexpected[:8]}"
            f"{'…' if len(unexpected) > 8 else ''}; wrong shapes: {wrong[:8]}."
        )
    tree: dict = {}
    for name, path in by_name.items():
        array = np.asarray(state_dict[name], dtype=np.float32)
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(_from_torch_layout(path, array))
    return tree


def legacy_qkv_to_flash_order(qkv: np.ndarray, num_heads: int) -> np.ndarray:
    """Reorders qkv rows (axis 0) from `QKVAttentionLegacy`'s per-head [q_h k_h v_h] to [all q | all k | all v]."""
    qkv = np.asarray(qkv)
    head_dim = qkv.shape[0] // (3 * num_heads)
    per_head = qkv.reshape((num_heads, 3, head_dim) + qkv.shape[1:])
    return np.swapaxes(per_head, 0, 1).reshape(qkv.shape)


# ---------------------------------------------------------------------------------------------------------------
# The network a cmjax model config describes, and what openai's `cm` code needs to rebuild it.

SUPPORTED_MODEL = "unet"


def unet_from_model_config(model_config: Mapping[str, Any], target: str):
    """The `cmjax.models.unet.UNet` of `model_config`; a clear error when `target` cannot hold that network."""
    from cmjax import models

    name = model_config.get("name")
    if name != SUPPORTED_MODEL:
        raise errors.ConfigError(
            f"{target} supports config.model.name={SUPPORTED_MODEL!r} (the ADM UNet of openai's cm/unet.py, "
            f"diffusers' UNet2DModel); this model is {name!r}, which {target} cannot represent.")
    unet = models.get(model_config)
    for field, plain in (("time_embedding", "positional"), ("emb_norm", "none")):
        if getattr(unet, field) != plain:
            raise errors.ConfigError(f"{target} holds the ADM UNet with {field}={plain!r}; this one has "
                             f"{field}={getattr(unet, field)!r}.")
    return unet


def unet_param_shapes(unet) -> dict:
    """The UNet's parameter tree as `jax.ShapeDtypeStruct`s (`jax.eval_shape`: nothing is allocated)."""
    size = unet.image_size
    labels = jnp.zeros((1,), jnp.int32) if unet.num_classes else None
    variables = jax.eval_shape(lambda: unet.init(
        jax.random.key(0), jnp.zeros((1, size, size, unet.in_channels)), jnp.zeros((1,)), labels))
    return nn.meta.unbox(variables["params"])


def openai_unet_kwargs(unet) -> dict[str, Any]:
    """Keyword arguments of `cm.unet.UNetModel` (openai/consistency_models) for the same network.

    openai takes `attention_resolutions` as downsampling rates (image_size // resolution), ours as resolutions.
    """
    return {
        "image_size": unet.image_size,
        "in_channels": unet.in_channels,
        "model_channels": unet.model_channels,
        "out_channels": unet.out_channels,
        "num_res_blocks": unet.num_res_blocks,
        "attention_resolutions": sorted(unet.image_size // r for r in unet.attention_resolutions),
        "dropout": unet.dropout,
        "channel_mult": list(unet.channel_mult),
        "conv_resample": unet.conv_resample,
        "dims": 2,
        "num_classes": unet.num_classes or None,
        "use_checkpoint": False,
        "use_fp16": False,
        "num_heads": unet.num_heads,
        "num_head_channels": unet.num_head_channels,
        "num_heads_upsample": -1,
        "use_scale_shift_norm": unet.use_scale_shift_norm,
        "resblock_updown": unet.resblock_updown,
        "use_new_attention_order": False,
    }


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str) -> str:
    """Writes a state dict as `.pt` (torch.save of CPU tensors; needs torch) or `.safetensors` (numpy API)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in state_dict.items()}
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file(arrays, path, metadata={"format": "pt"})
    elif path.endswith(".pt"):
        import torch

        torch.save({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, path)
    else:
        raise errors.ConfigError(f"An openai state dict is written as .pt or .safetensors, not {path!r}.")
    return path


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads an openai state dict from `.pt` (needs torch; tensors only, never pickled code) or `.safetensors`."""
    if not os.path.isfile(path):
        raise errors.MissingFileError(f"--input={path!r}: no such file (an openai .pt or .safetensors state dict).")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
        except Exception as err:  # safetensors raises its own SafetensorError for a damaged or foreign file
            raise errors.UserError(f"{path!r} is not a readable safetensors state dict ({err}).") from err
    if path.endswith((".pt", ".pth")):
        try:
            import torch
        except ImportError:
            raise ImportError(f"Reading {path!r} needs torch; install it, or convert the file to .safetensors.") \
                from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch's unpickling errors name neither the file nor what was expected
            raise errors.UserError(
                f"{path!r} is not a PyTorch state dict that torch.load(weights_only=True) can read "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); pass an openai cm "
                "checkpoint (.pt) or a .safetensors file.") from err
        if "state_dict" in state and not hasattr(state["state_dict"], "shape"):
            state = state["state_dict"]
        return {k: v.detach().float().numpy() for k, v in state.items()}
    raise errors.ConfigError(f"An openai state dict is a .pt or .safetensors file, not {path!r}.")
