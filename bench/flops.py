"""XLA-counted FLOPs of the compiled train step divided by one forward pass of the network.

Expected about 3 for edm (forward + backward), 4 for ict (plus one target forward) and 6 for cd with the
Heun teacher (plus two teacher forwards); a ratio well above these is wasted work. sCT (sCM's continuous-time
objective) is forward + backward + one JVP of the target network: with `jvp_mode="exact"` the JVP is a
primal and a tangent pass, and XLA shares the primal with the online forward (same inputs, same dropout key), so
about 4 (measured 4.05, bench/results/flops_cpu.md); with "finite_difference" the JVP is three forwards (value,
+h, −h), so about 6; sCD adds one teacher forward (two with classifier-free guidance).
MeanFlow: the forward is the primal of one JVP (its tangent pass costs about one forward more), plus the
backward, about 4.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python bench/flops.py [--channels 64]
(configs/default.py's digits UNet: configs/digits.py trains an MLP since the demo moved to it)
"""
from __future__ import annotations

import argparse

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cmjax import losses, methods, models, optim, sharding, train_step  # noqa: E402
from cmjax import workdir as workdir_lib  # noqa: E402
from configs import default  # noqa: E402


def flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis.get("flops", 0.0))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    config = default.get_config()  # the digits UNet (configs/default.py), widened
    config.model.model_channels = args.channels
    config.model.num_head_channels = args.channels
    config.batch_size = args.batch
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
    module = models.get(config.model)
    x, t, labels = models.sample_inputs(config, args.batch)
    params = jax.eval_shape(lambda k: models.init_params(module, config, k), jax.random.key(0))
    forward = jax.jit(lambda p, x, t: module.apply({"params": p}, x, t, labels)).lower(params, x, t).compile()
    forward_flops = flops(forward)
    print(f"device: {jax.devices()[0].device_kind}; UNet {args.channels} channels, batch {args.batch}; "
          f"forward {forward_flops / 1e9:.3f} GFLOPs")
    batch = {"image": jax.ShapeDtypeStruct((args.batch, *models.image_shape(config)), jnp.uint8),
             "label": jax.ShapeDtypeStruct((args.batch,), jnp.int32)}
    expected = {"edm": "3", "ict": "4", "cd": "6", "sct": "4", "sct fd": "6", "scd": "5", "meanflow": "4"}
    scm = {"tangent_warmup_steps": 10_000}
    for label, name, settings in [
        ("edm", "edm", {}), ("ict", "ict", {}), ("cd", "cd", {"num_scales": 18, "teacher_solver": "heun"}),
        ("sct", "sct", {**scm, "jvp_mode": "exact"}), ("sct fd", "sct", {**scm, "jvp_mode": "finite_difference"}),
        ("scd", "scd", {**scm, "jvp_mode": "exact"}), ("meanflow", "meanflow", {}),
    ]:
        methods.select(config, name, **settings)
        objective = losses.make_objective(name, **settings, **({"total_steps": 1000} if name == "ict" else {}))
        optimizer, lr_fn = optim.make_optimizer(config.optim, config.total_steps)
        abstract_state, _ = workdir_lib.abstract_train_state(config, module, mesh)
        teacher = module if name in ("cd", "scd") else None
        step = jax.jit(train_step.make_train_step(config, module, objective, optimizer, lr_fn, teacher_module=teacher))
        compiled = step.lower(abstract_state, batch, params if teacher else None).compile()
        ratio = flops(compiled) / forward_flops
        print(f"{label:6s} train step {flops(compiled) / 1e9:8.3f} GFLOPs = {ratio:5.2f} forward passes "
              f"(expected about {expected[label]})")


if __name__ == "__main__":
    main()
