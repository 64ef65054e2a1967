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

import jax
import ml_collections
from absl import logging
from clu import metric_writers

from cmjax import checkpointing, evaluate, methods, models, optim, sharding, train_state, train_step, workdir_lock
from cmjax import workdir as workdir_lib
from cmjax.data import pipeline


class TrainingStoppedError(RuntimeError):
    """Training cannot continue (e.g. too many consecutive non-finite steps); the last checkpoint is intact."""


# ----------------------------------------------------------------------------------------------
# The loop.


@workdir_lock.hold  # one run per workdir; a workdir that cannot be written fails here, before anything else
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains per `config`, resuming from the newest checkpoint in `workdir`. Returns the last metrics."""
    # ---- Logging -------------------------------------------------------------------------------
    workdir_lib.check_teacher(config)
    workdir_lib.write_config(config, workdir)
    # TensorBoard (process 0) holds every scalar; the console gets one progress line per log interval.
    writer = (metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir)) if jax.process_index() == 0
              else metric_writers.MultiWriter([]))
    jsonl_path = os.path.join(workdir, workdir_lib.METRICS_FILE)

    # ---- Mesh ----------------------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh)

    # ---- Input (a batch that does not divide over the devices fails here, naming both) -----------
    models.image_shape(config)  # a model that does not fit the data fails before any data is read
    data_iter = pipeline.build(config.data, mesh, global_batch_size=config.batch_size, seed=config.seed)

    # ---- Model, objective, optimizer -------------------------------------------------------------
    module = models.get(config.model)
    objective = methods.objective_from_config(config)
    train_step.step_base_key(config)  # an unknown config.rng_impl fails here, before any checkpoint exists
    distance_params = train_step.distance_params_from_config(config, mesh)  # a missing weights file fails here
    optimizer, learning_rate_fn = optim.make_optimizer(config.optim, config.total_steps)

    # ---- Sharding and state (created already sharded) --------------------------------------------
    abstract_state, state_shardings = workdir_lib.abstract_train_state(config, module, mesh)
    method = methods.get(config.method.name)
    keep_target = method.keeps_target

    @functools.partial(jax.jit, out_shardings=state_shardings,
                       compiler_options=train_step.compiler_options(mesh.devices.flat))
    def create_state(key):
        return train_state.create(models.init_params(module, config, key), optimizer, config.ema_rates, keep_target)

    teacher_module, teacher_params, teacher_config = None, None, None
    if method.needs_teacher:
        teacher_module, teacher_params, teacher_config = workdir_lib.load_teacher(config, mesh)

    # ---- Restore or initialise -------------------------------------------------------------------
    checkpointer = checkpointing.Checkpointer(workdir, save_every=config.ckpt_every, keep=config.keep_checkpoints)
    restored = checkpointer.resume(workdir_lib.with_shardings(abstract_state, state_shardings), data_iter,
                                   restore_step=config.restore_step, fallback=config.restore_fallback)
    if restored is not None:
        state, start_step = restored
        logging.info("Resumed from step %d in %s.", start_step, workdir)
        if jax.process_index() == 0:
            workdir_lib.truncate_metrics_log(jsonl_path, start_step)
            checkpointer.log_skipped(jsonl_path)  # a row per checkpoint passed over (restore_fallback)
    else:
        start_step = 0
        if methods.starts_from_teacher(config):  # CD, ECT (config.teacher.init_student): the teacher's weights
            online, ema = workdir_lib.student_start(config, mesh, module)
            state = jax.jit(lambda p, e: train_state.create(p, optimizer, config.ema_rates, keep_target, e),
                            out_shardings=state_shardings)(online, ema)
        else:
            state = create_state(jax.random.key(config.seed))

    # ---- The step: one jit, sharded in and out, state donated ------------------------------------
    step_fn = train_step.make_train_step(config, module, objective, optimizer, learning_rate_fn, teacher_module,
                                         teacher_config)
    compiled_step = train_step.jit_train_step(step_fn, mesh, state_shardings, teacher_params, distance_params)

    # ---- Evaluation hook ---------------------------------------------------------------------------
    evaluator = evaluate.PeriodicEvaluator(config, workdir, module, mesh, writer)

    # ---- Loop ----------------------------------------------------------------------------------------
    last_metrics: dict[str, Any] = {}
    window_start, window_steps = time.time(), 0
    step = start_step
    logging.info("Training %s/%s from step %d to %d on %d devices.", config.method.name, config.model.name,
                 start_step, config.total_steps, jax.device_count())
    first_step_seconds = None
    while step < config.total_steps:
        batch = next(data_iter)
        started = time.time()
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, metrics = compiled_step(state, batch, teacher_params, distance_params)
        if step == start_step:  # the first step compiles (or loads the executable from the compilation cache)
            jax.block_until_ready(metrics)
            first_step_seconds = time.time() - started
            logging.info("First step %.1f s (compile included; %s).", first_step_seconds,
                         workdir_lib.compilation_cache_note())
        step += 1
        window_steps += 1

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
            logging.info("%s", progress_line(step, config.total_steps, scalars))
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
    last_metrics["train_step_compilations"] = compiled_step._cache_size()
    if first_step_seconds is not None:
        last_metrics["first_step_seconds"] = first_step_seconds
    checkpointer.wait()
    checkpointer.close()
    writer.flush()
    return last_metrics


def progress_line(step: int, total_steps: int, scalars: dict[str, float]) -> str:
    """`step 1200/18000 (6.7%)  loss 0.03121  38.2 steps/s  4,890 img/s  ETA 7m20s` (the window's rate)."""
    rate = scalars["steps_per_sec"]
    eta = int((total_steps - step) / rate) if rate > 0 else 0
    eta_text = f"{eta // 3600}h{eta % 3600 // 60:02d}m" if eta >= 3600 else f"{eta // 60}m{eta % 60:02d}s"
    skipped = f"  skipped {int(scalars['skipped_steps'])}" if scalars.get("skipped_steps") else ""
    return (f"step {step}/{total_steps} ({100 * step / total_steps:.1f}%)  loss {scalars['loss']:.5g}  "
            f"{rate:.1f} steps/s  {scalars['images_per_sec']:,.0f} img/s  ETA {eta_text}{skipped}")
