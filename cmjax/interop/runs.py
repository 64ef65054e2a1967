"""`--mode=export` and `--mode=import`: a cmjax run (workdir) ↔ the PyTorch files of diffusers and openai's `cm`.

Export reads one EMA copy of a checkpoint (`cmjax.workdir.load_params`) and writes either a diffusers
`ConsistencyModelPipeline` folder (`cmjax.interop.diffusers`) or an openai `UNetModel` state dict
(`cmjax.interop.openai`). Import writes a real run: `config.json` and an Orbax checkpoint at step 0 whose
parameters, every EMA copy (and the CT/CD target) are the imported weights, so `--mode=sample`, fine-tuning
(training resumes from step 0) and `config.teacher.workdir=<workdir>` (CD teachers, ECT starts) all work.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from cmjax import errors
from cmjax.interop import diffusers, openai
from cmjax.interop import dit as dit_interop

FORMATS = ("diffusers", "openai")
OPENAI_ARGS_FILE = "openai_unet.json"


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise errors.ConfigError(f"Unknown interop format {format!r}; choose one of {list(FORMATS)}.")


def consistency_parameterised(config) -> bool:
    """Whether the run's network is sampled as a consistency function f(x, σmin) = x (CM App. C scalings), as
    `CMStochasticIterativeScheduler` assumes (`methods.sampler_settings`, which evaluate reads too): CM and iCT
    runs, and ECT, whose release evaluates its EDM-trained network with the boundary scalings at σmin = 0.003;
    EDM runs are denoisers."""
    from cmjax import methods

    return methods.sampler_settings(config)["parameterization"] == "consistency"


def exported_parameterization(config) -> str:
    """How the exported network makes a clean estimate: "consistency", "edm", "trigflow" (sCM with
    c_noise(t) = t, which openai's code cannot sample) or "flow" (SiT's velocity, `parameterization.flow_denoise`);
    sCM's "trigflow_edm" is exactly an EDM denoiser."""
    from cmjax import methods

    kind = methods.parameterization_kind(config)
    return "edm" if kind == "trigflow_edm" else kind


def sampler_settings(config) -> dict[str, Any]:
    """σ range, σ_data, ρ the run is sampled with (`methods.sampler_settings`: ECT's σmin is its release's 0.003)
    and the Karras grid size it trained on (the scheduler's `num_train_timesteps`)."""
    from cmjax import methods

    sampler = methods.sampler_settings(config)
    return {"num_train_timesteps": methods.training_grid_size(config),
            **{k: sampler[k] for k in ("sigma_min", "sigma_max", "sigma_data")},
            "rho": methods.noise_range(config)["rho"]}


def trigflow_sampler_settings(config) -> dict[str, Any]:
    """What docs/export.md's PyTorch TrigFlow sampler reads (`diffusers.TRIGFLOW_SAMPLER_FILE`): cmjax's own
    1-/2-step sampler for an sCM run (`methods.sampler_settings`, 2-step σ `config.sample.two_step_sigma`)."""
    from cmjax import methods

    sampler = methods.sampler_settings(config)
    return {"parameterization": "trigflow", **{k: sampler[k] for k in ("sigma_data", "sigma_min", "sigma_max")},
            "two_step_sigma": float(config.sample.two_step_sigma), "renoise": sampler["renoise"],
            "clip": bool(sampler["clip"])}


def _io_mesh(config):
    """The mesh that export and import hold parameters on: one device when one process does the work (Orbax
    reshards on restore, so a run trained on any mesh reads it), the run's mesh across several processes."""
    from cmjax import sharding

    if jax.process_count() == 1:
        return sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.local_devices()[:1])
    return sharding.make_mesh(config.mesh)


def _host_tree(tree):
    """The whole tree as host numpy arrays, gathered across processes when they hold only shards."""
    if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in jax.tree.leaves(tree)):
        from jax.experimental import multihost_utils

        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), tree)


# ---------------------------------------------------------------------------------------------------------------
# Export.


def export_checkpoint(config, workdir: str, *, step: int | None = None, ema_rate: str | float | None = None,
                      format: str = "diffusers", output: str) -> dict[str, Any]:
    """Writes checkpoint `step` (newest if None) of the run in `workdir`, EMA copy `ema_rate` (the run's first
    rate if None; "online" for the raw parameters), as a diffusers pipeline folder or an openai state dict.

    The network is the one the run's own `workdir/config.json` describes; `config` (the command line's) is used
    only for a workdir without one. Returns what was written, by name.
    """
    from cmjax import workdir as workdir_lib

    _check_format(format)
    if os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_FILE)):
        config = workdir_lib.read_run_config(workdir)
    if dit_interop.is_dit(config.model):
        return _export_dit(config, workdir, step=step, ema_rate=ema_rate, format=format, output=output)
    target = "diffusers' ConsistencyModelPipeline" if format == "diffusers" else "openai's cm UNetModel"
    unet = openai.unet_from_model_config(config.model, target)
    settings = sampler_settings(config)
    trigflow = exported_parameterization(config) == "trigflow"
    if format == "diffusers":
        diffusers.diffusers_unet2d_config(unet)  # fails here, before reading, on what UNet2DModel cannot hold
        if exported_parameterization(config) == "flow":
            raise errors.ConfigError(
                f"This {config.method.name!r} run's network is a flow-matching velocity v(x_t, t) on SiT's time "
                "t ∈ [0, 1], which CMStochasticIterativeScheduler cannot sample; export it with --format=openai "
                "(the state dict, its time input noted in the kwargs file) and sample it as "
                "parameterization.flow_denoise reads it.")
        if not consistency_parameterised(config) and not trigflow:
            raise errors.ConfigError(
                f"This {config.method.name!r} run's network is an EDM denoiser, but CMStochasticIterativeScheduler "
                "applies the consistency boundary scalings (CM App. C) to it; export it with --format=openai "
                "(e.g. as a CD teacher for openai's cm code).")
    params, restored_step, rate, result = _exported_params(config, workdir, step, ema_rate, format)
    if jax.process_index() != 0:
        return result
    if format == "diffusers" and trigflow:  # sCM: the UNet2DModel folder and the TrigFlow sampler's settings
        result.update(diffusers.write_trigflow_unet(output, params, unet, trigflow_sampler_settings(config)))
        return result
    if format == "diffusers":
        result.update(diffusers.write_pipeline(output, params, unet, diffusers.scheduler_config(**settings)))
        return result
    name = f"model{restored_step:06d}" if rate == "online" else f"ema_{rate}_{restored_step:06d}"  # cm's names
    result["state_dict"] = openai.save_state_dict(
        openai.to_openai_state_dict(params), os.path.join(output, name + (".pt" if _has_torch() else ".safetensors")))
    result["unet_kwargs"] = os.path.join(output, OPENAI_ARGS_FILE)
    with open(result["unet_kwargs"], "w") as f:
        json.dump({"unet_model_kwargs": openai.openai_unet_kwargs(unet), "sampler": settings,
                   "parameterization": exported_parameterization(config),
                   "time_input": time_input_description(exported_parameterization(config)),
                   "step": int(restored_step), "ema_rate": rate}, f, indent=2)
    return result


def _export_dit(config, workdir, *, step, ema_rate, format, output) -> dict[str, Any]:
    """A DiT run as `output/transformer/` (diffusers' DiTTransformer2DModel) + `output/cmjax_sampler.json`: no
    diffusers pipeline samples a consistency or flow DiT, so the sampler's settings travel beside the network."""
    from cmjax import methods, models

    if format != "diffusers":
        raise errors.ConfigError("openai's cm code has no DiT; export a DiT run with --format=diffusers "
                                 "(a DiTTransformer2DModel folder).")
    net = models.get(config.model)
    dit_interop.diffusers_dit_config(net)  # fails here, before reading, on what DiTTransformer2DModel cannot hold
    if methods.time_inputs(config.method.name) != 1:
        raise errors.ConfigError(f"This {config.method.name!r} run's DiT takes two times (t, t − r); diffusers' "
                                 "DiTTransformer2DModel takes one, so it cannot hold the network.")
    params, restored_step, rate, result = _exported_params(config, workdir, step, ema_rate, format)
    if jax.process_index() == 0:
        sampler = {**methods.sampler_settings(config), "parameterization": exported_parameterization(config),
                   "two_step_sigma": float(config.sample.get("two_step_sigma", 0.0)),
                   "time_input": time_input_description(exported_parameterization(config)),
                   "step": int(restored_step), "ema_rate": rate}
        result.update(dit_interop.write_transformer(output, params, net, json.loads(json.dumps(sampler,
                                                                                                default=str))))
    return result


def time_input_description(kind: str) -> str:
    """What an exported network of parameterisation `kind` is conditioned on (written beside its weights)."""
    if kind == "trigflow":
        return "TrigFlow t (c_noise(t) = t)"
    if kind == "flow":
        return ("SiT's t = 1/(1 + σ) ∈ [0, 1] (0 noise, 1 data); the output is the velocity of "
                "x_t = t·x1 + (1 − t)·x0 (parameterization.flow_denoise)")
    return "250·ln σ (parameterization.network_time_input)"


def _exported_params(config, workdir: str, step, ema_rate, format: str):
    """(host parameters without the training-only heads, restored step, EMA key, the result dict so far) of the
    checkpoint an export writes."""
    from cmjax import workdir as workdir_lib

    _, params, _, restored_step = workdir_lib.load_params(workdir, _io_mesh(config), step=step, ema_rate=ema_rate,
                                                          config=config)
    params = openai.without_training_heads(_host_tree(params))
    rate = "online" if ema_rate in ("online", "params") else _ema_key(config, ema_rate)
    return params, restored_step, rate, {"format": format, "step": int(restored_step), "ema_rate": rate}


def _ema_key(config, ema_rate) -> str:
    from cmjax import train_state

    return train_state.ema_key(config.ema_rates[0] if ema_rate is None else ema_rate)


def _has_torch() -> bool:
    from importlib import util

    return util.find_spec("torch") is not None


# ---------------------------------------------------------------------------------------------------------------
# Import.


def _effective_attention(fields: dict[str, Any]) -> list[int]:
    levels = [fields["image_size"] // 2**level for level in range(len(fields["channel_mult"]))]
    return sorted(r for r in fields.get("attention_resolutions", ()) if r in levels)


def _differences(model_config, folder_fields: dict[str, Any]) -> list[str]:
    """Fields where config.model and the folder's network differ (fields the network ignores are skipped)."""
    from cmjax.models.unet import UNet

    ours = {f: model_config.get(f, getattr(UNet, f)) for f in folder_fields}
    ours["num_classes"] = ours["num_classes"] or 0
    for fields in (ours, folder_fields):
        fields["attention_resolutions"] = _effective_attention({**folder_fields, **fields})
        fields["channel_mult"] = list(fields["channel_mult"])
    skipped = {"dropout"} | ({"conv_resample"} if folder_fields["resblock_updown"] else set())
    skipped |= {"num_heads"} if folder_fields["num_head_channels"] != -1 else set()
    return [f"{f}: folder {folder_fields[f]!r}, config {ours[f]!r}" for f in folder_fields
            if f not in skipped and f in model_config and ours[f] != folder_fields[f]]


def model_config_for_folder(config, folder_fields: dict[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` whose `model` is the folder's UNet: fields config.model sets must agree with the
    folder (a clear error names each that differs), fields it leaves out are filled in from the folder."""
    from cmjax.models.unet import UNet

    openai.unet_from_model_config(config.model, "Import from diffusers")
    differing = _differences(config.model, dict(folder_fields))
    if differing:
        overrides = " ".join(f"--config.model.{d.split(':')[0]}=..." for d in differing)
        raise errors.ConfigError("The diffusers UNet differs from config.model in: " + "; ".join(differing) +
                         f". Use a config that matches the folder ({overrides}).")
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for field, value in folder_fields.items():
            if field not in config.model and value != getattr(UNet, field):
                config.model[field] = value
    return config


def import_checkpoint(config, workdir: str, *, format: str = "openai", input: str) -> dict[str, Any]:
    """Writes a cmjax run into `workdir` from a diffusers UNet2DModel folder or an openai .pt/.safetensors state
    dict: `config.json` and a step-0 checkpoint whose parameters and every EMA copy are the imported weights.

    The network is `config.model` (openai) or the folder's `unet/config.json` checked against `config.model`
    (diffusers). The checkpoint holds no data-iterator state: training from it starts the data stream
    fresh (`Checkpointer.restore` allows exactly that at step 0), so import needs no prepared dataset.
    """
    from cmjax import checkpointing, methods, models, optim, train_state
    from cmjax import workdir as workdir_lib

    _check_format(format)
    if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(os.path.join(workdir, "checkpoints")):
        raise FileExistsError(f"{workdir!r} already holds checkpoints; import into a new workdir.")
    if format == "diffusers" and dit_interop.transformer_folder(input) is not None:
        fields, state_dict = dit_interop.read_transformer(input)
        config = dit_interop.model_config_for_folder(config, fields)
        params = dit_interop.from_diffusers_state_dict(state_dict, models.get(config.model))
    elif format == "diffusers":
        fields, state_dict = diffusers.read_unet(input)
        config = model_config_for_folder(config, fields)
        unet = openai.unet_from_model_config(config.model, "Import from diffusers")
        params = diffusers.from_diffusers_state_dict(state_dict, unet)
    else:
        unet = openai.unet_from_model_config(config.model, "Import from openai")
        params = openai.from_openai_state_dict(openai.load_state_dict(input), openai.unet_param_shapes(unet))

    module = models.get(config.model)
    _, shardings = workdir_lib.abstract_train_state(config, module, _io_mesh(config))
    optimizer, _ = optim.make_optimizer(config.optim, config.total_steps)
    keep_target = methods.get(config.method.name).keeps_target
    state = jax.jit(lambda p: train_state.create(p, optimizer, config.ema_rates, keep_target),
                    out_shardings=shardings)(params)
    workdir_lib.write_config(config, workdir)
    checkpointer = checkpointing.Checkpointer(workdir, save_every=config.ckpt_every, keep=config.keep_checkpoints)
    checkpointer.save(0, state, force=True)
    checkpointer.wait()
    checkpointer.close()
    return {
        "format": format,
        "input": input,
        "config": os.path.join(workdir, workdir_lib.CONFIG_FILE),
        "checkpoint": os.path.join(workdir, "checkpoints", "0"),
        "parameters": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        "ema_rates": [train_state.ema_key(r) for r in config.ema_rates],
    }
