"""Name and layout maps: `cmjax.models.unet.UNet` params ↔ openai `cm/unet.py` state dicts ↔ diffusers `UNet2DModel`.

Naming rule (flax → openai): join the path with ".", writing each `name_<digits>` segment as `name.<digits>`
(`input_blocks_5_1/qkv/kernel` → `input_blocks.5.1.qkv.weight`); leaves `kernel`, `scale`, `embedding` become
`weight`. Layouts: conv kernels HWIO → OIHW, Dense kernels (in, out) → (out, in), embeddings unchanged.

Attention qkv rows. `cm/unet.py`'s `AttentionBlock` defaults to `attention_type="flash"` and `UNetModel` never
overrides it (its `use_new_attention_order` flag is accepted and ignored), so the released CM checkpoints were
trained with `QKVFlashAttention`, whose einops pattern "b (three h d) s" orders the 3C rows
[all q heads | all k heads | all v heads]; diffusers' conversion script splits them with `chunk(3)`, which agrees.
Our `AttentionBlock` uses the same order, so the map is a plain transpose. guided-diffusion checkpoints and
cm's non-flash `QKVAttentionLegacy` order rows per head, [q_h k_h v_h]; `legacy_qkv_to_flash_order` converts those.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

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
        raise ValueError(
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
# diffusers UNet2DModel: the same network under diffusers' names (as in diffusers'
# scripts/convert_consistency_to_diffusers.py), with attention as separate to_q/to_k/to_v/to_out.0 Linears.

_RESBLOCK_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _levels_with_attention(unet) -> list[bool]:
    return [unet.image_size // 2**level in unet.attention_resolutions for level in range(len(unet.channel_mult))]


def diffusers_unet2d_config(unet) -> dict[str, Any]:
    """The `UNet2DModel` config that builds the same network as `unet` (a `cmjax.models.unet.UNet`)."""
    if unet.num_head_channels == -1:
        raise ValueError("diffusers' UNet2DModel needs fixed-width heads: set num_head_channels (e.g. 64).")
    if not unet.conv_resample and not unet.resblock_updown:
        raise ValueError("diffusers' UNet2DModel has no conv-free resampling: use conv_resample or resblock_updown.")
    attn = _levels_with_attention(unet)
    plain_down, plain_up = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if unet.resblock_updown else (
        "DownBlock2D",
        "UpBlock2D",
    )
    return {
        "sample_size": unet.image_size,
        "in_channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "block_out_channels": [int(m * unet.model_channels) for m in unet.channel_mult],
        "layers_per_block": unet.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else plain_down for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else plain_up for a in reversed(attn)],
        "downsample_type": "resnet" if unet.resblock_updown else "conv",
        "upsample_type": "resnet" if unet.resblock_updown else "conv",
        "attention_head_dim": unet.num_head_channels,
        "norm_num_groups": 32,
        # Without this, diffusers drops the mid-block attention's GroupNorm when scale-shift is on.
        "attn_norm_num_groups": 32,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if unet.use_scale_shift_norm else "default",
        "add_attention": True,
        "num_class_embeds": unet.num_classes or None,
        "dropout": unet.dropout,
    }


def openai_to_diffusers_prefixes(unet) -> dict[str, str]:
    """openai module path → diffusers module path for every parameterised module of `unet`."""
    prefixes = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "label_emb": "class_embedding",
        "input_blocks.0.0": "conv_in",
        "middle_block.0": "mid_block.resnets.0",
        "middle_block.1": "mid_block.attentions.0",
        "middle_block.2": "mid_block.resnets.1",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }
    attn = _levels_with_attention(unet)
    levels = len(unet.channel_mult)
    resample = "" if unet.resblock_updown else ".op"
    index = 1
    for level in range(levels):
        for j in range(unet.num_res_blocks):
            prefixes[f"input_blocks.{index}.0"] = f"down_blocks.{level}.resnets.{j}"
            prefixes[f"input_blocks.{index}.1"] = f"down_blocks.{level}.attentions.{j}"
            index += 1
        if level != levels - 1:
            target = f"down_blocks.{level}.downsamplers.0" + (".conv" if resample else "")
            prefixes[f"input_blocks.{index}.0{resample}"] = target
            index += 1
    index = 0
    for up_level, level in enumerate(reversed(range(levels))):
        for j in range(unet.num_res_blocks + 1):
            prefixes[f"output_blocks.{index}.0"] = f"up_blocks.{up_level}.resnets.{j}"
            prefixes[f"output_blocks.{index}.1"] = f"up_blocks.{up_level}.attentions.{j}"
            if level and j == unet.num_res_blocks:
                sub = 2 if attn[level] else 1
                source = f"output_blocks.{index}.{sub}" + ("" if unet.resblock_updown else ".conv")
                prefixes[source] = f"up_blocks.{up_level}.upsamplers.0" + ("" if unet.resblock_updown else ".conv")
            index += 1
    return prefixes


def openai_to_diffusers_state_dict(state_dict: Mapping[str, np.ndarray], unet) -> dict[str, np.ndarray]:
    """Renames (and splits qkv / squeezes 1×1 attention convs of) an openai state dict into `UNet2DModel`'s keys."""
    prefixes = openai_to_diffusers_prefixes(unet)
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        value = np.asarray(value)
        parts = key.split(".")
        # Longest module prefix that the map knows; the rest is the path inside that module.
        cut = next(i for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in prefixes)
        module, rest = prefixes[".".join(parts[:cut])], ".".join(parts[cut:])
        leaf = parts[-1]
        inner = ".".join(parts[cut:-1])
        if inner in _RESBLOCK_NAMES:
            out[f"{module}.{_RESBLOCK_NAMES[inner]}.{leaf}"] = value
        elif inner == "norm":
            out[f"{module}.group_norm.{leaf}"] = value
        elif inner == "qkv":
            for name, part in zip(("to_q", "to_k", "to_v"), np.split(value, 3, axis=0)):
                out[f"{module}.{name}.{leaf}"] = part.reshape(part.shape[:2]) if part.ndim == 4 else part
        elif inner == "proj_out":
            out[f"{module}.to_out.0.{leaf}"] = value.reshape(value.shape[:2]) if value.ndim == 4 else value
        elif inner == "":
            out[f"{module}.{rest}"] = value
        else:
            raise ValueError(f"No diffusers name for openai key {key!r}.")
    return out


def to_diffusers_state_dict(params, unet) -> dict[str, np.ndarray]:
    """The UNet's parameters as a `diffusers.UNet2DModel(**diffusers_unet2d_config(unet))` state dict."""
    return openai_to_diffusers_state_dict(to_openai_state_dict(params), unet)
