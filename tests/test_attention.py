"""cmjax.models.attention: the Pallas flash kernel (interpret mode on CPU) against `jax.nn.dot_product_attention`
in value, `jax.jvp`, `jax.grad` of the value, and the gradients of sCM's and MeanFlow's JVP losses; the networks'
`attention_impl` (default "xla" bit-identical to the code before it; "flash" equal up to float32 rounding)."""
import math

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from cmjax import errors
from cmjax.models import attention, ncsnpp_layers, unet

XLA = jax.nn.dot_product_attention


def _inputs(shape, count=6, seed=0):
    return tuple(jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(seed), count))


def _derivatives(attend, q, k, v, dq, dk, dv, w, only=("grad", "scm", "meanflow")):
    """Value, JVP, grad of ⟨attend, w⟩, and the gradients in a of sCM's and MeanFlow's JVP losses (those in
    `only`; None for the others)."""
    value, tangent = jax.jvp(attend, (q, k, v), (dq, dk, dv))
    grads = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * w), (0, 1, 2))(q, k, v) if "grad" in only else None

    def scm_loss(a):  # the JVP of a frozen network under stop_gradient; the gradient through a separate value
        _, df = jax.jvp(attend, (jax.lax.stop_gradient(a) * q, k, v), (dq, dk, dv))
        return jnp.sum((attend(a * q, k, v) - jax.lax.stop_gradient(df)) ** 2)

    def meanflow_loss(a):  # the gradient through the value of the jvp itself (MeanFlow's u), only q and k move
        u, du = jax.jvp(attend, (a * q, a * k, v), (dq, dk, jnp.zeros_like(dv)))
        return jnp.sum((u - jax.lax.stop_gradient(u - 0.3 * du)) ** 2 * w) + jnp.sum(u * w)

    return (value, tangent, grads, jax.grad(scm_loss)(1.3) if "scm" in only else None,
            jax.grad(meanflow_loss)(0.7) if "meanflow" in only else None)


def _compare(got, want, names):
    for name, g, e in zip(names, got, want):
        for g_leaf, e_leaf in zip(jax.tree.leaves(g), jax.tree.leaves(e)):
            scale = float(jnp.max(jnp.abs(e_leaf)))
            assert scale > 1e-3, name  # each quantity is exercised, not trivially zero
            np.testing.assert_allclose(g_leaf, e_leaf, atol=2e-5 * max(scale, 1.0), err_msg=name)


def _flash8(q, k, v):
    return attention.flash_attention(q, k, v, block_q=8, block_k=8)


def _shapes():
    # 13 queries, 11 keys: neither divides the 8-blocks, so the padded keys are masked and padded rows dropped.
    q, dq, w = _inputs((2, 13, 2, 8), 3, seed=1)
    k, v, dk, dv = _inputs((2, 11, 2, 8), 4, seed=2)
    return q, k, v, dq, dk, dv, w


def test_flash_matches_xla_in_value_jvp_and_meanflows_gradient():
    """One compile (the default tier's budget): the value and JVP of a jax.jvp, and the gradient through that
    value with the tangent under stop_gradient (MeanFlow's pattern; it runs the backward kernels and the
    tangent's own derivative rule)."""
    def run(attend, *args):
        value, tangent, _, _, meanflow = _derivatives(attend, *args, only=("meanflow",))
        return value, tangent, meanflow
    got = jax.jit(lambda *a: run(_flash8, *a))(*_shapes())
    want = jax.jit(lambda *a: run(XLA, *a))(*_shapes())
    _compare(got, want, ("value", "jvp", "MeanFlow grad"))


@pytest.mark.slow
def test_flash_matches_xla_in_the_gradient_of_the_value_and_scms_gradient():
    got = jax.jit(lambda *a: _derivatives(_flash8, *a))(*_shapes())
    want = jax.jit(lambda *a: _derivatives(XLA, *a))(*_shapes())
    _compare(got, want, ("value", "jvp", "grad", "sCM grad", "MeanFlow grad"))


@pytest.mark.slow
def test_flash_tangent_is_not_the_value_derivative_of_a_wrong_softmax():
    # Only v moves: dO = P·dv exactly; only q moves: dO has no P·dv term (the two halves of the identity).
    q, k, v, dq, _, dv = _inputs((1, 16, 1, 8))
    zero = jnp.zeros_like(q)
    flash = lambda q, k, v: attention.flash_attention(q, k, v, block_q=8, block_k=8)  # noqa: E731
    _, along_v = jax.jvp(flash, (q, k, v), (zero, zero, dv))
    np.testing.assert_allclose(along_v, XLA(q, k, dv), atol=1e-5)
    _, along_q = jax.jvp(flash, (q, k, v), (dq, zero, zero))
    np.testing.assert_allclose(along_q, jax.jvp(XLA, (q, k, v), (dq, zero, zero))[1], atol=1e-5)


def test_implementation_names_and_blocks_are_checked():
    q = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(errors.ConfigError, match="'splash'.*xla"):
        attention.dot_product_attention(q, q, q, implementation="splash")
    with pytest.raises(errors.ConfigError, match="needs an NVIDIA GPU"):
        attention.dot_product_attention(q, q, q, implementation="cudnn")
    with pytest.raises(errors.ConfigError, match="block_q=12"):
        attention.flash_attention(q, q, q, block_q=12)
    np.testing.assert_array_equal(attention.dot_product_attention(q + 1, q, q), XLA(q + 1, q, q))


def _perturbed(params, seed=3):
    """Random values for every leaf (the zero-initialised output projections would hide the attention)."""
    leaves, tree = jax.tree.flatten(nn.meta.unbox(params))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.slow  # a conv-net block compiled both ways (5–6 s on 2 cores)
def test_unet_attention_block_default_is_the_previous_code_and_flash_agrees():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 32))
    block = unet.AttentionBlock(num_heads=2)
    params = _perturbed(block.init(jax.random.key(1), x)["params"])
    default = block.apply({"params": params}, x)

    # The block as written before attention_impl existed: GN, qkv conv, jax.nn.dot_product_attention, proj_out.
    def previous(x):
        h = unet.layers.GroupNorm32().apply({"params": params["norm"]}, x)
        qkv = jnp.einsum("bhwc,cd->bhwd", h, params["qkv"]["kernel"][0, 0]) + params["qkv"]["bias"]
        qkv = qkv.reshape(2, 16, 3, 2, 16)
        out = XLA(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(2, 4, 4, 32)
        return x + jnp.einsum("bhwc,cd->bhwd", out, params["proj_out"]["kernel"][0, 0]) + params["proj_out"]["bias"]

    np.testing.assert_allclose(default, previous(x), atol=1e-5)
    xla = unet.AttentionBlock(num_heads=2, attention_impl="xla").apply({"params": params}, x)
    np.testing.assert_array_equal(default, xla)
    flash = unet.AttentionBlock(num_heads=2, attention_impl="flash").apply({"params": params}, x)
    assert float(jnp.max(jnp.abs(default - x))) > 0.1
    np.testing.assert_allclose(flash, default, atol=1e-4)


@pytest.mark.slow  # a conv-net block compiled both ways (5–6 s on 2 cores)
def test_ncsnpp_attention_default_is_the_release_einsum():
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 16))
    block = ncsnpp_layers.AttnBlock(init_scale=1.0)
    params = _perturbed(block.init(jax.random.key(1), x)["params"])
    default = block.apply({"params": params}, x)

    def previous(x):  # the release's AttnBlockpp, single head over the 16 pixels
        y = nn.GroupNorm(num_groups=4, epsilon=1e-6).apply({"params": params["norm"]}, x)
        q, k, v = (y @ params[n]["kernel"] + params[n]["bias"] for n in ("q", "k", "v"))
        weights = jax.nn.softmax(jnp.einsum("bhwc,bHWc->bhwHW", q, k).reshape(1, 4, 4, 16) / math.sqrt(16), -1)
        y = jnp.einsum("bhwHW,bHWc->bhwc", weights.reshape(1, 4, 4, 4, 4), v)
        return (x + y @ params["out"]["kernel"] + params["out"]["bias"]) / math.sqrt(2.0)

    np.testing.assert_allclose(default, previous(x), atol=1e-5)
    np.testing.assert_array_equal(ncsnpp_layers.AttnBlock(init_scale=1.0, attention_impl="xla").apply(
        {"params": params}, x), default)


@pytest.mark.slow
def test_ncsnpp_attention_with_flash_agrees_in_value_and_jvp():
    x, dx = _inputs((1, 4, 4, 16), 2)
    block = ncsnpp_layers.AttnBlock(init_scale=1.0)
    params = _perturbed(block.init(jax.random.key(1), x)["params"])
    flash = ncsnpp_layers.AttnBlock(init_scale=1.0, attention_impl="flash")
    got = jax.jit(lambda x, dx: jax.jvp(lambda x: flash.apply({"params": params}, x), (x,), (dx,)))(x, dx)
    want = jax.jvp(lambda x: block.apply({"params": params}, x), (x,), (dx,))
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, atol=1e-4 * max(1.0, float(jnp.max(jnp.abs(e)))))


@pytest.mark.slow
def test_flash_jvp_lowers_to_mosaic_and_compiles_for_a_tpu_topology():
    pytest.importorskip("libtpu")
    from cmjax import aot

    device = aot.topology_devices("v5p:2x2x2")[0]
    spec = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16, sharding=jax.sharding.SingleDeviceSharding(device))
    jvp = jax.jit(lambda q, k, v, dq, dk, dv: jax.jvp(attention.flash_attention, (q, k, v), (dq, dk, dv)))
    lowered = jvp.lower(*[spec] * 6)
    assert lowered.as_text().count("tpu_custom_call") == 2  # the forward kernel and the tangent pass, Mosaic
    compiled = lowered.compile()
    assert compiled.cost_analysis()["flops"] >= 4 * 2 * 256 * 256 * 64 * 2  # the kernels' declared matmuls
    # Reverse mode: the backward's three kernels (forward with log-sum-exp, k̄ and v̄, q̄), no L×L buffer.
    long = jax.ShapeDtypeStruct((1, 1024, 2, 64), jnp.float32, sharding=spec.sharding)
    temps = {}
    for name, fn in (("flash", attention.flash_attention), ("xla", XLA)):
        grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v)), (0, 1, 2)))
        lowered = grad.lower(*[long] * 3)
        assert lowered.as_text().count("tpu_custom_call") == (3 if name == "flash" else 0)
        temps[name] = lowered.compile().memory_analysis().temp_size_in_bytes
    assert temps["xla"] >= 2 * 1024 * 1024 * 4 > temps["flash"], temps  # XLA stores the L×L scores, flash does not


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sct", "meanflow"])
def test_sct_and_meanflow_gradients_through_a_unet_with_flash_attention_match_xla(method):
    """The real objectives (cmjax.losses, exact JVP): sCT's JVP of the frozen network under stop_gradient and
    MeanFlow's gradient through the value of its jax.jvp, on a tiny UNet; flash vs xla, loss and gradient."""
    from cmjax import losses

    kwargs = dict(image_size=8, in_channels=1, out_channels=1, model_channels=32, channel_mult=(1,),
                  num_res_blocks=1, attention_resolutions=(8,), num_head_channels=16, num_classes=0)
    x = 0.5 * jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t_width = 2 if method == "meanflow" else 1
    t0 = jnp.zeros((2, t_width)) if t_width == 2 else jnp.zeros((2,))
    params = _perturbed(unet.UNet(**kwargs).init(jax.random.key(0), x, t0)["params"], seed=4)
    settings = dict(jvp_mode="exact") if method == "meanflow" else dict(
        jvp_mode="exact", tangent_warmup_steps=0, sigma_data=0.5, parameterization_kind="trigflow")
    objective = losses.make_objective(method, **settings)
    results = {}
    for impl in ("xla", "flash"):
        module = unet.UNet(**kwargs, attention_impl=impl)
        network = lambda p, x_in, t_in, *rng, module=module, **kw: module.apply({"params": p}, x_in, t_in)  # noqa
        results[impl] = jax.jit(jax.value_and_grad(lambda p: objective(network, p, x, jax.random.key(3), 0)[0]))(
            params)
    (loss_x, grad_x), (loss_f, grad_f) = results["xla"], results["flash"]
    assert float(loss_x) > 0
    np.testing.assert_allclose(loss_f, loss_x, rtol=1e-4)
    flat_x, flat_f = (jax.flatten_util.ravel_pytree(g)[0] for g in (grad_x, grad_f))
    np.testing.assert_allclose(flat_f, flat_x, atol=1e-4 * float(jnp.max(jnp.abs(flat_x))))
