"""`--mode=compile`: what one train step costs on the configured mesh, before chips are spent.

The step is lowered and compiled from shapes only (no parameter is initialised or loaded): per-device memory
from `compiled.memory_analysis()`, XLA's FLOPs per step from `cost_analysis()`, parameter count and bytes.
"""
from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from cmjax import distances, methods, models, optim, sharding, train_step
from cmjax import workdir as workdir_lib


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


def compile_report(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict[str, Any]:
    """Lowers and compiles the train step for `config.mesh` on the present devices, from shapes only (no
    parameter is initialised or loaded), and returns per-device memory (`compiled.memory_analysis()`),
    XLA's FLOPs per step (`cost_analysis()`), parameter count and bytes, and the mesh; `--mode=compile`.

    FLOPs and memory are those of one device's partitioned program; `flops_per_step` multiplies by the
    device count. `workdir` is not written (the report is printed by main.py and returned).
    """
    del workdir
    started = time.time()
    mesh = sharding.make_mesh(config.mesh)
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
    batch = {"image": jax.ShapeDtypeStruct((config.batch_size, h, w, c), jnp.uint8, sharding=batch_sharding),
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
    compiled = lowered.compile()

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
    params = abstract_state.params
    report = {
        "device_kind": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "global_batch_size": config.batch_size,
        "parameters": sum(int(leaf.size) for leaf in jax.tree.leaves(params)),
        "parameter_bytes": _tree_bytes(params),
        "train_state_bytes": _tree_bytes(abstract_state),
        "teacher": teacher_note or "none",
        "teacher_parameter_bytes": _tree_bytes(teacher_params) if teacher_params is not None else 0,
        "flops_per_step_per_device": flops,
        "flops_per_step": flops * jax.device_count(),
        **{f"per_device_{name}": value for name, value in per_device.items()},
        "compile_seconds": time.time() - started,
    }
    if jax.process_index() == 0:
        logging.info("Compiled train step of %s/%s on mesh %s: %.4g TFLOPs/step, %.3f GiB/device peak estimate.",
                     config.method.name, config.model.name, report["mesh"], report["flops_per_step"] / 1e12,
                     per_device.get("peak_estimate_bytes", 0) / 2**30)
    return report
