"""The pure train step of a config and its one compiled form (shared by the loop and the compile report).

step(state, batch, teacher_params, distance_params) → (state, metrics): uint8 batch → [−1, 1] → the method's
objective (loss, gradients) → optimizer, EMA and target updates (`train_state.apply_gradients`). The noise key
is folded from (seed, step), so a resumed run draws the same noise as an uninterrupted one. Teacher and
distance-network weights are arguments, never constants of the executable.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import optax

from cmjax import distances, errors, methods, models, parameterization, sharding, train_state
from cmjax.data import pipeline

RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")

# XLA:CPU compiles every kernel of a step (each fusion, ~700 for the digits UNet's iCT step) to its own LLVM
# module, optimised at the backend level xla_backend_optimization_level (default 2); LLVM's optimisation of
# those modules is most of the compile, and the largest modules are the dropout masks' threefry rounds.
# Level 1 takes 0.72–0.85× the compile CPU seconds at the same images/s; level 0 halves the step's speed
# (bench/results/compile_time_cpu.md, docs/performance.md).
CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def step_base_key(config) -> jax.Array:
    """The key every step folds its step number into, with the PRNG `config.rng_impl` (default threefry2x32)."""
    impl = config.get("rng_impl", "threefry2x32")
    if impl not in RNG_IMPLS:
        raise errors.ConfigError(f"config.rng_impl={impl!r} is not a PRNG implementation; choose one of "
                                 f"{list(RNG_IMPLS)} (threefry2x32 is JAX's default).")
    return jax.random.key(config.seed, impl=impl)


def make_train_step(config, module, objective, optimizer, learning_rate_fn, teacher_module=None,
                    teacher_config=None):
    """The pure step (state, batch, teacher_params, distance_params) → (state, metrics); jitted by the caller.
    `distance_params` (the LPIPS network's weights, or None) are step arguments like the teacher's. The objectives
    read the teacher in EDM form; a teacher trained as a TrigFlow diffusion model (`teacher_config`'s EDM
    parameterisation "trigflow") has its time input translated (`parameterization.teacher_time_input`)."""
    num_classes = int(config.model.get("num_classes") or 0)
    teacher_kind, teacher_sigma_data = "edm", parameterization.SIGMA_DATA
    if teacher_config is not None:
        teacher_kind = methods.parameterization_kind(teacher_config)
        teacher_sigma_data = methods.noise_range(teacher_config)["sigma_data"]
    conditional = bool(num_classes)
    base_key = step_base_key(config)

    def step_fn(state: train_state.TrainState, batch, teacher_params, distance_params=None):
        x = pipeline.to_model_range(batch["image"])
        labels = batch["label"] if conditional else None
        # (seed, step) → key: a resumed run draws the same noise as an uninterrupted one.
        key = jax.random.fold_in(base_key, state.step)

        def network(params, x_in, t_in, dropout_key, with_logvar=False, label_drop=None, with_velocity=False):
            # label_drop [B] bool: those samples get the "no class" label num_classes (MeanFlow's guidance and
            # label dropout; the network needs its extra row, config.model.null_label).
            y = labels if label_drop is None or labels is None else jnp.where(label_drop, num_classes, labels)
            if with_velocity:  # (u, v): iMF's auxiliary v-head rides along (config.model.velocity_head)
                out, heads = models.apply_with_heads(module, {"params": params}, x_in, t_in, y, train=True,
                                                     rngs={"dropout": dropout_key})
                if "velocity" not in heads:
                    raise errors.ConfigError(
                        f"config.model.velocity_head=True, and network {config.model.name!r} has no velocity head: "
                        "the MLP and the ADM UNet have one; set config.model.velocity_head=False.")
                return out, heads["velocity"]
            if not with_logvar:
                return module.apply({"params": params}, x_in, t_in, y, train=True, rngs={"dropout": dropout_key})
            # (F, logvar): the adaptive weightings of sCT/sCD read the network's log-variance head too.
            out, logvar = models.apply_with_logvar(module, {"params": params}, x_in, t_in, y, train=True,
                                                   rngs={"dropout": dropout_key})
            if logvar is None:
                raise errors.ConfigError(
                    f"config.method.{config.method.name}.weighting="
                    f"{config.method[config.method.name].get('weighting')!r} learns the weight w(t) with the "
                    f"network's log-variance head, and config.model ({config.model.name!r}) has none: set "
                    "config.model.logvar_head=True, or choose weighting 'none' or 'prior'.")
            return out, logvar

        teacher_network = None
        if teacher_module is not None:
            def teacher_network(p, x_in, t_in, unconditional=False):
                t_in = parameterization.teacher_time_input(t_in, teacher_kind, teacher_sigma_data)
                if not unconditional:
                    return teacher_module.apply({"params": p}, x_in, t_in, labels, train=False)
                # Classifier-free guidance: the null label (models.NULL_LABEL) drops the class embedding.
                if labels is None:
                    raise errors.ConfigError(
                        f"config.method.{config.method.name}.guidance_scale needs a class-conditional teacher "
                        "(config.model.num_classes > 0); this run is unconditional: set guidance_scale=1.0.")
                null = jnp.full_like(labels, models.NULL_LABEL)
                return teacher_module.apply({"params": p}, x_in, t_in, null, train=False)

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


def compiler_options(devices) -> dict | None:
    """XLA options for programs on `devices`: `CPU_COMPILER_OPTIONS` when they are all CPUs, else None (the
    accelerators' compilers keep their defaults). An `XLA_FLAGS` setting of the same option wins."""
    if not all(device.platform == "cpu" for device in devices):
        return None
    user = os.environ.get("XLA_FLAGS", "")
    return {name: value for name, value in CPU_COMPILER_OPTIONS.items() if f"--{name}=" not in user} or None


def jit_train_step(step_fn, mesh, state_shardings, teacher_params, distance_params):
    """The one compiled step of a run: state donated and laid out by `state_shardings`, the batch split over
    the mesh's batch axes, teacher parameters (concrete or abstract) in their own shardings, distance
    weights replicated; metrics come back replicated. On CPU with `compiler_options`."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    teacher_shardings = None if teacher_params is None else jax.tree.map(lambda a: a.sharding, teacher_params)
    distance_shardings = None if distance_params is None else replicated
    return jax.jit(step_fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh), teacher_shardings,
                                          distance_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=0,
                   compiler_options=compiler_options(mesh.devices.flat))


def distance_params_from_config(config, mesh):
    """The weights of the run's distance network (LPIPS: `config.distance_weights`, '' for its default file),
    replicated over `mesh`; None for distances without a network (l2, pseudo_huber)."""
    name = methods.distance_name(config)
    if name is None or not distances.has_network(name):
        return None
    params = distances.load_params(name, config.distance_weights or None)
    return jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
