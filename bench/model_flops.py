"""Forward FLOPs per image of the released network configurations, and the compile time of forward+backward.

FLOPs come from XLA's cost analysis of the lowered forward at batch 1, cross-checked against a count of the
convolutions and matmuls in the jaxpr (2 FLOPs per multiply-add). Parameters are `jax.ShapeDtypeStruct`s from
`jax.eval_shape`, so nothing of the 300–500M-parameter networks is allocated.

    .venv/bin/python bench/model_flops.py                       # all models, compile timing on ImageNet-64
    .venv/bin/python bench/model_flops.py --compile_model=none  # FLOPs only
    .venv/bin/python bench/model_flops.py --models=dit_s2,dit_b2,dit_l2,dit_xl2 --compile_model=none

DiT (Peebles & Xie 2023) reports "Gflops" that are multiply-adds (Table 4: DiT-XL/2 118.6 at 256×256, i.e. on
32×32×4 latents): half of the jaxpr count here, which counts 2 FLOPs per multiply-add.
"""
from __future__ import annotations

import argparse
import importlib
import math
import platform
import time

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from cmjax import models

# name → (config.model, image size, class-conditional). Settings as in DESIGN §4 / the CM releases.
CONFIGS = {
    "unet_imagenet64": (
        dict(name="unet", image_size=64, model_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
             attention_resolutions=(32, 16, 8), num_head_channels=64, use_scale_shift_norm=True,
             resblock_updown=True, num_classes=1000),
        64, True,
    ),
    "unet_lsun256": (
        dict(name="unet", image_size=256, model_channels=256, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
             attention_resolutions=(32, 16, 8), num_head_channels=64, use_scale_shift_norm=False,
             resblock_updown=True, num_classes=None),
        256, False,
    ),
    "ncsnpp_cifar10": (dict(name="ncsnpp"), 32, False),
    # The official DiTs on 32×32×4 SD-VAE latents (ImageNet 256): learn_sigma, 1000 classes + the null row.
    **{f"dit_{size}": (dict(name="dit", depth=depth, hidden_size=width, num_heads=heads, patch_size=patch,
                             learn_sigma=True, null_label=True), 32, True)
       for size, (depth, width, heads, patch) in {"s2": (12, 384, 6, 2), "b2": (12, 768, 12, 2),
                                                  "l2": (24, 1024, 16, 2), "xl2": (28, 1152, 16, 2)}.items()},
    # A small ADM UNet for when the full ImageNet-64 backward takes too long to compile on a small CPU.
    "unet_small32": (
        dict(name="unet", image_size=32, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
             attention_resolutions=(16, 8), num_head_channels=64, use_scale_shift_norm=True,
             resblock_updown=True, num_classes=10),
        32, True,
    ),
}


def abstract_inputs(image_size: int, conditional: bool, batch: int = 1, channels: int = 3):
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32) if conditional else None
    return x, t, labels


def abstract_params(module, x, t, labels):
    variables = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), x, t, labels)
    return nn.meta.unbox(variables["params"])


def jaxpr_matmul_flops(jaxpr) -> int:
    """2 × multiply-adds of every conv_general_dilated and dot_general, recursing into sub-jaxprs."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            lhs, rhs = (v.aval for v in eqn.invars)
            out = eqn.outvars[0].aval
            dn = eqn.params["dimension_numbers"]
            kernel_spatial = math.prod(rhs.shape[d] for d in dn.rhs_spec[2:])
            in_per_group = rhs.shape[dn.rhs_spec[1]]
            total += 2 * math.prod(out.shape) * kernel_spatial * in_per_group
        elif eqn.primitive.name == "dot_general":
            lhs, rhs = (v.aval for v in eqn.invars)
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            contracted = math.prod(lhs.shape[d] for d in lhs_contract)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * contracted
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += jaxpr_matmul_flops(sub)
    return total


def forward_flops(name: str):
    model_config, image_size, conditional = CONFIGS[name]
    module = models.get(model_config)
    x, t, labels = abstract_inputs(image_size, conditional, channels=getattr(module, "in_channels", 3))
    params = abstract_params(module, x, t, labels)
    n_params = sum(math.prod(p.shape) for p in jax.tree.leaves(params))

    def forward(p, x, t, labels):
        return module.apply({"params": p}, x, t, labels)

    start = time.perf_counter()
    lowered = jax.jit(forward).lower(params, x, t, labels)
    lower_s = time.perf_counter() - start
    xla_flops = float(lowered.cost_analysis()["flops"])
    counted = jaxpr_matmul_flops(jax.make_jaxpr(forward)(params, x, t, labels).jaxpr)
    return dict(name=name, params=n_params, xla_gflops=xla_flops / 1e9, matmul_gflops=counted / 1e9, lower_s=lower_s)


def train_step_compile_seconds(name: str, batch: int):
    """Wall time to lower and compile jit(grad(mean-square loss)) — forward and backward — at the given batch."""
    model_config, image_size, conditional = CONFIGS[name]
    module = models.get(model_config)
    x, t, labels = abstract_inputs(image_size, conditional, batch, channels=getattr(module, "in_channels", 3))
    params = abstract_params(module, x, t, labels)

    def loss(p, x, t, labels):
        return jnp.mean(jnp.square(module.apply({"params": p}, x, t, labels)))

    start = time.perf_counter()
    lowered = jax.jit(jax.value_and_grad(loss)).lower(params, x, t, labels)
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return dict(name=name, batch=batch, lower_s=lowered_at - start, compile_s=done - lowered_at)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="unet_imagenet64,unet_lsun256,ncsnpp_cifar10")
    parser.add_argument("--compile_model", default="unet_imagenet64", help="'none' to skip the compile timing")
    parser.add_argument("--compile_batch", type=int, default=1)
    args = parser.parse_args()

    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}), {jax.local_device_count()} local device(s); "
          f"host {platform.machine()} {platform.processor() or ''}".rstrip())
    flax_version = importlib.import_module("flax").__version__
    print(f"versions: jax {jax.__version__}, jaxlib {jax.lib.__version__}, flax {flax_version}, "
          f"numpy {np.__version__}, python {platform.python_version()}")
    print()
    print("| model | parameters | forward GFLOPs/image (XLA cost analysis) "
          "| conv+matmul GFLOPs/image (jaxpr count) | lower s |")
    print("|---|---:|---:|---:|---:|")
    for name in args.models.split(","):
        try:
            r = forward_flops(name)
        except ModuleNotFoundError as missing:  # a network another change has not landed yet
            if not (missing.name or "").startswith("cmjax.models"):
                raise
            print(f"| {name} | skipped: `{missing.name}` is not in this tree | | | |")
            continue
        print(f"| {r['name']} | {r['params']:,} | {r['xla_gflops']:.2f} | {r['matmul_gflops']:.2f} "
              f"| {r['lower_s']:.1f} |")
    if args.compile_model != "none":
        r = train_step_compile_seconds(args.compile_model, args.compile_batch)
        print()
        print(f"forward+backward compile, {r['name']} at batch {r['batch']}: "
              f"lower {r['lower_s']:.1f} s, XLA compile {r['compile_s']:.1f} s")


if __name__ == "__main__":
    main()
