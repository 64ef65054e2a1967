"""UNet ↔ openai/diffusers maps: released key names and shapes, round trips, numerical parity with diffusers."""
import json
import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cmjax.interop import diffusers as interop_diffusers
from cmjax.interop import openai as interop
from cmjax.models.unet import UNet

REFERENCE = "/work/shared/reference/openai_unet_state_dict.json"

RELEASED = {
    "imagenet64": dict(
        image_size=64, model_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
        attention_resolutions=(32, 16, 8), num_head_channels=64, use_scale_shift_norm=True,
        resblock_updown=True, num_classes=1000,
    ),
    "lsun256": dict(
        image_size=256, model_channels=256, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
        attention_resolutions=(32, 16, 8), num_head_channels=64, use_scale_shift_norm=False,
        resblock_updown=True, num_classes=None,
    ),
}

# Tiny networks that together cover: class labels, scale-shift on/off, attention at one and two levels,
# resnet up/down-sampling and conv up/down-sampling, one and two res blocks.
TINY = {
    "cond_scaleshift_attn1": dict(
        image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
        num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True, num_classes=10,
    ),
    "uncond_default_attn2": dict(
        image_size=16, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(8, 4),
        num_head_channels=32, use_scale_shift_norm=False, resblock_updown=True, num_classes=None,
    ),
    "cond_convresample": dict(
        image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(16,),
        num_head_channels=16, use_scale_shift_norm=True, resblock_updown=False, num_classes=5,
    ),
}


def _randomized(params, seed):
    """Every leaf random, zero-initialised convs and norm affines included, so that a wrong map cannot hide."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.normal(size=leaf.shape) / np.sqrt(fan_in)
        elif name == "scale":
            value = 1.0 + 0.2 * rng.normal(size=leaf.shape)
        elif name == "embedding":
            value = rng.normal(size=leaf.shape)
        else:
            value = 0.2 * rng.normal(size=leaf.shape)
        out.append(jnp.asarray(value, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


@pytest.mark.parametrize("name", ["imagenet64", "lsun256"])
def test_state_dict_names_and_shapes_match_released_checkpoints(name):
    """The openai export of the full released configurations (eval_shape-sized, nothing allocated) has exactly the
    reference names and shapes, and its diffusers renaming exactly UNet2DModel's (built on the meta device)."""
    unet = interop.unet_from_model_config(dict(name="unet", **RELEASED[name]), "test")
    reference = json.load(open(REFERENCE))[name]
    shapes = interop.openai_state_dict_shapes(interop.unet_param_shapes(unet))
    expected = {k: tuple(v) for k, v in reference["keys"].items()}
    assert sorted(set(expected) - set(shapes)) == []
    assert sorted(set(shapes) - set(expected)) == []
    assert {k: v for k, v in shapes.items() if expected[k] != v} == {}
    assert sum(int(np.prod(s)) for s in shapes.values()) == reference["num_params"]

    config = interop_diffusers.diffusers_unet2d_config(unet)
    if name == "imagenet64":  # DESIGN.md §4, as diffusers' openai/diffusers-cd_imagenet64_l2 folder has it
        assert config["block_out_channels"] == [192, 384, 576, 768] and config["layers_per_block"] == 3
        assert config["down_block_types"] == ["ResnetDownsampleBlock2D"] + ["AttnDownBlock2D"] * 3
        assert config["up_block_types"] == ["AttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"]
        assert (config["num_class_embeds"], config["resnet_time_scale_shift"]) == (1000, "scale_shift")
    views = {k: np.broadcast_to(np.float32(0), v) for k, v in expected.items()}
    renamed = {k: v.shape for k, v in interop_diffusers.openai_to_diffusers_state_dict(views, unet).items()}
    with torch.device("meta"):
        model = diffusers.UNet2DModel(**config)
    assert renamed == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_openai_name_rule():
    assert interop.openai_name(("input_blocks_15_1", "qkv", "kernel")) == "input_blocks.15.1.qkv.weight"
    assert interop.openai_name(("output_blocks_2_2", "out_layers_3", "bias")) == "output_blocks.2.2.out_layers.3.bias"
    assert interop.openai_name(("input_blocks_3_0", "in_layers_0", "scale")) == "input_blocks.3.0.in_layers.0.weight"
    assert interop.openai_name(("label_emb", "embedding")) == "label_emb.weight"
    assert interop.openai_name(("out_2", "kernel")) == "out.2.weight"


def test_round_trip_and_layouts():
    unet = UNet(**TINY["cond_scaleshift_attn1"])
    params = _randomized(interop.unet_param_shapes(unet), seed=0)
    sd = interop.to_openai_state_dict(params)
    # Conv HWIO → OIHW, Dense (in, out) → (out, in), embedding unchanged.
    conv_in_hwio = np.asarray(params["input_blocks_0_0"]["kernel"])
    np.testing.assert_array_equal(sd["input_blocks.0.0.weight"], np.transpose(conv_in_hwio, (3, 2, 0, 1)))
    np.testing.assert_array_equal(sd["time_embed.0.weight"], np.asarray(params["time_embed_0"]["kernel"]).T)
    np.testing.assert_array_equal(sd["label_emb.weight"], params["label_emb"]["embedding"])
    back = interop.from_openai_state_dict(sd, params)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))


def test_from_openai_state_dict_reports_mismatches():
    unet = UNet(**TINY["cond_scaleshift_attn1"])
    params = interop.unet_param_shapes(unet)
    sd = interop.to_openai_state_dict(jax.tree.map(lambda s: np.zeros(s.shape, np.float32), params))
    del sd["label_emb.weight"]
    sd["out.2.weight"] = np.zeros((3, 32, 1, 1), np.float32)
    sd["extra.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(ValueError, match=r"label_emb\.weight.*extra\.weight.*out\.2\.weight"):
        interop.from_openai_state_dict(sd, params)


def test_legacy_qkv_order_matches_legacy_attention():
    """QKVAttentionLegacy (per-head [q k v] rows) on its own layout = flash order after legacy_qkv_to_flash_order."""
    heads, head_dim, tokens = 3, 4, 5
    rng = np.random.default_rng(0)
    qkv_legacy = rng.normal(size=(3 * heads * head_dim, tokens))  # one batch element, rows × positions

    def softmax_attention(q, k, v):  # q, k, v: [heads, head_dim, tokens]
        w = np.einsum("hct,hcs->hts", q, k) / np.sqrt(head_dim)
        w = np.exp(w - w.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        return np.einsum("hts,hcs->hct", w, v).reshape(heads * head_dim, tokens)

    per_head = qkv_legacy.reshape(heads, 3 * head_dim, tokens)  # cm QKVAttentionLegacy's reshape + split
    legacy_out = softmax_attention(*np.split(per_head, 3, axis=1))
    flash = interop.legacy_qkv_to_flash_order(qkv_legacy, heads).reshape(3, heads, head_dim, tokens)
    np.testing.assert_allclose(softmax_attention(*flash), legacy_out, rtol=1e-12)
    assert not np.allclose(flash.reshape(qkv_legacy.shape), qkv_legacy)


@pytest.mark.parametrize("name", sorted(TINY))
def test_numerical_parity_with_diffusers_unet2d(name):
    unet = UNet(**TINY[name])
    params = _randomized(interop.unet_param_shapes(unet), seed=1)

    torch_model = diffusers.UNet2DModel(**interop_diffusers.diffusers_unet2d_config(unet)).eval()
    sd = {k: torch.tensor(v) for k, v in interop_diffusers.to_diffusers_state_dict(params, unet).items()}
    torch_model.load_state_dict(sd, strict=True)

    rng = np.random.default_rng(2)
    x_bhwc = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    time_input = (250.0 * np.log(np.array([0.01, 20.0]))).astype(np.float32)
    labels = np.array([1, 3]) if unet.num_classes else None
    ours = np.asarray(unet.apply({"params": params}, x_bhwc, time_input, labels))
    with torch.no_grad():
        theirs = torch_model(
            torch.from_numpy(x_bhwc.transpose(0, 3, 1, 2)),
            torch.from_numpy(time_input),
            class_labels=None if labels is None else torch.from_numpy(labels),
        ).sample.numpy().transpose(0, 2, 3, 1)
    assert np.abs(theirs).mean() > 0.1  # randomised zero-init layers: the output is not trivially zero
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_imported_openai_checkpoint_is_a_cd_teacher_and_resumes(tmp_path):
    """`--mode=import` of an openai state dict writes a run that `config.teacher.workdir` accepts (load_teacher
    returns exactly the imported weights) and that training resumes from (step 0, data stream from its start)."""
    from cmjax import checkpointing, sharding
    from cmjax import workdir as workdir_lib
    from cmjax.data import pipeline
    from cmjax.interop import export_checkpoint, import_checkpoint
    from configs import default

    teacher_config = default.get_config()  # the default tiny UNet on the embedded digits
    teacher_config.method.name = "edm"
    unet = interop.unet_from_model_config(teacher_config.model, "test")
    params = _randomized(interop.unet_param_shapes(unet), seed=3)
    source = interop.save_state_dict(interop.to_openai_state_dict(params), str(tmp_path / "edm_digits_ema.pt"))
    import_checkpoint(teacher_config, str(tmp_path / "teacher"), format="openai", input=source)

    student = default.get_config()
    student.method.name = "cd"
    student.teacher.workdir = str(tmp_path / "teacher")
    workdir_lib.check_teacher(student)
    mesh = sharding.make_mesh(student.mesh)
    module, teacher_params, config = workdir_lib.load_teacher(student, mesh)
    assert config.method.name == "edm" and interop.openai_unet_kwargs(module) == interop.openai_unet_kwargs(unet)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(teacher_params), jax.tree.map(np.asarray, params))

    # What train_and_evaluate does on start: restore the newest checkpoint, data-iterator state included.
    abstract, shardings = workdir_lib.abstract_train_state(config, module, mesh)
    data_iter = pipeline.build(config.data, mesh, global_batch_size=config.batch_size, seed=config.seed)
    with checkpointing.Checkpointer(str(tmp_path / "teacher"), save_every=1, keep=1) as checkpointer:
        state, step = checkpointer.restore(workdir_lib.with_shardings(abstract, shardings), data_iter)
    assert step == 0 and int(state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(teacher_params))

    # An EDM denoiser exports to openai's layout (not as a consistency pipeline) and back, bit for bit.
    files = export_checkpoint(config, str(tmp_path / "teacher"), format="openai", output=str(tmp_path / "out"))
    assert os.path.basename(files["state_dict"]) == "ema_0.999_000000.pt"
    assert json.load(open(files["unet_kwargs"]))["parameterization"] == "edm"
    exported = interop.load_state_dict(files["state_dict"])
    jax.tree.map(np.testing.assert_array_equal, exported, interop.to_openai_state_dict(params))
