"""`--mode=compile`: what one train step costs, before chips are spent — on this machine's devices or, with
`--topology=v5p:2x2x2`, on a TPU slice that this machine does not have.

The step is lowered and compiled from shapes only (no parameter is initialised or loaded): per-device memory
from `compiled.memory_analysis()`, XLA's FLOPs per step from `cost_analysis()`, parameter count and bytes.
For a TPU topology (libtpu installed: `pip install 'cmjax[tpu]'`), `jax.experimental.topologies` gives the
slice's devices and XLA's TPU compiler runs here; its cost model's `optimal_seconds` is the step-time
estimate, and the report adds the chip's HBM (`CHIPS`), a fits / does-not-fit verdict naming what to change,
and the implied images/s per chip and MFU. Those are the compiler's estimates, not measurements.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from cmjax import distances, errors, methods, models, optim, sharding, train_step
from cmjax import workdir as workdir_lib
from cmjax.data import datasets

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int  # per chip, the vendor's data sheet (the runtime keeps a little of it for itself)
    peak_bf16_flops: float  # dense, per chip, the vendor's data sheet


# device_kind substring → chip, checked in order (the more specific names first). TPU: Cloud TPU's system
# architecture pages (v4 32 GiB / 275 TFLOP/s, v5e 16 GiB / 197, v5p 95 GiB / 459, v6e 32 GiB / 918);
# GPUs: NVIDIA's data sheets (SXM, dense bf16, no sparsity).
CHIPS = (
    ("TPU v6 lite", Chip("TPU v6e", 32 * GiB, 918e12)),
    ("TPU v6e", Chip("TPU v6e", 32 * GiB, 918e12)),
    ("TPU v5 lite", Chip("TPU v5e", 16 * GiB, 197e12)),
    ("TPU v5e", Chip("TPU v5e", 16 * GiB, 197e12)),
    ("TPU v5p", Chip("TPU v5p", 95 * GiB, 459e12)),
    ("TPU v5", Chip("TPU v5p", 95 * GiB, 459e12)),  # v5p reports "TPU v5"
    ("TPU v4", Chip("TPU v4", 32 * GiB, 275e12)),
    ("H200", Chip("H200 SXM", 141 * 10**9, 989e12)),
    ("H100 PCIe", Chip("H100 PCIe", 80 * 10**9, 756e12)),
    ("H100", Chip("H100 SXM", 80 * 10**9, 989e12)),
)
# Above this share of HBM a step that "fits" is called tight: the runtime and fragmentation need some room.
TIGHT_FRACTION = 0.9


def chip_of(device) -> Chip | None:
    """The `CHIPS` entry of a device (None for CPUs and chips the table does not know)."""
    kind = device.device_kind.lower()
    for key, chip in CHIPS:
        if key.lower() in kind:
            return chip
    return None


def topology_devices(topology: str):
    """The devices of a TPU slice named like "v5p:2x2x2" (`jax.experimental.topologies`), on any machine."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise errors.UserError(f"--topology={topology} compiles with XLA's TPU compiler, which comes with libtpu: "
                               "pip install 'cmjax[tpu]' (or 'jax[tpu]' at the installed jax version).") from None
    from jax.experimental import topologies

    # libtpu takes a machine-wide lock file unless told otherwise; compiling for a topology touches no chip, so
    # several processes (test workers, a compile beside a run) may hold it at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(topology, "tpu").devices)
    except Exception as err:  # libtpu's own message for an unknown chip or shape
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise errors.ConfigError(f"--topology={topology!r}: libtpu gave no devices for it ({first}); TPU slices are "
                                 "named chip:shape, e.g. v5p:2x2x2, v5e:4x4, v6e:2x2, v4:2x2x1.") from None


def _teacher_abstract(config, module, mesh):
    """(teacher module, abstract sharded teacher params, note) for cd/ect without loading any weights: the
    teacher run's own config.json where it exists, else the student's network (as ECT requires)."""
    teacher = config.teacher.workdir
    if teacher and os.path.exists(os.path.join(teacher, workdir_lib.CONFIG_FILE)):
        teacher_config, note = workdir_lib.read_run_config(teacher), f"network of {teacher}"
    else:
        teacher_config, note = config, "assumed the student's network (no teacher workdir found)"
    teacher_module = models.get(teacher_config.model)
    key = jax.random.key(0)
    specs = sharding.param_partition_specs(models.boxed_param_shapes(teacher_module, teacher_config, key), mesh)
    abstract = jax.eval_shape(lambda k: models.init_params(teacher_module, teacher_config, k), key)
    shardings = jax.tree.map(lambda spec: jax.sharding.NamedSharding(mesh, spec), specs,
                             is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    return teacher_module, workdir_lib.with_shardings(abstract, shardings), note


def _tree_bytes(tree) -> int:
    return sum(int(leaf.size) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def compile_report(config: ml_collections.ConfigDict, workdir: str | None = None,
                   topology: str | None = None) -> dict[str, Any]:
    """Lowers and compiles the train step for `config.mesh` on the present devices, or on the devices of the
    TPU slice `topology` ("v5p:2x2x2"), from shapes only (no parameter is initialised or loaded), and returns
    per-device memory (`compiled.memory_analysis()`), XLA's FLOPs per step (`cost_analysis()`), parameter
    count and bytes, and the mesh; `--mode=compile`. On a chip of `CHIPS` it adds the HBM verdict
    (`memory_verdict`), and where the compiler has a cost model (TPU) its step-time estimate with the implied
    images/s per chip and MFU (`_estimates`).

    FLOPs and memory are those of one device's partitioned program; `flops_per_step` multiplies by the
    device count. `workdir` is not written here (the report is printed by main.py and returned; main.py keeps
    the compilation cache in WORKDIR/jax_cache unless config.compilation_cache_dir says otherwise).
    """
    del workdir
    started = time.time()
    devices = topology_devices(topology) if topology else jax.devices()
    mesh = sharding.make_mesh(config.mesh, devices)
    module = models.get(config.model)
    objective = methods.objective_from_config(config)
    optimizer, learning_rate_fn = optim.make_optimizer(config.optim, config.total_steps)
    abstract_state, state_shardings = workdir_lib.abstract_train_state(config, module, mesh)

    teacher_module, teacher_params, teacher_note = None, None, None
    if methods.get(config.method.name).needs_teacher:
        teacher_module, teacher_params, teacher_note = _teacher_abstract(config, module, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    sharding.process_batch_size(config.batch_size, mesh)  # a batch that does not divide fails here
    h, w, c = models.image_shape(config)
    dtype = jnp.dtype(datasets.get_spec(config.data.name).dtype)  # uint8 pixels, float32 latents
    batch = {"image": jax.ShapeDtypeStruct((config.batch_size, h, w, c), dtype, sharding=batch_sharding),
             "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch_sharding)}

    step_fn = train_step.make_train_step(config, module, objective, optimizer, learning_rate_fn, teacher_module)
    distance_params = None
    distance = methods.distance_name(config)
    if distance is not None and distances.has_network(distance):  # the LPIPS network: a replicated argument
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        distance_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                                       jax.eval_shape(lambda: train_step.distance_params_from_config(config, mesh)))
    step = train_step.jit_train_step(step_fn, mesh, state_shardings, teacher_params, distance_params)
    lowered = step.lower(workdir_lib.with_shardings(abstract_state, state_shardings), batch, teacher_params,
                         distance_params)
    params = abstract_state.params
    num_devices = len(devices)
    report = {
        "target": f"TPU topology {topology}" if topology else "the devices of this machine",
        "device_kind": devices[0].device_kind,
        "num_devices": num_devices,
        "mesh": dict(mesh.shape),
        "global_batch_size": config.batch_size,
        "parameters": sum(int(leaf.size) for leaf in jax.tree.leaves(params)),
        "parameter_bytes": _tree_bytes(params),
        "train_state_bytes": _tree_bytes(abstract_state),
        "teacher": teacher_note or "none",
        "teacher_parameter_bytes": _tree_bytes(teacher_params) if teacher_params is not None else 0,
    }
    chip = chip_of(devices[0])
    if chip is not None:
        report.update(chip=chip.name, hbm_per_chip_bytes=chip.hbm_bytes)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as err:  # XLA's TPU compiler refuses a step that exceeds HBM
        verdict = _compiler_out_of_memory(err, config, mesh, report["train_state_bytes"])
        if verdict is None:
            raise
        return {**report, "fits": verdict, "compile_seconds": time.time() - started}

    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    memory_fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                     "temp_size_in_bytes", "generated_code_size_in_bytes")
    per_device = {name: int(getattr(memory, name, 0) or 0) for name in memory_fields} if memory else {}
    if per_device:
        # Live at once: inputs, outputs not aliased to a donated input, and scratch.
        per_device["peak_estimate_bytes"] = (per_device["argument_size_in_bytes"] + per_device["output_size_in_bytes"]
                                             - per_device["alias_size_in_bytes"] + per_device["temp_size_in_bytes"])
    report.update({
        "flops_per_step_per_device": flops,
        "flops_per_step": flops * num_devices,
        **{f"per_device_{name}": value for name, value in per_device.items()},
    })
    if chip is not None and per_device:
        report["fits"] = memory_verdict(config, mesh, per_device, chip)
    report.update(_estimates(config, mesh, cost, flops, chip))
    report["compile_seconds"] = time.time() - started
    if jax.process_index() == 0:
        logging.info("Compiled train step of %s/%s on mesh %s: %.4g TFLOPs/step, %.3f GiB/device peak estimate.",
                     config.method.name, config.model.name, report["mesh"], report["flops_per_step"] / 1e12,
                     per_device.get("peak_estimate_bytes", 0) / 2**30)
    return report


def _size(num_bytes: float) -> str:
    return f"{num_bytes / GiB:.2f} GiB" if num_bytes >= GiB / 10 else f"{num_bytes / 2**20:.1f} MiB"


def what_to_change(config, mesh, state_dominates: bool) -> str:
    """The changes that shrink a step's per-chip memory, led by what dominates it: the train state (parameters,
    optimizer moments, EMAs: FSDP shards them) or the activations (batch, remat, bf16)."""
    per_chip_batch = config.batch_size // sharding.batch_device_count(mesh)
    activations = [f"a smaller per-chip batch (now {per_chip_batch}: lower config.batch_size or use more chips)"]
    if not config.model.get("remat", False):
        activations.append("config.model.remat=True (recompute activations in the backward pass)")
    if str(config.model.get("dtype", "float32")) == "float32":
        activations.append("config.model.dtype='bfloat16' (bf16 activations, float32 parameters and norms)")
    parameters = [f"a larger FSDP axis (config.mesh.fsdp, now {mesh.shape['fsdp']}: shards parameters, "
                  "optimizer state and EMAs over more chips)"]
    return "; ".join(parameters + activations if state_dominates else activations + parameters)


def memory_verdict(config, mesh, per_device: dict[str, int], chip: Chip) -> str:
    """"fits" / "fits (tight)" (above `TIGHT_FRACTION` of HBM) / "does not fit", with the per-chip peak against
    the chip's HBM and, unless it fits comfortably, what to change (`what_to_change`)."""
    peak, hbm = per_device["peak_estimate_bytes"], chip.hbm_bytes
    state, temp = per_device["argument_size_in_bytes"], per_device["temp_size_in_bytes"]
    head = f"{_size(peak)} peak per chip of {hbm / GiB:.0f} GiB ({chip.name}, {100 * peak / hbm:.0f} %)"
    if peak <= TIGHT_FRACTION * hbm:
        return f"fits: {head}"
    verdict = "fits (tight)" if peak <= hbm else "does not fit"
    return (f"{verdict}: {head}; train state and inputs {_size(state)}, temporaries {_size(temp)}; "
            f"try {what_to_change(config, mesh, state >= temp)}")


_OUT_OF_MEMORY = re.compile(r"required for ([\w ]+?) \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


def _compiler_out_of_memory(err: Exception, config, mesh, train_state_bytes: int) -> str | None:
    """The verdict for a step XLA's TPU compiler refused because it exceeds HBM (None for other errors). The
    train state dominates when this chip's share of it (replicated unless FSDP shards it) is half the need or
    more: then its gradients and optimizer temporaries are what fill the chip, not the activations."""
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    state_per_chip = train_state_bytes / mesh.shape["fsdp"]
    found = _OUT_OF_MEMORY.search(text)
    if found:
        what, need, have = found.group(1), float(found.group(2)) * GiB, float(found.group(3)) * GiB
        head = (f"the compiler needs {_size(need)} of {what} per chip, {_size(have)} of HBM is available "
                f"(train state {_size(state_per_chip)} per chip)")
        state_dominates = state_per_chip >= need / 2
    else:
        head = " ".join(text.split())[:300]
        state_dominates = False
    return f"does not fit: {head}; try {what_to_change(config, mesh, state_dominates)}"


def _estimates(config, mesh, cost, flops_per_device: float, chip: Chip | None) -> dict[str, Any]:
    """The compiler's step-time estimate (TPU cost model `optimal_seconds`, per chip) and what it implies:
    images/s per chip and MFU (XLA FLOPs per chip / estimated seconds / the chip's dense bf16 peak). Empty where
    the compiler has no cost model (CPU, GPU)."""
    seconds = float(cost.get("optimal_seconds", 0.0) or 0.0) if cost else 0.0
    if seconds <= 0:
        return {}
    chips = mesh.devices.size
    estimates = {"estimated_step_seconds (compiler cost model, not measured)": seconds,
                 "estimated_images_per_second_per_chip (compiler estimate)": config.batch_size / chips / seconds}
    if chip is not None:
        estimates["estimated_mfu (XLA FLOPs / estimated time / bf16 peak)"] = (
            flops_per_device / seconds / chip.peak_bf16_flops)
    return estimates
