"""diffusers layout: `cmjax.models.unet.UNet` ↔ `UNet2DModel`, and the `ConsistencyModelPipeline` folder.

The UNet is the openai network under diffusers' names, as diffusers' `scripts/convert_consistency_to_diffusers.py`
renames it: ResBlock `in_layers.0/2, emb_layers.1, out_layers.0/3, skip_connection` → `norm1, conv1,
time_emb_proj, norm2, conv2, conv_shortcut`; attention `norm, qkv, proj_out` → `group_norm, to_q/to_k/to_v
(qkv rows split in three: [all q | all k | all v]), to_out.0` as Linears (1×1 convs squeezed). Names go through
openai's (`cmjax.interop.openai`), so the layout rules live in one place.

A folder (diffusers `DiffusionPipeline.save_pretrained` layout) holds `model_index.json`
(`ConsistencyModelPipeline`), `unet/config.json` + `unet/diffusion_pytorch_model.safetensors` (`UNet2DModel`,
float32, written with safetensors' numpy API: no torch needed) and `scheduler/scheduler_config.json`
(`CMStochasticIterativeScheduler`: the σ range, ρ, σ_data and grid size the run trained with). The scheduler
applies the consistency boundary scalings (CM App. C), so only consistency-parameterised runs export as a pipeline.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from cmjax import errors
from cmjax.interop import openai

UNET_DIR, SCHEDULER_DIR = "unet", "scheduler"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
# The version written into the JSON files when diffusers is not installed: ConsistencyModelPipeline's first release.
_MIN_DIFFUSERS_VERSION = "0.19.0"

_RESBLOCK_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# diffusers' deprecated attention parameter names (folders saved before diffusers 0.14), read on import.
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# `UNet2DModel.__init__` defaults of the keys a folder may leave out.
UNET2D_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "center_input_sample": False, "time_embedding_type": "positional",
    "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True, "mid_block_type": "UNetMidBlock2D",
    "layers_per_block": 2, "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32,
    "attn_norm_num_groups": None, "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
}


def _levels_with_attention(unet) -> list[bool]:
    return [unet.image_size // 2**level in unet.attention_resolutions for level in range(len(unet.channel_mult))]


def diffusers_unet2d_config(unet) -> dict[str, Any]:
    """The `UNet2DModel` config that builds the same network as `unet` (a `cmjax.models.unet.UNet`)."""
    if unet.num_head_channels == -1 and unet.num_heads != 1:
        raise errors.ConfigError("diffusers' UNet2DModel has fixed-width heads or one head per block: set "
                         "num_head_channels (e.g. 64), or num_heads=1.")
    if not unet.conv_resample and not unet.resblock_updown:
        raise errors.ConfigError(
            "diffusers' UNet2DModel has no conv-free resampling: use conv_resample or resblock_updown.")
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
        # None: one head as wide as the block (openai num_heads=1, num_head_channels=-1).
        "attention_head_dim": None if unet.num_head_channels == -1 else unet.num_head_channels,
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


def _diffusers_names(key: str, prefixes: Mapping[str, str]) -> tuple[str, ...]:
    """The diffusers key(s) of one openai key: three for a fused qkv (to_q, to_k, to_v), else one."""
    parts = key.split(".")
    # Longest module prefix that the map knows; the rest is the path inside that module.
    cut = next((i for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in prefixes), None)
    if cut is None:
        raise errors.ConfigError(f"No diffusers name for openai key {key!r}.")
    module, leaf, inner = prefixes[".".join(parts[:cut])], parts[-1], ".".join(parts[cut:-1])
    if inner in _RESBLOCK_NAMES:
        return (f"{module}.{_RESBLOCK_NAMES[inner]}.{leaf}",)
    if inner == "norm":
        return (f"{module}.group_norm.{leaf}",)
    if inner == "qkv":
        return tuple(f"{module}.{name}.{leaf}" for name in ("to_q", "to_k", "to_v"))
    if inner == "proj_out":
        return (f"{module}.to_out.0.{leaf}",)
    if inner == "":
        return (f"{module}.{leaf}",)
    raise errors.ConfigError(f"No diffusers name for openai key {key!r}.")


def _is_attention_linear(key: str) -> bool:
    return key.split(".")[-2] in ("qkv", "proj_out")


def openai_to_diffusers_state_dict(state_dict: Mapping[str, np.ndarray], unet) -> dict[str, np.ndarray]:
    """Renames (and splits qkv / squeezes 1×1 attention convs of) an openai state dict into `UNet2DModel`'s keys."""
    prefixes = openai_to_diffusers_prefixes(unet)
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        value = np.asarray(value)
        names = _diffusers_names(key, prefixes)
        parts = np.split(value, len(names), axis=0)
        for name, part in zip(names, parts):
            out[name] = part.reshape(part.shape[:2]) if _is_attention_linear(key) and part.ndim == 4 else part
    return out


def diffusers_to_openai_state_dict(state_dict: Mapping[str, Any], unet) -> dict[str, np.ndarray]:
    """The inverse of `openai_to_diffusers_state_dict` for `unet`'s keys: joins to_q/to_k/to_v into qkv rows
    [q | k | v] and restores 1×1 conv shapes. Raises a ValueError naming missing, unexpected and mis-shaped keys.
    """
    state_dict = {_modern_attention_name(k): np.asarray(v, np.float32) for k, v in state_dict.items()}
    prefixes = openai_to_diffusers_prefixes(unet)
    expected = openai.openai_state_dict_shapes(openai.unet_param_shapes(unet))
    out, used, missing, wrong = {}, set(), [], []
    for key, shape in expected.items():
        names = _diffusers_names(key, prefixes)
        if any(name not in state_dict for name in names):
            missing += [name for name in names if name not in state_dict]
            continue
        used.update(names)
        value = np.concatenate([state_dict[name] for name in names], axis=0)
        if value.size != int(np.prod(shape)) or (value.shape != shape and not _is_attention_linear(key)):
            wrong.append(f"{'/'.join(names)}: folder {value.shape}, model {shape}")
            continue
        out[key] = value.reshape(shape)
    unexpected = sorted(set(state_dict) - used)
    if missing or unexpected or wrong:
        raise errors.ConfigError(
            "The UNet2DModel weights do not match the network its config describes. "
            f"Missing: {sorted(missing)[:8]}; unexpected: {unexpected[:8]}; wrong shapes: {wrong[:8]}.")
    return out


def _modern_attention_name(key: str) -> str:
    parts = key.split(".")
    if len(parts) >= 2 and "attentions" in parts and parts[-2] in _LEGACY_ATTENTION_NAMES:
        return ".".join(parts[:-2] + [_LEGACY_ATTENTION_NAMES[parts[-2]], parts[-1]])
    return key


def to_diffusers_state_dict(params, unet) -> dict[str, np.ndarray]:
    """The UNet's parameters as a `diffusers.UNet2DModel(**diffusers_unet2d_config(unet))` state dict."""
    return openai_to_diffusers_state_dict(openai.to_openai_state_dict(params), unet)


def from_diffusers_state_dict(state_dict: Mapping[str, Any], unet) -> dict:
    """UNet parameters (nested dicts of float32 numpy) from a `UNet2DModel` state dict of the same network."""
    return openai.from_openai_state_dict(diffusers_to_openai_state_dict(state_dict, unet),
                                         openai.unet_param_shapes(unet))


# ---------------------------------------------------------------------------------------------------------------
# UNet2DModel config → UNet fields.


def unet_fields_from_diffusers_config(unet_config: Mapping[str, Any]) -> dict[str, Any]:
    """`cmjax.models.unet.UNet` fields of the network a `UNet2DModel` config builds.

    Raises a ValueError naming each config key the ADM UNet cannot represent (e.g. a mid-block without
    attention, another activation, a time embedding other than positional).
    """
    from cmjax.models.unet import UNet

    given = {**UNET2D_DEFAULTS, **{k: v for k, v in unet_config.items() if not k.startswith("_")}}
    size = given.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise errors.ConfigError(f"cmjax's UNet is square; this UNet2DModel has sample_size={size}.")
        size = size[0]
    if not size:
        raise errors.ConfigError("The UNet2DModel config has no sample_size; cmjax needs the image size.")
    widths = [int(w) for w in given["block_out_channels"]]
    if any(w % widths[0] for w in widths):
        raise errors.ConfigError(f"block_out_channels={widths} are not multiples of the first (cmjax: model_channels × "
                         "channel_mult).")
    attention = [t.startswith("Attn") for t in given["down_block_types"]]
    head_dim = given["attention_head_dim"]
    fields = {
        "image_size": int(size),
        "in_channels": int(given["in_channels"]),
        "out_channels": int(given["out_channels"]),
        "model_channels": widths[0],
        "channel_mult": tuple(w // widths[0] for w in widths),
        "num_res_blocks": int(given["layers_per_block"]),
        "attention_resolutions": tuple(int(size) // 2**level for level, a in enumerate(attention) if a),
        "num_heads": 1,
        "num_head_channels": -1 if head_dim is None else int(head_dim),
        "use_scale_shift_norm": given["resnet_time_scale_shift"] == "scale_shift",
        "resblock_updown": given["downsample_type"] == "resnet",
        "conv_resample": True,
        "num_classes": int(given["num_class_embeds"] or 0),
        "dropout": float(given["dropout"]),
    }
    # The config the ADM UNet maps to must be the given one, key by key (diffusers' own defaults filled in).
    expected = {**diffusers_unet2d_config(UNet(**fields)), "center_input_sample": False, "time_embedding_dim": None,
                "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_padding": 1,
                "act_fn": "silu", "class_embed_type": None}
    if given["attn_norm_num_groups"] is None and given["resnet_time_scale_shift"] == "default":
        given["attn_norm_num_groups"] = given["norm_num_groups"]  # what UNetMidBlock2D does then
    if given["time_embedding_dim"] == 4 * widths[0]:
        given["time_embedding_dim"] = None
    given["sample_size"] = size
    differing = [f"{key}={_plain(given[key])!r} (the ADM UNet needs {_plain(value)!r})"
                 for key, value in expected.items() if key != "dropout" and _plain(given[key]) != _plain(value)]
    if differing:
        raise errors.ConfigError(
            "This UNet2DModel is not an ADM UNet that cmjax can hold: " + "; ".join(differing) + ".")
    return fields


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------------------------------------------------------
# The pipeline folder.


def diffusers_version() -> str:
    """The installed diffusers version (written into the JSON files), or the first with ConsistencyModelPipeline."""
    from importlib import metadata

    try:
        return metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        return _MIN_DIFFUSERS_VERSION


def scheduler_config(*, num_train_timesteps: int, sigma_min: float, sigma_max: float, sigma_data: float,
                     rho: float) -> dict[str, Any]:
    """`CMStochasticIterativeScheduler` config: the Karras grid the consistency model was trained on."""
    return {
        "_class_name": "CMStochasticIterativeScheduler",
        "_diffusers_version": diffusers_version(),
        "num_train_timesteps": int(num_train_timesteps),
        "sigma_min": float(sigma_min),
        "sigma_max": float(sigma_max),
        "sigma_data": float(sigma_data),
        "s_noise": 1.0,
        "rho": float(rho),
        "clip_denoised": True,
    }


def write_json(path: str, content: Mapping[str, Any]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(content, f, indent=2)
        f.write("\n")
    return path


def write_pipeline(output: str, params, unet, scheduler: Mapping[str, Any]) -> dict[str, str]:
    """Writes a `ConsistencyModelPipeline.from_pretrained`-loadable folder; returns the paths it wrote."""
    from safetensors.numpy import save_file

    version = diffusers_version()
    paths = {
        "model_index": write_json(os.path.join(output, "model_index.json"), {
            "_class_name": "ConsistencyModelPipeline", "_diffusers_version": version,
            "scheduler": ["diffusers", "CMStochasticIterativeScheduler"], "unet": ["diffusers", "UNet2DModel"]}),
        "unet_config": write_json(os.path.join(output, UNET_DIR, "config.json"), {
            "_class_name": "UNet2DModel", "_diffusers_version": version, **diffusers_unet2d_config(unet)}),
        "scheduler_config": write_json(os.path.join(output, SCHEDULER_DIR, "scheduler_config.json"), scheduler),
    }
    weights = os.path.join(output, UNET_DIR, UNET_WEIGHTS)
    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in to_diffusers_state_dict(params, unet).items()}
    save_file(arrays, weights, metadata={"format": "pt"})
    paths["unet_weights"] = weights
    return paths


TRIGFLOW_SAMPLER_FILE = "cmjax_trigflow_sampler.json"


def write_trigflow_unet(output: str, params, unet, sampler: Mapping[str, Any]) -> dict[str, str]:
    """An sCM (TrigFlow) network for PyTorch: `unet/` as `UNet2DModel.from_pretrained(output, subfolder="unet")`
    loads it (the pipeline folder's layout, without a pipeline: no diffusers scheduler samples TrigFlow), and
    `cmjax_trigflow_sampler.json` with the settings of the 1-/2-step sampler documented in docs/export.md."""
    from safetensors.numpy import save_file

    paths = {
        "unet_config": write_json(os.path.join(output, UNET_DIR, "config.json"), {
            "_class_name": "UNet2DModel", "_diffusers_version": diffusers_version(), **diffusers_unet2d_config(unet)}),
        "sampler": write_json(os.path.join(output, TRIGFLOW_SAMPLER_FILE), dict(sampler)),
    }
    weights = os.path.join(output, UNET_DIR, UNET_WEIGHTS)
    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in to_diffusers_state_dict(params, unet).items()}
    save_file(arrays, weights, metadata={"format": "pt"})
    paths["unet_weights"] = weights
    return paths


def read_unet(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(UNet fields, diffusers state dict) of a pipeline folder or its `unet/` folder (safetensors weights)."""
    from safetensors.numpy import load_file

    folder = os.path.join(path, UNET_DIR) if os.path.isdir(os.path.join(path, UNET_DIR)) else path
    config_path, weights_path = os.path.join(folder, "config.json"), os.path.join(folder, UNET_WEIGHTS)
    for needed in (config_path, weights_path):
        if not os.path.exists(needed):
            raise errors.MissingFileError(
                f"{needed!r} does not exist: --input must be a diffusers pipeline folder or its unet/ folder, "
                f"holding config.json and {UNET_WEIGHTS}.")
    with open(config_path) as f:
        unet_config = json.load(f)
    if unet_config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise errors.ConfigError(
            f"{config_path!r} describes a {unet_config['_class_name']}; cmjax imports UNet2DModel.")
    return unet_fields_from_diffusers_config(unet_config), load_file(weights_path)
