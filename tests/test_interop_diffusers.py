"""Export to diffusers and openai, import back: parity proven in PyTorch (`ConsistencyModelPipeline`).

Each tiny configuration goes the whole way a user's checkpoint goes: random weights (every leaf, zero-init
layers included) → openai .safetensors → `--mode=import` run A → `--mode=export` diffusers folder and openai
state dict → `ConsistencyModelPipeline.from_pretrained` → `--mode=import` of the folder into run B.
"""
import json
import os

import diffusers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from test_interop_openai import _randomized

from cmjax import evaluate, interop, models, sampling, sharding
from cmjax import workdir as workdir_lib
from cmjax.interop import diffusers as interop_diffusers
from cmjax.interop import openai as interop_openai
from cmjax.interop import runs
from cmjax.models.unet import UNet
from configs import default

# 16×16×3 (the pipeline's latents have 3 channels); together they cover class labels, scale-shift on and off,
# attention at one and two levels and at full resolution, resnet and conv resampling.
TINY = {
    "cond_scaleshift_resnet": dict(
        channel_mult=(1, 2), attention_resolutions=(8,), num_head_channels=16, use_scale_shift_norm=True,
        resblock_updown=True, num_classes=10),
    "uncond_plain_attn2": dict(
        channel_mult=(1, 2, 2), attention_resolutions=(8, 4), num_head_channels=32, use_scale_shift_norm=False,
        resblock_updown=True, num_classes=0),
    "cond_conv_resample": dict(
        channel_mult=(1, 2), attention_resolutions=(16,), num_head_channels=16, use_scale_shift_norm=True,
        resblock_updown=False, num_classes=10),
}
SIZE = 16
ONE_STEP, TWO_STEP = [0], [80, 0]  # diffusers timesteps: indices into the 161-point grid counted from σmax


def run_config(model_fields, method="ict", image_size=SIZE):
    """A run of a tiny UNet; the workdir tests use image_size=32, the cifar10 spec's (never read: not prepared)."""
    config = default.get_config()
    config.data.name = "cifar10"
    config.method.name = method
    config.model = ml_collections.ConfigDict(dict(
        name="unet", image_size=image_size, in_channels=3, out_channels=3, model_channels=32, num_res_blocks=1,
        dropout=0.0, dtype="float32", remat=False, **model_fields))
    return config


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"data": -1, "fsdp": 1})


@pytest.fixture(scope="module", params=sorted(TINY))
def exported(request, tmp_path_factory):
    """Random weights of one tiny UNet, written as a diffusers pipeline folder and an openai .pt file."""
    tmp = tmp_path_factory.mktemp(request.param)
    config = run_config(TINY[request.param])
    unet = interop_openai.unet_from_model_config(config.model, "test")
    params = _randomized(interop_openai.unet_param_shapes(unet), seed=len(request.param))
    scheduler = interop_diffusers.scheduler_config(**runs.sampler_settings(config))
    folder = interop_diffusers.write_pipeline(str(tmp / "pipeline"), params, unet, scheduler)
    state_dict = interop_openai.save_state_dict(interop_openai.to_openai_state_dict(params), str(tmp / "model.pt"))
    return dict(name=request.param, tmp=tmp, config=config, unet=unet, params=params, folder=folder,
                state_dict=state_dict)


def test_folder_layout(exported):
    folder = exported["folder"]
    index = json.load(open(folder["model_index"]))
    assert index["_class_name"] == "ConsistencyModelPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "CMStochasticIterativeScheduler"]
    scheduler = json.load(open(folder["scheduler_config"]))
    # The run's σ range and its largest grid (ict: s1 + 1 = 161 points).
    assert (scheduler["num_train_timesteps"], scheduler["sigma_min"], scheduler["sigma_max"]) == (161, 0.002, 80.0)


def test_round_trips_are_exact(exported):
    """cmjax → diffusers folder → cmjax and cmjax → openai .pt → cmjax give back every bit."""
    fields, state_dict = interop_diffusers.read_unet(str(exported["tmp"] / "pipeline"))
    unet = UNet(**fields)
    assert interop_openai.openai_unet_kwargs(unet) == interop_openai.openai_unet_kwargs(exported["unet"])
    assert_trees_equal(interop_diffusers.from_diffusers_state_dict(state_dict, unet), exported["params"])
    loaded = interop_openai.load_state_dict(exported["state_dict"])
    back = interop_openai.from_openai_state_dict(loaded, interop_openai.unet_param_shapes(exported["unet"]))
    assert_trees_equal(back, exported["params"])


def test_workdir_export_and_import(tmp_path, mesh):
    """The CLI path: openai file → import (run A) → export diffusers and openai → import the folder (run B);
    every EMA copy and the online parameters of both runs equal the weights, and the exports equal the
    library's own writes."""
    fields = dict(TINY["cond_scaleshift_resnet"], attention_resolutions=(16,))
    config = run_config(fields, image_size=32)
    unet = interop_openai.unet_from_model_config(config.model, "test")
    params = _randomized(interop_openai.unet_param_shapes(unet), seed=5)
    source = interop_openai.save_state_dict(interop_openai.to_openai_state_dict(params),
                                            str(tmp_path / "in.safetensors"))
    imported = interop.import_checkpoint(config, str(tmp_path / "run_a"), format="openai", input=source)
    assert imported["parameters"] == sum(np.size(x) for x in jax.tree.leaves(params))
    folder = interop.export_checkpoint(config, str(tmp_path / "run_a"), step=None, ema_rate=None,
                                       format="diffusers", output=str(tmp_path / "pipeline"))
    assert (folder["step"], folder["ema_rate"]) == (0, "0.999")
    files = interop.export_checkpoint(config, str(tmp_path / "run_a"), step=0, ema_rate="online", format="openai",
                                      output=str(tmp_path / "openai"))
    assert os.path.basename(files["state_dict"]) == "model000000.pt"
    assert_trees_equal(interop_openai.load_state_dict(files["state_dict"]), interop_openai.to_openai_state_dict(params))
    kwargs = json.load(open(files["unet_kwargs"]))["unet_model_kwargs"]
    assert (kwargs["num_classes"], kwargs["attention_resolutions"], kwargs["channel_mult"]) == (10, [2], [1, 2])
    # Run B's config names only the model; the folder fills in the rest of the network.
    bare = default.get_config()
    bare.data.name = "cifar10"
    bare.model = ml_collections.ConfigDict(dict(name="unet", dropout=0.0, dtype="float32", remat=False))
    interop.import_checkpoint(bare, str(tmp_path / "run_b"), format="diffusers", input=str(tmp_path / "pipeline"))
    for run in ("run_a", "run_b"):
        for rate in (None, "online"):
            _, restored, _, step = workdir_lib.load_params(str(tmp_path / run), mesh, ema_rate=rate)
            assert step == 0
            assert_trees_equal(jax.device_get(restored), params)
    run_b_unet = models.get(workdir_lib.read_run_config(str(tmp_path / "run_b")).model)
    assert interop_openai.openai_unet_kwargs(run_b_unet) == interop_openai.openai_unet_kwargs(unet)

    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        interop.import_checkpoint(config, str(tmp_path / "run_a"), format="openai", input=source)
    other = run_config(dict(fields, use_scale_shift_norm=False, num_classes=5), image_size=32)
    with pytest.raises(ValueError, match=r"use_scale_shift_norm: folder True, config False.*num_classes: folder 10"):
        interop.import_checkpoint(other, str(tmp_path / "run_c"), format="diffusers", input=str(tmp_path / "pipeline"))
    assert not os.path.exists(tmp_path / "run_c" / "config.json")


@pytest.fixture(scope="module")
def pipeline_and_ours(exported):
    pipe = diffusers.ConsistencyModelPipeline.from_pretrained(str(exported["tmp"] / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    module, params = models.get(exported["config"].model), exported["params"]

    @jax.jit
    def consistency(params, x, sigma, labels):
        return evaluate.consistency_fn_for(module, params, labels, sigma_data=0.5, sigma_min=0.002)(x, sigma)

    @jax.jit
    def network(params, x, t, labels):
        return module.apply({"params": params}, x, t, labels)

    return pipe, params, consistency, network


def _labels(exported):
    return np.array([1, 7]) if exported["unet"].num_classes else None


def test_unet2d_output_equals_cmjax(exported, pipeline_and_ours):
    pipe, params, _, network = pipeline_and_ours
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    t = (250.0 * np.log(np.array([0.01, 20.0]))).astype(np.float32)
    labels = _labels(exported)
    ours = np.asarray(network(params, x, t, labels))
    with torch.no_grad():
        theirs = pipe.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                           class_labels=None if labels is None else torch.from_numpy(labels)).sample
    theirs = theirs.numpy().transpose(0, 2, 3, 1)
    assert np.abs(theirs).mean() > 0.1
    err = np.abs(ours - theirs).max()
    print(f"{exported['name']}: UNet2DModel vs cmjax max |diff| = {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("timesteps", [ONE_STEP, TWO_STEP], ids=["1step", "2step"])
def test_pipeline_samples_equal_cmjax_sampler(exported, pipeline_and_ours, timesteps):
    """`ConsistencyModelPipeline(latents=…, timesteps=…)` = cmjax's openai-`ts` sampler with the same noise."""
    pipe, params, consistency, _ = pipeline_and_ours
    labels = _labels(exported)
    shape_nchw = (2, 3, SIZE, SIZE)
    latents = torch.randn(shape_nchw, generator=torch.Generator().manual_seed(3))
    out = pipe(batch_size=2, class_labels=None if labels is None else torch.from_numpy(labels), latents=latents,
               num_inference_steps=None, timesteps=timesteps, generator=torch.Generator().manual_seed(11),
               output_type="np").images
    # The scheduler draws its renoising noise from the generator after each step, in order.
    replay = torch.Generator().manual_seed(11)
    draws = [randn_tensor(shape_nchw, generator=replay, dtype=torch.float32) for _ in timesteps]
    noise = [jnp.asarray(n.numpy().transpose(0, 2, 3, 1)) for n in [latents] + draws]
    grid = pipe.scheduler.config.num_train_timesteps
    ts = sorted(timesteps) + [grid - 1]  # openai's ts: the same indices ascending, then the grid's last point
    ours = sampling.openai_multistep_sample(lambda x, s: consistency(params, x, s, labels), None,
                                            (2, SIZE, SIZE, 3), ts, grid, noise=noise)
    ours = np.clip((np.asarray(ours) + 1) / 2, 0, 1)
    assert np.mean((out > 0.005) & (out < 0.995)) > 0.2  # mostly unclipped: a wrong network would show
    err = np.abs(out - ours).max()
    print(f"{exported['name']} {len(timesteps)}-step: pipeline vs cmjax max |diff| = {err:.2e}")
    assert err < 1e-4


def test_unrepresentable_models_name_the_supported_one(tmp_path):
    config = default.get_config()
    config.model = ml_collections.ConfigDict(dict(name="mlp", hidden_dim=8))
    workdir_lib.write_config(config, str(tmp_path))
    for fmt in ("diffusers", "openai"):
        with pytest.raises(ValueError, match=r"supports config\.model\.name='unet'.*'mlp'"):
            interop.export_checkpoint(config, str(tmp_path), format=fmt, output=str(tmp_path / "out"))
    config.model = ml_collections.ConfigDict(dict(name="ncsnpp"))
    with pytest.raises(ValueError, match=r"'unet'.*'ncsnpp'"):
        interop.import_checkpoint(config, str(tmp_path / "new"), format="openai", input="unused.pt")


def test_edm_runs_do_not_export_as_consistency_pipeline(tmp_path):
    config = run_config(TINY["cond_scaleshift_resnet"], method="edm")
    workdir_lib.write_config(config, str(tmp_path))
    with pytest.raises(ValueError, match="EDM denoiser.*--format=openai"):
        interop.export_checkpoint(config, str(tmp_path), format="diffusers", output=str(tmp_path / "out"))


def test_ect_exports_with_the_sampler_its_release_evaluates():
    """ECT trains in EDM form but its release samples the boundary scalings at σmin = 0.003: export reads the
    same facts as evaluate (cmjax.methods.sampler_settings), so the scheduler gets σmin 0.003."""
    from cmjax.interop import runs

    config = run_config(TINY["cond_scaleshift_resnet"], method="ect")
    assert runs.consistency_parameterised(config)
    settings = runs.sampler_settings(config)
    assert settings["sigma_min"] == 0.003 and settings["sigma_max"] == 80.0 and settings["rho"] == 7.0
    config.method.ect.parameterization_kind = "consistency"  # trained with the boundary scalings: as trained
    assert runs.consistency_parameterised(config) and runs.sampler_settings(config)["sigma_min"] == 0.002


def test_unet2d_config_inverse():
    """A UNet2DModel config maps back to the same UNet fields; a config the ADM UNet cannot hold is refused."""
    for fields in TINY.values():
        unet = UNet(image_size=SIZE, model_channels=32, num_res_blocks=1, **fields)
        cfg = interop_diffusers.diffusers_unet2d_config(unet)
        back = interop_diffusers.unet_fields_from_diffusers_config(cfg)
        assert interop_diffusers.diffusers_unet2d_config(UNet(**back)) == cfg
    with pytest.raises(ValueError, match="act_fn='gelu'"):
        interop_diffusers.unet_fields_from_diffusers_config(dict(cfg, act_fn="gelu"))
    with pytest.raises(ValueError, match="attn_norm_num_groups=None"):
        interop_diffusers.unet_fields_from_diffusers_config(
            dict(cfg, resnet_time_scale_shift="scale_shift", attn_norm_num_groups=None))


@pytest.mark.slow
def test_cli_import_then_export(tmp_path):
    """`python -m cmjax.main --mode=import` then `--mode=export` (both formats), as a user runs them."""
    import subprocess
    import sys

    unet = interop_openai.unet_from_model_config(
        dict(default.get_config().model, image_size=32, in_channels=3, out_channels=3), "test")
    params = _randomized(interop_openai.unet_param_shapes(unet), seed=9)
    source = interop_openai.save_state_dict(interop_openai.to_openai_state_dict(params), str(tmp_path / "m.pt"))
    common = ["--config=configs/default.py", f"--workdir={tmp_path / 'run'}", "--config.data.name=cifar10",
              "--config.model.image_size=32", "--config.model.in_channels=3", "--config.model.out_channels=3"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for mode_flags in (["--mode=import", "--format=openai", f"--input={source}"],
                       ["--mode=export", "--format=diffusers", f"--output={tmp_path / 'pipe'}", "--ema_rate=0.999"],
                       ["--mode=export", "--format=openai", f"--output={tmp_path / 'oa'}", "--step=0"]):
        done = subprocess.run([sys.executable, "-m", "cmjax.main", *common, *mode_flags], cwd=root,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    fields, state_dict = interop_diffusers.read_unet(str(tmp_path / "pipe"))
    assert_trees_equal(interop_diffusers.from_diffusers_state_dict(state_dict, UNet(**fields)), params)
    assert_trees_equal(interop_openai.load_state_dict(str(tmp_path / "oa" / "ema_0.999_000000.pt")),
                       interop_openai.to_openai_state_dict(params))


def _trigflow_f(unet, s):
    """docs/export.md's PyTorch TrigFlow consistency function, as written there."""
    import math

    sd = s["sigma_data"]

    @torch.no_grad()
    def f(x_sigma, sigma, class_labels=None):
        root = math.sqrt(sigma**2 + sd**2)
        cos_t, sin_t, t = sd / root, sigma / root, math.atan2(sigma, sd)
        x_t = cos_t * x_sigma
        F = -unet(x_t / sd, torch.full((x_t.shape[0],), t), class_labels=class_labels).sample
        x0 = cos_t * x_t - sin_t * sd * F
        return x0.clamp(-1, 1) if s["clip"] else x0

    return f


def test_trigflow_export_samples_equal_cmjax(tmp_path):
    """An sCT UNet with the adaptive-weight head: the exported unet/ (head left out) plus the documented
    PyTorch sampler give cmjax's 1- and 2-step samples (`multistep_sample` on the run's TrigFlow denoiser)."""
    import math

    config = run_config({**TINY["cond_scaleshift_resnet"], "logvar_head": True}, method="sct")
    config.sample.two_step_sigma = 1.1
    assert runs.exported_parameterization(config) == "trigflow"
    unet = interop_openai.unet_from_model_config(config.model, "test")
    params = _randomized(interop_openai.unet_param_shapes(unet), seed=21)
    assert "logvar_linear" in params
    exported = interop_openai.without_training_heads(params)
    settings = runs.trigflow_sampler_settings(config)
    paths = interop_diffusers.write_trigflow_unet(str(tmp_path / "sct"), exported, unet, settings)
    assert not os.path.exists(tmp_path / "sct" / "model_index.json")  # no pipeline claims to sample it
    with open(paths["sampler"]) as fh:
        s = json.load(fh)
    assert s == settings and s["parameterization"] == "trigflow" and s["sigma_max"] == 80.0
    theirs_unet = diffusers.UNet2DModel.from_pretrained(str(tmp_path / "sct"), subfolder="unet").eval()
    f = _trigflow_f(theirs_unet, s)

    module = models.get(config.model)
    labels = np.array([1, 7])
    denoise = jax.jit(lambda x, sigma: evaluate.denoiser_for(module, params, labels, "trigflow", sigma_data=0.5,
                                                             sigma_min=0.002)(x, sigma))
    shape_nchw = (2, 3, SIZE, SIZE)
    gen = torch.Generator().manual_seed(0)
    draws = [torch.randn(shape_nchw, generator=gen) for _ in range(2)]
    one = f(s["sigma_max"] * draws[0], s["sigma_max"], torch.from_numpy(labels))
    tau = s["two_step_sigma"]
    two = f(one + math.sqrt(tau**2 - s["sigma_min"]**2) * draws[1], tau, torch.from_numpy(labels))
    assert float((two - one).abs().max()) > 0.1  # the second step changes the sample
    noise = [jnp.asarray(d.numpy().transpose(0, 2, 3, 1)) for d in draws]
    for steps, theirs in ((1, one), (2, two)):
        sigmas = [s["sigma_max"], tau][:steps]
        ours = sampling.multistep_sample(denoise, None, (2, SIZE, SIZE, 3), sigmas, noise=noise)
        theirs = theirs.numpy().transpose(0, 2, 3, 1)
        assert np.mean(np.abs(theirs) < 0.999) > 0.2  # mostly unclipped: a wrong network would show
        err = np.abs(np.asarray(ours) - theirs).max()
        print(f"sCT {steps}-step: PyTorch TrigFlow sampler vs cmjax max |diff| = {err:.2e}")
        assert err < 1e-4
