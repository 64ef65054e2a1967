"""diffusers `AutoencoderKL` folders ↔ `cmjax.models.vae.AutoencoderKL` and its parameters.

A folder is what `AutoencoderKL.save_pretrained(folder)` writes: `config.json` (`_class_name: AutoencoderKL`) and
`diffusion_pytorch_model.safetensors`; a pipeline folder's `vae/` subfolder is the same. The real SD-VAE is such a
folder once downloaded (`huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir sd-vae-ft-ema`, or the
snapshot folder in diffusers' cache); docs/vae.md has the steps. Nothing here downloads.

Names follow the rule of `cmjax.interop.openai` (flax `a_0/b/kernel` ↔ torch `a.0.b.weight`; conv kernels
HWIO ↔ OIHW, Dense kernels (in, out) ↔ (out, in)), which the VAE's parameter tree is built to satisfy; the mid
blocks' attention keys of folders saved before diffusers 0.14 (`query/key/value/proj_attn`) are read as
`to_q/to_k/to_v/to_out.0`, as diffusers itself does on load (`ModelMixin._fix_state_dict_keys_on_load`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from cmjax import errors
from cmjax.interop import diffusers as interop_diffusers
from cmjax.interop import openai
from cmjax.models import vae

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
# `save_pretrained(variant="fp16")` writes this name; read when the plain file is absent (weights become float32).
FP16_WEIGHTS_FILE = "diffusion_pytorch_model.fp16.safetensors"
VAE_DIR = "vae"

DOWN_BLOCK, UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"
# `AutoencoderKL.__init__` defaults (diffusers 0.42 autoencoder_kl.py:78-98) of the keys a config may leave out.
AUTOENCODER_KL_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": [DOWN_BLOCK], "up_block_types": [UP_BLOCK],
    "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32,
    "sample_size": 32, "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None,
    "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}
# Keys that are module fields one to one.
_FIELDS = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
           "norm_num_groups", "sample_size", "scaling_factor", "shift_factor", "use_quant_conv",
           "use_post_quant_conv", "mid_block_add_attention")


def diffusers_config(module: vae.AutoencoderKL) -> dict[str, Any]:
    """The `AutoencoderKL(**config)` keyword arguments that build the same network as `module`."""
    levels = len(module.block_out_channels)
    config = {key: getattr(module, key) for key in _FIELDS}
    config["block_out_channels"] = [int(w) for w in module.block_out_channels]
    config.update(down_block_types=[DOWN_BLOCK] * levels, up_block_types=[UP_BLOCK] * levels, act_fn="silu")
    return config


def fields_from_diffusers_config(config: Mapping[str, Any], *, source: str = "the config") -> dict[str, Any]:
    """`vae.AutoencoderKL` fields of the network an `AutoencoderKL` config builds; a ConfigError names every key
    this Flax port cannot represent (other block types or activation, latents_mean/std, unknown keys)."""
    given = {**AUTOENCODER_KL_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    levels = len(given["block_out_channels"])
    problems = [f"unknown key {key!r}" for key in sorted(set(given) - set(AUTOENCODER_KL_DEFAULTS))]
    for key, block in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
        if list(given[key]) != [block] * levels:
            problems.append(f"{key}={list(given[key])} (cmjax needs {levels}× {block!r})")
    if given["act_fn"] not in ("silu", "swish"):  # diffusers' get_activation: both are SiLU
        problems.append(f"act_fn={given['act_fn']!r} (cmjax needs 'silu')")
    for key in ("latents_mean", "latents_std"):
        if given[key] is not None:
            problems.append(f"{key} is set (per-channel latent statistics; cmjax scales by scaling_factor and "
                            "shift_factor only)")
    if problems:
        raise errors.ConfigError(f"{source} is not an SD-family AutoencoderKL that cmjax can hold: "
                                 + "; ".join(problems) + ".")
    fields = {key: given[key] for key in _FIELDS}
    size = fields["sample_size"]
    fields["sample_size"] = int(size[0] if isinstance(size, (list, tuple)) else size)
    fields["block_out_channels"] = tuple(int(w) for w in fields["block_out_channels"])
    return fields


# ---------------------------------------------------------------------------------------------------------------
# State dicts.


def to_diffusers_state_dict(params, module: vae.AutoencoderKL | None = None) -> dict[str, np.ndarray]:
    """The parameters as an `AutoencoderKL(**diffusers_config(module))` state dict (float32 numpy, torch layouts).
    `module` is accepted for symmetry with `from_diffusers_state_dict`; the names come from the tree alone."""
    del module
    return openai.to_openai_state_dict(params)


def from_diffusers_state_dict(state_dict: Mapping[str, Any], module: vae.AutoencoderKL) -> dict:
    """`module`'s parameters (nested dicts of float32 numpy) from a diffusers `AutoencoderKL` state dict; a
    ConfigError names every missing, unexpected or mis-shaped key."""
    state_dict = {interop_diffusers._modern_attention_name(k): np.asarray(v) for k, v in state_dict.items()}
    shapes = vae.param_shapes(module)
    expected = openai.openai_state_dict_shapes(shapes)
    for key, shape in expected.items():  # 1×1-conv attention weights (some converted LDM files) → Linear
        value = state_dict.get(key)
        if value is not None and len(shape) == 2 and value.shape == (*shape, 1, 1):
            state_dict[key] = value[:, :, 0, 0]
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{key}: folder {tuple(state_dict[key].shape)}, model {shape}"
             for key, shape in expected.items() if key in state_dict and tuple(state_dict[key].shape) != shape]
    if missing or unexpected or wrong:
        raise errors.ConfigError(
            "The AutoencoderKL weights do not match the network its config describes (block_out_channels, "
            f"layers_per_block, latent_channels, use_quant_conv, …). Missing: {missing[:8]}"
            f"{'…' if len(missing) > 8 else ''}; unexpected: {unexpected[:8]}{'…' if len(unexpected) > 8 else ''}; "
            f"wrong shapes: {wrong[:8]}.")
    return openai.from_openai_state_dict(state_dict, shapes)


# ---------------------------------------------------------------------------------------------------------------
# Folders.


def _vae_folder(folder: str) -> str:
    if not os.path.isdir(folder):
        raise errors.MissingFileError(
            f"{folder!r} is not a folder: give a diffusers AutoencoderKL folder (config.json + {WEIGHTS_FILE}, as "
            "`huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir DIR` writes) or a pipeline folder "
            "with a vae/ subfolder.")
    nested = os.path.join(folder, VAE_DIR)
    if not os.path.exists(os.path.join(folder, CONFIG_FILE)) and os.path.isdir(nested):
        return nested
    return folder


def read_config(folder: str) -> dict[str, Any]:
    """The `config.json` of an AutoencoderKL folder (or of a pipeline folder's vae/), checked to be one."""
    folder = _vae_folder(folder)
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.exists(path):
        raise errors.MissingFileError(
            f"{folder!r} holds no {CONFIG_FILE}: it is not a diffusers AutoencoderKL folder. Point at the folder "
            f"that `AutoencoderKL.save_pretrained` or `huggingface-cli download` wrote (config.json + {WEIGHTS_FILE}).")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise errors.ConfigError(f"{path!r} is not readable JSON ({e}).") from e
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise errors.ConfigError(
            f"{path!r} describes a {name!r}, not an AutoencoderKL: give the VAE's folder (in a pipeline, its vae/).")
    return config


def load_autoencoder(folder: str, *, dtype: Any = jnp.float32) -> tuple[vae.AutoencoderKL, dict]:
    """(module, params) of a diffusers AutoencoderKL folder: the Flax network its config.json describes (compute
    dtype `dtype`) and its weights as nested dicts of float32 numpy. Raises a UserError for a folder that is not
    one (no config.json, another `_class_name`, no weights, weights of another shape)."""
    from safetensors.numpy import load_file

    folder = _vae_folder(folder)
    config = read_config(folder)
    module = vae.AutoencoderKL(**fields_from_diffusers_config(config, source=os.path.join(folder, CONFIG_FILE)),
                               dtype=dtype)
    weights = next((os.path.join(folder, name) for name in (WEIGHTS_FILE, FP16_WEIGHTS_FILE)
                    if os.path.exists(os.path.join(folder, name))), None)
    if weights is None:
        found = sorted(n for n in os.listdir(folder) if n.startswith("diffusion_pytorch_model"))
        hint = (f" It holds {found}: save the weights as safetensors (`AutoencoderKL.from_pretrained(folder)"
                f".save_pretrained(folder)` writes {WEIGHTS_FILE})." if found else "")
        raise errors.MissingFileError(f"{folder!r} holds no {WEIGHTS_FILE}.{hint}")
    try:
        state_dict = load_file(weights)
    except Exception as e:  # safetensors' numpy API refuses bfloat16 and truncated files
        raise errors.ConfigError(f"Cannot read {weights!r} as float32/float16 safetensors ({e}).") from e
    return module, from_diffusers_state_dict(state_dict, module)


def save_autoencoder(folder: str, params, module: vae.AutoencoderKL) -> dict[str, str]:
    """Writes `folder` as `AutoencoderKL.save_pretrained` would (config.json, float32 safetensors), loadable by
    `diffusers.AutoencoderKL.from_pretrained(folder)` and `load_autoencoder`; returns the paths written."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    config_path, weights_path = os.path.join(folder, CONFIG_FILE), os.path.join(folder, WEIGHTS_FILE)
    with open(config_path, "w") as f:
        json.dump({"_class_name": "AutoencoderKL", "_diffusers_version": interop_diffusers.diffusers_version(),
                   **diffusers_config(module)}, f, indent=2)
        f.write("\n")
    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in to_diffusers_state_dict(params).items()}
    save_file(arrays, weights_path, metadata={"format": "pt"})
    return {"config": config_path, "weights": weights_path}
