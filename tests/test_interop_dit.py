"""DiT ↔ diffusers' `DiTTransformer2DModel`: the same random weights give the same outputs (≤ 1e-5 relative), and
a DiT run exports to / imports from that folder exactly (cmjax/interop/dit.py)."""
import json
import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cmjax import interop, models, sharding
from cmjax import workdir as workdir_lib
from cmjax.interop import dit as interop_dit
from cmjax.models import dit, layers
from configs import digits

# A tiny diffusers DiT: 2 blocks of width 64 (2 heads), patch 2 on 8×8×4, 10 classes; diffusers' own norm_eps
# default is 1e-5, the official DiT's (and cmjax's) 1e-6.
TINY = dict(num_attention_heads=2, attention_head_dim=32, in_channels=4, num_layers=2, sample_size=8, patch_size=2,
            num_embeds_ada_norm=10, norm_eps=1e-6)


def _random_diffusers(seed, **overrides):
    """A DiTTransformer2DModel with every parameter random (adaLN-Zero's and the output layer's zeros included),
    the blocks sharing block 0's time/label embedder as the official DiT (and diffusers' converter) has it."""
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn_like(p))
        shared = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(shared)
    return model


def _ours(model):
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    fields = interop_dit.fields_from_diffusers_config(dict(model.config), state_dict)
    net = dit.DiT(**fields)
    return net, interop_dit.from_diffusers_state_dict(state_dict, net)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_outputs_equal_diffusers(learn_sigma):
    """Same weights, same (x, timestep, label): outputs equal to 1e-5 relative; diffusers' timestep is cmjax's time
    input as is, its null class is index num_classes (cmjax's NULL_LABEL); a learn_sigma network's first C
    channels are cmjax's output."""
    model = _random_diffusers(0, out_channels=8 if learn_sigma else None)
    net, params = _ours(model)
    assert net.learn_sigma == learn_sigma and net.freq_shift == 1 and net.null_label
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    t = np.array([0.0, 3.5, 250.0, 999.0], np.float32)
    labels = np.array([0, 3, 9, 10])
    with torch.no_grad():
        theirs = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(labels)).sample.numpy()
    ours_labels = np.where(labels == 10, layers.NULL_LABEL, labels)
    ours = np.asarray(net.apply({"params": params}, x.transpose(0, 2, 3, 1), t, ours_labels)).transpose(0, 3, 1, 2)
    theirs = theirs[:, :4]
    assert np.abs(theirs).mean() > 0.1
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
    # The official time features (freq_shift = 0) are not diffusers': the setting matters.
    other = np.asarray(dit.DiT(**{**fields_of(net), "freq_shift": 0}).apply(
        {"params": params}, x.transpose(0, 2, 3, 1), t, ours_labels)).transpose(0, 3, 1, 2)
    assert np.abs(other - theirs).max() > 1e-3 * np.abs(theirs).max()


def fields_of(net):
    return {f: getattr(net, f) for f in net.__dataclass_fields__ if f not in ("parent", "name")}


def test_state_dict_round_trip_and_config_inverse(tmp_path):
    """cmjax → folder → cmjax is bit-exact (conditional without a null row, and unconditional), the folder loads in
    diffusers, and a folder whose blocks' embedders differ or whose time features are the official ones is refused
    with the reason."""
    from cmjax import errors

    for fields in (dict(num_classes=10, null_label=False), dict(num_classes=0)):
        net = dit.DiT(image_size=8, in_channels=4, out_channels=4, depth=2, hidden_size=64, num_heads=2,
                      freq_shift=1, **fields)
        shapes = interop_dit.param_shapes(net)
        leaves, tree = jax.tree.flatten(shapes)
        params = tree.unflatten([np.random.default_rng(i).standard_normal(s.shape).astype(np.float32)
                                 for i, s in enumerate(leaves)])
        interop_dit.write_transformer(str(tmp_path / str(net.num_classes)), params, net)
        folder_fields, state_dict = interop_dit.read_transformer(str(tmp_path / str(net.num_classes)))
        back = interop_dit.from_diffusers_state_dict(state_dict, dit.DiT(**folder_fields))
        assert folder_fields["num_classes"] == net.num_classes
        if net.num_classes:  # the folder's null row is the zero one cmjax's row-less DiT means by "no class"
            table = back.pop("y_embedder")["embedding"]
            assert not np.any(table[10])
            back["y_embedder"] = {"embedding": table[:10]}
        jax.tree.map(np.testing.assert_array_equal, back, params)
        model = diffusers.DiTTransformer2DModel.from_pretrained(str(tmp_path / str(net.num_classes)),
                                                                subfolder="transformer")
        assert sum(p.numel() for p in model.parameters()) == sum(v.size for v in state_dict.values())
    state_dict["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"][0] += 1.0
    with pytest.raises(errors.ConfigError, match="copies of the time/label embedders differ"):
        interop_dit.from_diffusers_state_dict(state_dict, dit.DiT(**folder_fields))
    with pytest.raises(errors.ConfigError, match="freq_shift=1"):
        interop_dit.diffusers_dit_config(dit.DiT())


@pytest.mark.slow
def test_run_import_export_round_trip(tmp_path):
    """A diffusers folder → `--mode=import` (configs/digits.py:smoke_dit with the folder's network) → a run whose
    every EMA copy is the folder's weights → `--mode=export` writes the same tensors back, and the sampler file."""
    model = _random_diffusers(3, in_channels=1, num_embeds_ada_norm=1)
    with torch.no_grad():  # an unconditional cmjax DiT's export: a zero label table
        for block in model.transformer_blocks:
            block.norm1.emb.class_embedder.embedding_table.weight.zero_()
    model.save_pretrained(str(tmp_path / "folder" / "transformer"))
    config = digits.get_config("smoke_dit")
    with pytest.raises(ValueError, match="depth: folder 2, config 1"):
        interop.import_checkpoint(config, str(tmp_path / "bad"), format="diffusers", input=str(tmp_path / "folder"))
    for field in ("depth", "hidden_size", "num_heads"):
        del config.model[field]
    interop.import_checkpoint(config, str(tmp_path / "run"), format="diffusers", input=str(tmp_path / "folder"))
    run_config = workdir_lib.read_run_config(str(tmp_path / "run"))
    assert (run_config.model.depth, run_config.model.hidden_size, run_config.model.freq_shift) == (2, 64, 1)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    _, params, _, _ = workdir_lib.load_params(str(tmp_path / "run"), mesh, ema_rate=None)
    assert "y_embedder" not in params and models.get(run_config.model).num_classes == 0
    paths = interop.export_checkpoint(config, str(tmp_path / "run"), format="diffusers", output=str(tmp_path / "out"))
    _, exported = interop_dit.read_transformer(str(tmp_path / "out"))
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    assert sorted(exported) == sorted(original)
    for k in original:
        np.testing.assert_array_equal(exported[k], original[k])
    sampler = json.load(open(paths["sampler"]))
    assert sampler["parameterization"] == "consistency" and os.path.exists(paths["transformer_weights"])
    with pytest.raises(ValueError, match="--format=diffusers"):
        interop.export_checkpoint(config, str(tmp_path / "run"), format="openai", output=str(tmp_path / "o"))
    x = jnp.zeros((1, 8, 8, 1))
    assert models.get(run_config.model).apply({"params": jax.device_get(params)}, x, jnp.zeros(1)).shape == x.shape
