"""diffusers layout of `cmjax.models.dit.DiT`: `DiTTransformer2DModel` (config.json + safetensors) both ways.

diffusers' port of the official DiT (its scripts/convert_dit_to_diffusers.py) differs in layout, not in function,
except for two settings a cmjax DiT must match to be exported exactly:
- time features: `CombinedTimestepLabelEmbeddings` uses `Timesteps(256, flip_sin_to_cos=True,
  downscale_freq_shift=1)`, frequencies 10000^(−i/127) where the official DiT's are 10000^(−i/128): a run exports
  only with `config.model.freq_shift=1` (an imported folder gets it);
- the MLP LayerNorm's eps is the config's `norm_eps` (diffusers' default 1e-5): the folder says 1e-6, the official.
Layout: every `transformer_blocks.i.norm1.emb` holds its own copy of the timestep MLP and the label table (diffusers
reads block 0's for the final layer too); export writes the one cmjax embedder into every block, import requires the
copies to agree. The label table always has num_classes + 1 rows (class_dropout_prob 0.1 is fixed there): a
cmjax DiT without the null row exports a zero row (its "no class" embedding, `layers.label_embedding`). An
unconditional DiT exports as num_embeds_ada_norm = 1 with an all-zero table (pass class_labels = 0) and imports
back unconditional. fused qkv columns [q | k | v] ↔ to_q/to_k/to_v; `adaLN_modulation.1` ↔ `norm1.linear`;
`mlp.fc1/fc2` ↔ `ff.net.0.proj`/`ff.net.2`; the final layer ↔ `proj_out_1`/`proj_out_2`. diffusers returns all
2·C channels of a learn_sigma network; cmjax returns the first C.

The time input is cmjax's own (`timestep` = the network's time input: 250·ln σ for the consistency methods, t for
flow methods); a two-time DiT (MeanFlow) has no diffusers counterpart.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from cmjax import errors

NAMES = ("dit", "sit")  # config.model.name values that are this network
TRANSFORMER_DIR = "transformer"
WEIGHTS = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "DiTTransformer2DModel"
NORM_EPS = 1e-6
# `DiTTransformer2DModel.__init__` defaults of the keys a folder may leave out.
DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": None, "num_layers": 28,
    "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": 32, "patch_size": 2,
    "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "upcast_attention": False,
    "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": 1e-5,
}


def is_dit(model_config: Mapping[str, Any]) -> bool:
    return model_config.get("name") in NAMES


def diffusers_dit_config(net) -> dict[str, Any]:
    """The `DiTTransformer2DModel` config that computes what `net` (a `cmjax.models.dit.DiT`) does; a ConfigError
    names what diffusers cannot hold."""
    problems = []
    if net.freq_shift != 1:
        problems.append(f"freq_shift={net.freq_shift} (diffusers' DiT embeds time with downscale_freq_shift=1: train "
                        "with --config.model.freq_shift=1 to export)")
    if net.mlp_ratio != 4.0:
        problems.append(f"mlp_ratio={net.mlp_ratio} (diffusers' FeedForward is 4× wide)")
    if problems:
        raise errors.ConfigError("This DiT cannot be exported as a diffusers DiTTransformer2DModel: "
                                 + "; ".join(problems) + ".")
    return {
        "num_attention_heads": net.num_heads, "attention_head_dim": net.hidden_size // net.num_heads,
        "in_channels": net.in_channels, "out_channels": net.out_channels * (2 if net.learn_sigma else 1),
        "num_layers": net.depth, "dropout": float(net.dropout), "norm_num_groups": 32, "attention_bias": True,
        "sample_size": net.image_size, "patch_size": net.patch_size, "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": net.num_classes or 1, "upcast_attention": False, "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False, "norm_eps": NORM_EPS,
    }


def fields_from_diffusers_config(config: Mapping[str, Any], state_dict: Mapping[str, Any] | None = None):
    """`DiT` fields of the network a `DiTTransformer2DModel` config builds (ConfigError on what cmjax lacks)."""
    given = {**DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    bad = {k: given[k] for k, v in (("activation_fn", "gelu-approximate"), ("norm_type", "ada_norm_zero"),
                                   ("norm_elementwise_affine", False), ("attention_bias", True),
                                   ("upcast_attention", False)) if given[k] != v}
    if float(given["norm_eps"]) != NORM_EPS:
        bad["norm_eps"] = given["norm_eps"]
    if bad:
        raise errors.ConfigError(f"This DiTTransformer2DModel is not the DiT cmjax holds: {bad} (cmjax: "
                                 "gelu-approximate, ada_norm_zero, no affine norms, biases, norm_eps 1e-6).")
    in_channels = int(given["in_channels"])
    out = int(given["out_channels"] or in_channels)
    if out not in (in_channels, 2 * in_channels):
        raise errors.ConfigError(f"out_channels={out} is neither in_channels ({in_channels}) nor twice it "
                                 "(learn_sigma).")
    num_classes = int(given["num_embeds_ada_norm"])
    if num_classes == 1 and state_dict is not None:
        table = np.asarray(state_dict["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"])
        num_classes = 0 if not np.any(table) else 1  # cmjax's unconditional export
    return {
        "image_size": int(given["sample_size"]), "in_channels": in_channels, "out_channels": in_channels,
        "learn_sigma": out == 2 * in_channels, "depth": int(given["num_layers"]),
        "hidden_size": int(given["num_attention_heads"]) * int(given["attention_head_dim"]),
        "num_heads": int(given["num_attention_heads"]), "patch_size": int(given["patch_size"]), "mlp_ratio": 4.0,
        "num_classes": num_classes, "null_label": bool(num_classes), "dropout": float(given["dropout"]),
        "freq_shift": 1,
    }


def _linear(module: Mapping[str, Any]):
    return {"weight": np.asarray(module["kernel"]).T, "bias": np.asarray(module["bias"])}


def to_diffusers_state_dict(params, net) -> dict[str, np.ndarray]:
    """DiT parameters as a `DiTTransformer2DModel(**diffusers_dit_config(net))` state dict (float32 numpy)."""
    diffusers_dit_config(net)
    if "h_embedder" in params:
        raise errors.ConfigError("This DiT takes two times (MeanFlow's (t, t − r), h_embedder); diffusers' "
                                 "DiTTransformer2DModel takes one.")
    out: dict[str, np.ndarray] = {}

    def put(prefix, tensors):
        out.update({f"{prefix}.{k}": np.ascontiguousarray(v, np.float32) for k, v in tensors.items()})

    kernel = np.asarray(params["x_embedder"]["kernel"])
    put("pos_embed.proj", {"weight": kernel.transpose(3, 2, 0, 1), "bias": params["x_embedder"]["bias"]})
    d = net.hidden_size
    if net.num_classes:
        table = np.asarray(params["y_embedder"]["embedding"], np.float32)
        if not net.null_label:
            table = np.concatenate([table, np.zeros((1, d), np.float32)])
    else:
        table = np.zeros((2, d), np.float32)
    for i in range(net.depth):
        block, prefix = params[f"blocks_{i}"], f"transformer_blocks.{i}"
        put(f"{prefix}.norm1.emb.timestep_embedder.linear_1", _linear(params["t_embedder"]["mlp_0"]))
        put(f"{prefix}.norm1.emb.timestep_embedder.linear_2", _linear(params["t_embedder"]["mlp_2"]))
        put(f"{prefix}.norm1.emb.class_embedder.embedding_table", {"weight": table})
        put(f"{prefix}.norm1.linear", _linear(block["adaLN_modulation_1"]))
        qkv = _linear(block["attn"]["qkv"])
        for part, name in enumerate(("to_q", "to_k", "to_v")):
            put(f"{prefix}.attn1.{name}", {k: np.split(v, 3, axis=0)[part] for k, v in qkv.items()})
        put(f"{prefix}.attn1.to_out.0", _linear(block["attn"]["proj"]))
        put(f"{prefix}.ff.net.0.proj", _linear(block["mlp_fc1"]))
        put(f"{prefix}.ff.net.2", _linear(block["mlp_fc2"]))
    put("proj_out_1", _linear(params["final_layer_adaLN_modulation_1"]))
    put("proj_out_2", _linear(params["final_layer_linear"]))
    return out


def from_diffusers_state_dict(state_dict: Mapping[str, Any], net) -> dict:
    """DiT parameters (nested dicts of float32 numpy) from a `DiTTransformer2DModel` state dict of the same
    network; a ConfigError names missing, unexpected or mis-shaped keys and per-block embedders that differ."""
    sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    expected = {k: v.shape for k, v in to_diffusers_state_dict(_zeros_like_params(net), net).items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k}: folder {sd[k].shape}, model {s}" for k, s in expected.items() if k in sd and sd[k].shape != s]
    if missing or unexpected or wrong:
        raise errors.ConfigError("The DiTTransformer2DModel weights do not match the network its config describes. "
                                 f"Missing: {missing[:8]}; unexpected: {unexpected[:8]}; wrong shapes: {wrong[:8]}.")
    shared = [k for k in expected if k.startswith("transformer_blocks.0.norm1.emb.")]
    differing = sorted({k.split(".", 4)[-1] for k in shared for i in range(1, net.depth)
                        if not np.array_equal(sd[k], sd[k.replace("blocks.0.", f"blocks.{i}.", 1)])})
    if differing:
        raise errors.ConfigError(
            f"The blocks' copies of the time/label embedders differ ({differing[:4]}); cmjax's DiT (like the official "
            "one) has one embedder, so only folders whose blocks share it import exactly.")

    def kernel(prefix):
        return {"kernel": sd[f"{prefix}.weight"].T, "bias": sd[f"{prefix}.bias"]}

    params: dict[str, Any] = {
        "x_embedder": {"kernel": sd["pos_embed.proj.weight"].transpose(2, 3, 1, 0), "bias": sd["pos_embed.proj.bias"]},
        "t_embedder": {"mlp_0": kernel("transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"),
                       "mlp_2": kernel("transformer_blocks.0.norm1.emb.timestep_embedder.linear_2")},
        "final_layer_adaLN_modulation_1": kernel("proj_out_1"),
        "final_layer_linear": kernel("proj_out_2"),
    }
    if net.num_classes:
        table = sd["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"]
        params["y_embedder"] = {"embedding": table if net.null_label else table[:net.num_classes]}
    for i in range(net.depth):
        prefix = f"transformer_blocks.{i}.attn1"
        qkv = [kernel(f"{prefix}.{name}") for name in ("to_q", "to_k", "to_v")]
        params[f"blocks_{i}"] = {
            "adaLN_modulation_1": kernel(f"transformer_blocks.{i}.norm1.linear"),
            "attn": {"qkv": {"kernel": np.concatenate([p["kernel"] for p in qkv], axis=1),
                             "bias": np.concatenate([p["bias"] for p in qkv])},
                     "proj": kernel(f"{prefix}.to_out.0")},
            "mlp_fc1": kernel(f"transformer_blocks.{i}.ff.net.0.proj"),
            "mlp_fc2": kernel(f"transformer_blocks.{i}.ff.net.2"),
        }
    return params


def param_shapes(net) -> dict:
    """`net`'s parameter tree of ShapeDtypeStructs (single-time input), nothing allocated."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((1, net.image_size, net.image_size, net.in_channels))
    labels = jnp.zeros((1,), jnp.int32) if net.num_classes else None
    return nn.meta.unbox(jax.eval_shape(lambda: net.init(jax.random.key(0), x, jnp.zeros((1,)), labels))["params"])


def _zeros_like_params(net):
    import jax

    return jax.tree.map(lambda s: np.zeros(s.shape, np.float32), param_shapes(net))


# ---------------------------------------------------------------------------------------------------------------
# Folders.



def write_transformer(output: str, params, net, sampler: Mapping[str, Any] | None = None) -> dict[str, str]:
    """`output/transformer/` as `DiTTransformer2DModel.from_pretrained(output, subfolder="transformer")` loads it
    (safetensors written with numpy: no torch needed), and `output/cmjax_sampler.json` with how cmjax samples
    the run (parameterisation, σ range, time input)."""
    from safetensors.numpy import save_file

    from cmjax.interop import diffusers

    config = {"_class_name": CLASS_NAME, "_diffusers_version": diffusers.diffusers_version(),
              **diffusers_dit_config(net)}
    paths = {"transformer_config": diffusers.write_json(os.path.join(output, TRANSFORMER_DIR, "config.json"), config)}
    weights = os.path.join(output, TRANSFORMER_DIR, WEIGHTS)
    save_file(to_diffusers_state_dict(params, net), weights, metadata={"format": "pt"})
    paths["transformer_weights"] = weights
    if sampler is not None:
        paths["sampler"] = diffusers.write_json(os.path.join(output, "cmjax_sampler.json"), dict(sampler))
    return paths


def transformer_folder(path: str) -> str | None:
    """The folder holding a DiTTransformer2DModel config.json under `path` (itself or transformer/), or None."""
    for folder in (os.path.join(path, TRANSFORMER_DIR), path):
        config_path = os.path.join(folder, "config.json")
        if os.path.exists(config_path):
            with open(config_path) as f:
                if json.load(f).get("_class_name") == CLASS_NAME:
                    return folder
    return None


def read_transformer(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(DiT fields, diffusers state dict) of a DiTTransformer2DModel folder (or its parent with transformer/)."""
    from safetensors.numpy import load_file

    folder = transformer_folder(path)
    weights = None if folder is None else os.path.join(folder, WEIGHTS)
    if weights is None or not os.path.exists(weights):
        raise errors.MissingFileError(f"{path!r} holds no DiTTransformer2DModel (config.json and {WEIGHTS}, itself or "
                                      f"in {TRANSFORMER_DIR}/).")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    state_dict = load_file(weights)
    return fields_from_diffusers_config(config, state_dict), state_dict


def model_config_for_folder(config, fields: Mapping[str, Any]):
    """A copy of `config` whose model is the folder's DiT: the fields config.model sets must agree with the folder
    (a ConfigError names each that differs); those it leaves out are filled in from the folder."""
    from cmjax.models.dit import DiT

    if not is_dit(config.model):
        raise errors.ConfigError(
            f"The folder holds a {CLASS_NAME} but config.model.name is {config.model.get('name')!r}; import it with a "
            "DiT config (config.model.name='dit', e.g. configs/digits.py:dit or configs/imagenet256_meanflow.py).")
    differing = [f"{k}: folder {v!r}, config {config.model[k]!r}" for k, v in fields.items()
                 if k in config.model and k != "dropout" and config.model[k] != v]
    if differing:
        overrides = " ".join(f"--config.model.{d.split(':')[0]}=..." for d in differing)
        raise errors.ConfigError(f"The {CLASS_NAME} differs from config.model in: " + "; ".join(differing) +
                                 f". Use a config that matches the folder ({overrides}).")
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for field, value in fields.items():
            if field not in config.model and value != getattr(DiT, field):
                config.model[field] = value
    return config
