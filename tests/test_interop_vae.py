"""The Flax SD-VAE against diffusers' PyTorch `AutoencoderKL`: random weights saved by diffusers itself
(`save_pretrained`), read by `cmjax.interop.vae.load_autoencoder`, give the same posterior and decoded images."""
import json
import os
import shutil

import diffusers
import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from cmjax import errors
from cmjax.interop import openai as interop_openai
from cmjax.interop import vae as interop_vae
from cmjax.models import vae

# The SD-VAE's block structure (4 levels, 2 resnets per encoder level, 32 groups, width changes with shortcut
# convs, an unchanged last width) at widths that run in seconds.
SD_STRUCTURE = {**vae.SD_CONFIG, "block_out_channels": (32, 64, 128, 128)}


def _diffusers_folder(path, config, seed=0):
    """A diffusers AutoencoderKL with every tensor random (GroupNorm affines are 1/0 at init), saved by diffusers."""
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**interop_vae.diffusers_config(vae.AutoencoderKL(**config))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return model


def _theirs(model, x_bhwc, z_bhwc):
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(x_bhwc).permute(0, 3, 1, 2)).latent_dist
        decoded = model.decode(torch.from_numpy(z_bhwc).permute(0, 3, 1, 2)).sample
    return [t.permute(0, 2, 3, 1).numpy() for t in (posterior.mean, posterior.logvar, decoded)]


def _ours(module):
    @jax.jit
    def run(params, x_bhwc, z_bhwc):
        mean, logvar = module.apply({"params": params}, x_bhwc, method="encode")
        return mean, logvar, module.apply({"params": params}, z_bhwc, method="decode")

    return run


def _relative_error(ours, theirs):
    return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


def _inputs(size, latent_size, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    z = rng.normal(size=(2, latent_size, latent_size, 4)).astype(np.float32)
    return x, z


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small_vae")
    model = _diffusers_folder(folder, vae.SMALL_CONFIG)
    module, params = interop_vae.load_autoencoder(str(folder))
    x, z = _inputs(16, 8)
    return dict(folder=folder, model=model, module=module, params=params, x=x, z=z, theirs=_theirs(model, x, z),
                run=_ours(module))


def test_encode_and_decode_equal_diffusers(small):
    assert small["module"] == vae.AutoencoderKL(**vae.SMALL_CONFIG)
    for ours, theirs in zip(small["run"](small["params"], small["x"], small["z"]), small["theirs"]):
        assert ours.shape == theirs.shape
        assert _relative_error(ours, theirs) <= 1e-5


def test_a_wrong_mapping_breaks_parity(small):
    """Parity is tight enough that a transposed kernel or two swapped (same-shape) resnets fail it by far."""
    params = small["params"]
    transposed = jax.tree.map(lambda a: a, params)
    transposed["encoder"]["conv_in"]["kernel"] = np.swapaxes(params["encoder"]["conv_in"]["kernel"], 0, 1)
    swapped = jax.tree.map(lambda a: a, params)
    block = swapped["decoder"]["up_blocks_0"]
    block["resnets_0"], block["resnets_1"] = block["resnets_1"], block["resnets_0"]
    for wrong in (transposed, swapped):
        errors_ = [_relative_error(o, t) for o, t in zip(small["run"](wrong, small["x"], small["z"]), small["theirs"])]
        assert max(errors_) > 1e-2, errors_


def test_sd_config_has_diffusers_keys_shapes_and_parameter_count():
    module = vae.AutoencoderKL(**vae.SD_CONFIG)
    with torch.device("meta"):
        model = diffusers.AutoencoderKL(**interop_vae.diffusers_config(module))
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert interop_openai.openai_state_dict_shapes(vae.param_shapes(module)) == theirs
    assert sum(p.numel() for p in model.parameters()) == 83_653_863


def test_save_autoencoder_writes_what_diffusers_loads(small, tmp_path):
    paths = interop_vae.save_autoencoder(str(tmp_path / "out"), small["params"], small["module"])
    loaded = diffusers.AutoencoderKL.from_pretrained(os.path.dirname(paths["weights"]))
    original_config = small["model"].config
    assert {k: loaded.config[k] for k in original_config} == dict(original_config)
    original = small["model"].state_dict()
    for key, value in loaded.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), original[key].numpy())


def test_legacy_attention_names_and_pipeline_folders_load(small, tmp_path):
    """Folders saved before diffusers 0.14 name the mid-block attention query/key/value/proj_attn; a pipeline
    folder holds the VAE in vae/."""
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = load_file(str(small["folder"] / interop_vae.WEIGHTS_FILE))
    renamed = {}
    for key, value in state.items():
        for new, old in legacy.items():
            key = key.replace(f".{new}.", f".{old}.")
        renamed[key] = value
    assert any(".proj_attn." in k for k in renamed)
    os.makedirs(tmp_path / "pipe" / "vae")
    shutil.copy(small["folder"] / "config.json", tmp_path / "pipe" / "vae" / "config.json")
    save_file(renamed, str(tmp_path / "pipe" / "vae" / interop_vae.WEIGHTS_FILE))
    _, params = interop_vae.load_autoencoder(str(tmp_path / "pipe"))
    jax.tree.map(np.testing.assert_array_equal, params, small["params"])


def test_float16_variant_weights_load_as_float32(small, tmp_path):
    """`save_pretrained(variant="fp16")` names the file diffusion_pytorch_model.fp16.safetensors."""
    folder = tmp_path / "fp16"
    os.makedirs(folder)
    shutil.copy(small["folder"] / "config.json", folder / "config.json")
    state = load_file(str(small["folder"] / interop_vae.WEIGHTS_FILE))
    save_file({k: v.astype(np.float16) for k, v in state.items()}, str(folder / interop_vae.FP16_WEIGHTS_FILE))
    _, params = interop_vae.load_autoencoder(str(folder))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b, np.float16).astype(np.float32)),
                 params, small["params"])
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))


def _copy(small, tmp_path, config_edit=None, drop_weights=False):
    folder = tmp_path / "edited"
    shutil.copytree(small["folder"], folder)
    if config_edit:
        config = json.load(open(folder / "config.json"))
        config_edit(config)
        json.dump(config, open(folder / "config.json", "w"))
    if drop_weights:
        os.remove(folder / interop_vae.WEIGHTS_FILE)
    return str(folder)


@pytest.mark.parametrize("case, error, words", [
    ("no folder", errors.MissingFileError, "is not a folder"),
    ("no config", errors.MissingFileError, "holds no config.json"),
    ("not a VAE", errors.ConfigError, "'UNet2DModel', not an AutoencoderKL"),
    ("other blocks", errors.ConfigError, "down_block_types"),
    ("no weights", errors.MissingFileError, "holds no diffusion_pytorch_model.safetensors"),
    ("other shapes", errors.ConfigError, "do not match the network its config describes"),
])
def test_a_folder_that_is_not_an_autoencoder_kl_is_a_user_error(small, tmp_path, case, error, words):
    folder = {
        "no folder": lambda: str(tmp_path / "missing"),
        "no config": lambda: str(tmp_path),
        "not a VAE": lambda: _copy(small, tmp_path, lambda c: c.update(_class_name="UNet2DModel")),
        "other blocks": lambda: _copy(small, tmp_path, lambda c: c.update(
            down_block_types=["AttnDownEncoderBlock2D", "DownEncoderBlock2D"])),
        "no weights": lambda: _copy(small, tmp_path, drop_weights=True),
        "other shapes": lambda: _copy(small, tmp_path, lambda c: c.update(layers_per_block=2)),
    }[case]()
    with pytest.raises(error, match=words) as raised:
        interop_vae.load_autoencoder(folder)
    assert isinstance(raised.value, errors.UserError)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["sd_structure", "sd"])
def test_sd_sized_vae_equals_diffusers(tmp_path, config):
    """The SD block structure at small widths, and the full sd-vae-ft-ema network (83.7M random weights), on
    32×32 images (4×4 latents)."""
    config = {"sd_structure": SD_STRUCTURE, "sd": vae.SD_CONFIG}[config]
    model = _diffusers_folder(tmp_path, config, seed=1)
    module, params = interop_vae.load_autoencoder(str(tmp_path))
    x, z = _inputs(32, 4, seed=1)
    for ours, theirs in zip(_ours(module)(params, x, z), _theirs(model, x, z)):
        assert _relative_error(ours, theirs) <= 1e-5


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CMJAX_VAE_FOLDER"), reason="set CMJAX_VAE_FOLDER to a downloaded VAE folder")
def test_downloaded_vae_equals_diffusers():
    """Opt-in: the real weights (e.g. `huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir DIR`,
    docs/vae.md) through both implementations; nothing is downloaded here."""
    folder = os.environ["CMJAX_VAE_FOLDER"]
    model = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae" if os.path.isdir(
        os.path.join(folder, "vae")) else None).eval()
    module, params = interop_vae.load_autoencoder(folder)
    x, z = _inputs(64, 8, seed=2)
    for ours, theirs in zip(_ours(module)(params, x, z), _theirs(model, x, z)):
        assert _relative_error(ours, theirs) <= 1e-5
