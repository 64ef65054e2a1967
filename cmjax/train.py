"""`train_and_evaluate(config, workdir)`: the training loop, one readable function in sections.

A batch's life: TFDS → per-process uint8 rows → one global array sharded over ("data", "fsdp") → the
jitted step (loss, gradients, optimizer, EMA and target updates; state donated) → metrics every
`log_every` steps → asynchronous Orbax checkpoint every `ckpt_every` steps (data-iterator state included)
→ sample grids and quality metrics every `eval_every` steps. The step compiles once: the curriculum
N(k), μ(k) and the learning rate are computed from the traced step inside it.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from clu import metric_writers, periodic_actions

from cmjax import (checkpointing, evaluate, losses, models, optim, parameterization, sharding, train_state,
                   workdir_lock)
from cmjax.data import datasets, pipeline

CONFIG_FILE = "config.json"
# Objectives that keep a target EMA network θ⁻ (iCT and ECT use sg(θ) instead).
METHODS_WITH_TARGET = ("cd", "ct")
METHODS_WITH_TEACHER = ("cd", "ect")


class TrainingStoppedError(RuntimeError):
    """Training cannot continue (e.g. too many consecutive non-finite steps); the last checkpoint is intact."""


# ----------------------------------------------------------------------------------------------
# Pieces the loop is made of (each testable on its own).


def objective_from_config(config) -> Any:
    """The objective `config.method.name` with the method's settings bound (`teacher` and
    `distance_weights` are not settings: they name files read once, see `distance_params_from_config`)."""
    settings = {k: v for k, v in config.method.items() if k not in ("name", "teacher", "distance_weights")}
    if "total_steps" in losses.objective_settings(config.method.name):
        settings.setdefault("total_steps", config.total_steps)
    return losses.make_objective(config.method.name, **settings)


def image_shape(config) -> tuple[int, int, int]:
    """(H, W, C) of the configured dataset's images; checked against the model's own fields, if it has them."""
    shape = tuple(datasets.get_spec(config.data.name).image_shape)
    model = config.model
    if "image_size" in model and (model.image_size, model.image_size) != shape[:2] or (
            "in_channels" in model and model.in_channels != shape[2]):
        raise ValueError(
            f"Dataset {config.data.name!r} yields images {shape} but the model expects "
            f"({model.get('image_size')}, {model.get('image_size')}, {model.get('in_channels')}); set "
            "config.model.image_size / in_channels to match.")
    return shape


def sample_inputs(config, batch_size: int = 1):
    """Dummy network inputs of the configured shapes, for `init` and `eval_shape`."""
    x = jnp.zeros((batch_size, *image_shape(config)), jnp.float32)
    labels = jnp.zeros((batch_size,), jnp.int32) if config.model.get("num_classes") else None
    return x, jnp.zeros((batch_size,), jnp.float32), labels


def init_params(module, config, key):
    """Float32 parameters of `module`, logical-axis boxes removed (the rules in `sharding` read shapes)."""
    x, t, labels = sample_inputs(config)
    return nn.meta.unbox(module.init({"params": key}, x, t, labels)["params"])


def make_train_step(config, module, objective, optimizer, learning_rate_fn, teacher_module=None):
    """The pure step (state, batch, teacher_params, distance_params) → (state, metrics); jitted by the caller.
    `distance_params` (the LPIPS network's weights, or None) are step arguments like the teacher's."""
    conditional = bool(config.model.get("num_classes"))
    base_key = jax.random.key(config.seed)

    def step_fn(state: train_state.TrainState, batch, teacher_params, distance_params=None):
        x = pipeline.to_model_range(batch["image"])
        labels = batch["label"] if conditional else None
        # (seed, step) → key: a resumed run draws the same noise as an uninterrupted one.
        key = jax.random.fold_in(base_key, state.step)

        def network(params, x_in, t_in, dropout_key):
            return module.apply({"params": params}, x_in, t_in, labels, train=True,
                                rngs={"dropout": dropout_key})

        teacher_network = None
        if teacher_module is not None:
            teacher_network = lambda p, x_in, t_in: teacher_module.apply(  # noqa: E731
                {"params": p}, x_in, t_in, labels, train=False)

        def loss_fn(params):
            return objective(network, params, x, key, state.step, target_params=state.target_params,
                             teacher_params=teacher_params, teacher_network=teacher_network,
                             distance_params=distance_params)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = train_state.apply_gradients(
            state, grads, optimizer, target_ema=metrics.get("target_ema", jnp.float32(0.0)), loss=loss)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                       learning_rate=learning_rate_fn(train_state.updates_applied(state)),
                       nonfinite_steps=new_state.nonfinite_steps, skipped_steps=new_state.skipped_steps)
        return new_state, metrics

    return step_fn


def jit_train_step(step_fn, mesh, state_shardings, teacher_params, distance_params):
    """The one compiled step of a run: state donated and laid out by `state_shardings`, the batch split over
    the mesh's batch axes, teacher parameters (concrete or abstract) in their own shardings, distance
    weights replicated; metrics come back replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    teacher_shardings = None if teacher_params is None else jax.tree.map(lambda a: a.sharding, teacher_params)
    distance_shardings = None if distance_params is None else replicated
    return jax.jit(step_fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh), teacher_shardings,
                                          distance_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def distance_params_from_config(config, mesh):
    """The weights of `config.method.distance`'s network (LPIPS: `config.method.distance_weights`, '' for
    its default file), replicated over `mesh`; None for distances without a network (l2, pseudo_huber)."""
    if "distance" not in config.method:
        return None
    params = losses.load_distance_params(config.method.distance, config.method.get("distance_weights") or None)
    if params is None:
        return None
    return jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def check_teacher(config) -> None:
    """Fails fast, before anything compiles, when a method that needs a teacher has none."""
    if config.method.name not in METHODS_WITH_TEACHER:
        return
    teacher = config.method.get("teacher") or ""
    if not teacher or not os.path.exists(os.path.join(teacher, CONFIG_FILE)):
        raise ValueError(
            f"Method {config.method.name!r} needs a teacher, but config.method.teacher={teacher!r} is not a cmjax "
            f"workdir (no {CONFIG_FILE}); train an EDM teacher first (--config.method.name=edm) and point "
            "config.method.teacher at its workdir.")


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a cmjax run wrote to `workdir/config.json`."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir!r} is not a cmjax workdir: it has no {CONFIG_FILE}.")
    return ml_collections.ConfigDict(checkpointing.read_json(path, fix=(
        "It is the config that run trained with, written whenever its training starts: rerun its training command "
        "to write it again (a finished run resumes, evaluates and exits), or restore the file from a copy.")))


def load_params(workdir: str, mesh, *, step: int | None = None, ema_rate: float | str | None = None,
                config: ml_collections.ConfigDict | None = None):
    """(module, params, config, step) of a cmjax run: one EMA copy of a checkpoint, sharded for `mesh`.

    `config` defaults to the run's own `config.json`; `step` to the newest checkpoint; `ema_rate` to the
    config's first EMA rate (`"online"` gives the raw online parameters).
    """
    config = read_run_config(workdir) if config is None else config
    module = models.get(config.model)
    abstract_state, shardings = abstract_train_state(config, module, mesh)
    with checkpointing.Checkpointer(workdir, save_every=1, keep=1, read_only=True) as reader:
        restored = reader.restore(_with_shardings(abstract_state, shardings), step=step)
    if restored is None:
        raise FileNotFoundError(f"Workdir {workdir!r} holds no checkpoint.")
    state, restored_step = restored
    if ema_rate in ("online", "params"):
        return module, state.params, config, restored_step
    rate = train_state.ema_key(config.ema_rates[0] if ema_rate is None else float(ema_rate))
    if rate not in state.ema:
        raise ValueError(f"EMA rate {ema_rate!r} is not kept by this run; it keeps {sorted(state.ema)} or 'online'.")
    return module, state.ema[rate], config, restored_step


def load_teacher(teacher_workdir: str, mesh):
    """(module, EMA params, its config) of a cmjax run in `teacher_workdir`, sharded for `mesh`."""
    module, params, config, _ = load_params(teacher_workdir, mesh)
    return module, params, config


def abstract_train_state(config, module, mesh):
    """Shapes of the train state (nothing allocated) and the shardings it lives with on `mesh`."""
    optimizer, _ = optim.make_optimizer(config.optim, config.total_steps)
    keep_target = config.method.name in METHODS_WITH_TARGET

    def create(key):
        return train_state.create(init_params(module, config, key), optimizer, config.ema_rates, keep_target)

    key = jax.random.key(config.seed)
    abstract = jax.eval_shape(create, key)
    x, t, labels = sample_inputs(config)
    boxed = jax.eval_shape(lambda k: module.init({"params": k}, x, t, labels)["params"], key)
    param_specs = sharding.param_partition_specs(boxed, mesh)  # FSDP by logical axis names
    return abstract, sharding.state_shardings(abstract, mesh, param_specs=param_specs)


def _with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def truncate_metrics_log(jsonl_path: str, last_step: int) -> None:
    """Drops `metrics.jsonl` rows logged after `last_step`: a run killed after its last checkpoint logged
    steps it will now repeat, and the log should hold each step once."""
    if not os.path.exists(jsonl_path):
        return
    with open(jsonl_path) as f:
        lines = f.readlines()
    def logged_by_then(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= last_step
        except (ValueError, KeyError):  # a row cut off when the process was killed mid-write
            return False

    kept = [line for line in lines if line.endswith("\n") and logged_by_then(line)]
    if len(kept) != len(lines):
        with open(jsonl_path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(jsonl_path + ".tmp", jsonl_path)  # atomic: a crash here leaves the old or the new log


def write_config(config, workdir: str) -> None:
    """Saves the run's config as JSON (process 0): a later run that uses this one as teacher reads it back."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, CONFIG_FILE)
        with open(path + ".tmp", "w") as f:  # then renamed: a full disk cannot leave a truncated config.json
            f.write(config.to_json_best_effort(indent=2))
        os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------
# The loop.


@workdir_lock.hold  # one run per workdir; a workdir that cannot be written fails here, before anything else
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains per `config`, resuming from the newest checkpoint in `workdir`. Returns the last metrics."""
    # ---- Logging -------------------------------------------------------------------------------
    check_teacher(config)
    write_config(config, workdir)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    jsonl_path = os.path.join(workdir, "metrics.jsonl")

    # ---- Mesh ----------------------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh)

    # ---- Input (a batch that does not divide over the devices fails here, naming both) -----------
    image_shape(config)  # a model that does not fit the data fails before any data is read
    data_iter = pipeline.build(config.data, mesh, global_batch_size=config.batch_size, seed=config.seed)

    # ---- Model, objective, optimizer -------------------------------------------------------------
    module = models.get(config.model)
    objective = objective_from_config(config)
    distance_params = distance_params_from_config(config, mesh)  # a missing weights file fails here
    optimizer, learning_rate_fn = optim.make_optimizer(config.optim, config.total_steps)

    # ---- Sharding and state (created already sharded) --------------------------------------------
    abstract_state, state_shardings = abstract_train_state(config, module, mesh)
    keep_target = config.method.name in METHODS_WITH_TARGET

    @functools.partial(jax.jit, out_shardings=state_shardings)
    def create_state(key):
        return train_state.create(init_params(module, config, key), optimizer, config.ema_rates, keep_target)

    teacher_module, teacher_params = None, None
    if config.method.name in METHODS_WITH_TEACHER:
        teacher_module, teacher_params, _ = load_teacher(config.method.teacher, mesh)

    # ---- Restore or initialise -------------------------------------------------------------------
    checkpointer = checkpointing.Checkpointer(workdir, save_every=config.ckpt_every, keep=config.keep_checkpoints)
    restored = checkpointer.resume(_with_shardings(abstract_state, state_shardings), data_iter,
                                   restore_step=config.restore_step, fallback=config.restore_fallback)
    if restored is not None:
        state, start_step = restored
        logging.info("Resumed from step %d in %s.", start_step, workdir)
        if jax.process_index() == 0:
            truncate_metrics_log(jsonl_path, start_step)
            checkpointer.log_skipped(jsonl_path)  # a row per checkpoint passed over (restore_fallback)
    else:
        start_step = 0
        if config.method.name == "ect":  # ECT tunes the EDM teacher: start from its weights
            state = jax.jit(lambda p: train_state.create(p, optimizer, config.ema_rates, keep_target),
                            out_shardings=state_shardings)(teacher_params)
        else:
            state = create_state(jax.random.key(config.seed))

    # ---- The step: one jit, sharded in and out, state donated ------------------------------------
    step_fn = make_train_step(config, module, objective, optimizer, learning_rate_fn, teacher_module)
    train_step = jit_train_step(step_fn, mesh, state_shardings, teacher_params, distance_params)

    # ---- Evaluation hook ---------------------------------------------------------------------------
    evaluator = evaluate.PeriodicEvaluator(config, workdir, module, mesh, writer)

    # ---- Loop ----------------------------------------------------------------------------------------
    hooks = [periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                             every_steps=config.log_every)]
    last_metrics: dict[str, Any] = {}
    window_start, window_steps = time.time(), 0
    step = start_step
    logging.info("Training %s/%s from step %d to %d on %d devices.", config.method.name, config.model.name,
                 start_step, config.total_steps, jax.device_count())
    while step < config.total_steps:
        batch = next(data_iter)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, metrics = train_step(state, batch, teacher_params, distance_params)
        step += 1
        window_steps += 1
        for hook in hooks:
            hook(step)

        if step % config.log_every == 0 or step == config.total_steps:
            metrics = jax.device_get(metrics)
            elapsed = max(time.time() - window_start, 1e-9)
            scalars = {k: float(v) for k, v in metrics.items()}
            scalars.update(steps_per_sec=window_steps / elapsed,
                           images_per_sec=window_steps * config.batch_size / elapsed,
                           images_per_sec_per_device=window_steps * config.batch_size / elapsed / jax.device_count())
            writer.write_scalars(step, scalars)
            if jax.process_index() == 0:
                with open(jsonl_path, "a") as f:
                    f.write(json.dumps({"step": step, **scalars}) + "\n")
            last_metrics = scalars
            window_start, window_steps = time.time(), 0
            if scalars["nonfinite_steps"] >= config.max_nonfinite_steps:
                checkpointer.wait()
                first_bad = step - int(scalars["nonfinite_steps"]) + 1
                raise TrainingStoppedError(
                    f"Loss or gradients were non-finite for {int(scalars['nonfinite_steps'])} consecutive steps "
                    f"(since step {first_bad}, stopped at step {step}); those updates were skipped and nothing "
                    f"non-finite was saved. Resume from checkpoint {checkpointer.latest_step()} with a lower "
                    "learning rate or gradient clipping (config.optim).")

        # Saves every ckpt_every steps (and at Orbax's preemption sync point); after the step that used the
        # batch, so the saved iterator position is where step + 1 starts.
        checkpointer.save(step, state, data_iter, force=step == config.total_steps)
        if checkpointer.should_stop_for_preemption(step):
            checkpointer.save(step, state, data_iter, force=True)
            checkpointer.wait()
            checkpointer.close()
            logging.warning("Preempted: saved step %d, exiting.", step)
            writer.flush()
            return last_metrics
        if config.eval_every and step % config.eval_every == 0 and step != config.total_steps:
            evaluator(step, state)

    last_metrics.update(evaluator(step, state))
    # One executable for the whole run, curriculum stages included (a diagnostic the tests check).
    last_metrics["train_step_compilations"] = train_step._cache_size()
    checkpointer.wait()
    checkpointer.close()
    writer.flush()
    return last_metrics


# ----------------------------------------------------------------------------------------------
# Ahead-of-time report: what one train step costs on the configured mesh, before chips are spent.


def _teacher_abstract(config, module, mesh):
    """(teacher module, abstract sharded teacher params, note) for cd/ect without loading any weights: the
    teacher run's own config.json where it exists, else the student's network (as ECT requires)."""
    teacher = config.method.get("teacher") or ""
    if teacher and os.path.exists(os.path.join(teacher, CONFIG_FILE)):
        teacher_config, note = read_run_config(teacher), f"network of {teacher}"
    else:
        teacher_config, note = config, "assumed the student's network (no teacher workdir found)"
    teacher_module = models.get(teacher_config.model)
    key = jax.random.key(0)
    x, t, labels = sample_inputs(teacher_config)
    boxed = jax.eval_shape(lambda k: teacher_module.init({"params": k}, x, t, labels)["params"], key)
    specs = sharding.param_partition_specs(boxed, mesh)
    abstract = jax.eval_shape(lambda k: init_params(teacher_module, teacher_config, k), key)
    shardings = jax.tree.map(lambda spec: jax.sharding.NamedSharding(mesh, spec), specs,
                             is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    return teacher_module, _with_shardings(abstract, shardings), note


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
    objective = objective_from_config(config)
    optimizer, learning_rate_fn = optim.make_optimizer(config.optim, config.total_steps)
    abstract_state, state_shardings = abstract_train_state(config, module, mesh)

    teacher_module, teacher_params, teacher_note = None, None, None
    if config.method.name in METHODS_WITH_TEACHER:
        teacher_module, teacher_params, teacher_note = _teacher_abstract(config, module, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    sharding.process_batch_size(config.batch_size, mesh)  # a batch that does not divide fails here
    h, w, c = image_shape(config)
    batch = {"image": jax.ShapeDtypeStruct((config.batch_size, h, w, c), jnp.uint8, sharding=batch_sharding),
             "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch_sharding)}

    step_fn = make_train_step(config, module, objective, optimizer, learning_rate_fn, teacher_module)
    distance_params = None
    if str(config.method.get("distance", "")).startswith("lpips"):  # the LPIPS network: a replicated argument
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        distance_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                                       jax.eval_shape(lambda: distance_params_from_config(config, mesh)))
    train_step = jit_train_step(step_fn, mesh, state_shardings, teacher_params, distance_params)
    lowered = train_step.lower(_with_shardings(abstract_state, state_shardings), batch, teacher_params,
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
