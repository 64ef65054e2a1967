"""Every recipe in configs/: its published settings, its network at full size (shapes only), and its `:smoke`
variant trained end to end in this process on the 8-device CPU mesh (embedded digits, no download).

The smoke runs share one TFDS directory; CD and ECT smokes use the workdir of their teacher recipe's smoke run
(`--config.teacher.workdir=...`), which runs first. Recipes whose published distance is LPIPS run their smoke
with `l2` unless the LPIPS VGG weights are present (they are a manual conversion, never downloaded here);
`test_lpips_smoke` runs the LPIPS distance itself where the weights exist and is skipped, saying why, where not.
"""
import importlib
import json
import math
import os

import jax
import numpy as np
import pytest

from cmjax import methods, models, train
from configs import common

# recipe -> variant for the smoke run (besides "smoke"); teachers run before their students.
SMOKES = {
    "cifar10_edm": "", "cifar10_cd": "l2", "cifar10_ct": "", "cifar10_ict": "", "cifar10_ect": "", "cifar10_sct": "",
    "imagenet64_edm": "", "imagenet64_cd": "l2", "imagenet64_ct": "", "imagenet64_ict": "",
    "imagenet64_sct": "", "imagenet64_scd": "",
    "lsun_bedroom256_edm": "", "lsun_bedroom256_cd": "l2", "lsun_bedroom256_ct": "",
    "cifar10_meanflow": "", "imagenet256_meanflow": "", "imagenet256_imf": "", "imagenet256_sit": "",
}
# configs/digits.py:smoke (the tiny MLP) runs end to end in
# tests/test_train.py (the `ict_run` fixture and others); it is not repeated here.
COVERED_ELSEWHERE = {"digits"}
TEACHERS = {"cifar10_cd": "cifar10_edm", "cifar10_ect": "cifar10_edm", "imagenet64_cd": "imagenet64_edm",
            "lsun_bedroom256_cd": "lsun_bedroom256_edm", "imagenet64_scd": "imagenet64_edm:trigflow"}
RECIPE_FILES = sorted(f[:-3] for f in os.listdir(os.path.join(os.path.dirname(__file__), "..", "configs"))
                      if f.endswith(".py") and f not in ("__init__.py", "common.py", "default.py"))


def get_config(name, arg=None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


def lpips_weights_missing():
    """Why the LPIPS distance cannot run here, or '' if it can."""
    try:
        from cmjax.metrics import lpips
    except ImportError as err:
        return f"cmjax.metrics.lpips is not importable: {err}"
    path = lpips.default_weights_path()
    if not os.path.exists(path):
        return (f"the LPIPS VGG16 weights are not at {path} (converted once with `python -m cmjax.metrics.lpips "
                "--convert`, which needs torchvision's VGG16 file; no download in tests)")
    return ""


def test_every_recipe_file_has_a_smoke_run():
    assert sorted(set(SMOKES) | COVERED_ELSEWHERE) == RECIPE_FILES


# ---------------------------------------------------------------------------------------------------------
# Published settings (DESIGN §4 and the CM / iCT / ECT releases), at full size.

# recipe -> (network parameters, settings that must hold)
PUBLISHED = {
    "cifar10_edm": (56_395_651, {"method.name": "edm", "batch_size": 512, "total_steps": 400_000,
                                 "optim.learning_rate": 1e-3, "model.dropout": 0.13}),
    "cifar10_cd": (56_395_651, {"method.name": "cd", "method.cd.num_scales": 18, "method.cd.target_ema": 0.0,
                                "method.cd.teacher_solver": "heun", "method.cd.distance": "lpips", "batch_size": 512,
                                "total_steps": 800_000, "optim.learning_rate": 4e-4, "optim.optimizer": "radam"}),
    "cifar10_ct": (56_395_651, {"method.name": "ct", "method.ct.curriculum": "cm_adaptive", "method.ct.s0": 2,
                                "method.ct.s1": 150, "method.ct.mu0": 0.9, "total_steps": 800_000,
                                "method.ct.distance": "lpips"}),
    "cifar10_ict": (56_395_651, {"method.name": "ict", "method.ict.s0": 10, "method.ict.s1": 1280,
                           "method.ict.p_mean": -1.1, "method.ict.p_std": 2.0, "model.dropout": 0.3,
                           "model.fourier_scale": 0.02,
                           "batch_size": 1024, "total_steps": 400_000, "ema_rates": (0.99993,),
                           "method.ict.distance": "pseudo_huber", "method.ict.weighting": "ict"}),
    "cifar10_ect": (56_395_651, {"method.name": "ect", "method.ect.q": 2.0, "method.ect.k": 8.0, "method.ect.b": 1.0,
                                 "method.ect.stage_steps": 25_000, "method.ect.huber_c": 0.0, "method.ect.p_mean": -1.1,
                                 "method.ect.p_std": 2.0}),
    # NCSN++ with positional time features (no frozen Fourier W: −128) and the log-variance head (+257).
    "cifar10_sct": (56_395_780, {"method.name": "sct", "method.sct.weighting": "adaptive_prior",
                                 "model.logvar_head": True, "model.time_embedding": "positional",
                                 "method.sct.p_mean": -1.0, "method.sct.p_std": 1.4,
                                 "method.sct.tangent_warmup_steps": 10_000, "method.sct.tangent_norm_c": 0.1,
                                 "batch_size": 512, "total_steps": 350_000, "optim.optimizer": "radam",
                                 "optim.learning_rate": 1e-4, "optim.b2": 0.99, "model.dropout": 0.2,
                                 "sample.two_step_sigma": 0.821}),
    # MeanFlow: cmjax's NCSN++ with the standard encoder and a two-time embedding (the release's DDPM++ is ~55M).
    "cifar10_meanflow": (55_929_475, {"method.name": "meanflow", "method.meanflow.p_mean_t": -2.0,
                                      "method.meanflow.equal_fraction": 0.25, "method.meanflow.norm_p": 0.75,
                                      "batch_size": 1024, "optim.learning_rate": 6e-4, "model.dropout": 0.2}),
    # SiT-XL/2 with learn_sigma (8 output channels, the release's tree) and 1001 label rows (docs/fidelity.md).
    "imagenet256_sit": (674_834_720, {"method.name": "fm", "method.fm.time_distribution": "uniform",
                                      "method.fm.train_eps": 0.0, "model.label_dropout": 0.1, "model.null_label": True,
                                      "model.learn_sigma": True, "batch_size": 256, "optim.optimizer": "adamw",
                                      "optim.learning_rate": 1e-4, "optim.weight_decay": 0.0, "ema_rates": (0.9999,),
                                      "total_steps": 7_005_600}),
    "imagenet64_edm": (295_899_267, {"method.name": "edm", "batch_size": 4096, "model.dropout": 0.1}),
    "imagenet64_cd": (295_899_267, {"method.name": "cd", "method.cd.num_scales": 40, "method.cd.target_ema": 0.95,
                                    "batch_size": 2048, "total_steps": 600_000, "optim.learning_rate": 8e-6}),
    "imagenet64_ct": (295_899_267, {"method.name": "ct", "method.ct.s0": 2, "method.ct.s1": 200, "method.ct.mu0": 0.95,
                                    "total_steps": 800_000}),
    # The ADM UNet and the log-variance head on its 192 positional time features (+193).
    "imagenet64_sct": (295_899_460, {"method.name": "sct", "method.sct.p_mean": -0.8, "method.sct.p_std": 1.6,
                                     "method.sct.weighting": "adaptive_prior", "batch_size": 1024}),
    "imagenet64_scd": (295_899_460, {"method.name": "scd", "method.scd.p_mean": -1.0, "method.scd.p_std": 1.6,
                                     "method.scd.weighting": "adaptive_prior", "optim.optimizer": "adam",
                                     "optim.learning_rate": 7e-5, "optim.eps": 1e-11, "optim.grad_clip_norm": 10.0,
                                     "batch_size": 1024, "total_steps": 600_000, "model.dropout": 0.0,
                                     "sample.two_step_sigma": 1.1}),
    "imagenet64_ict": (295_899_267, {"method.name": "ict", "method.ict.s0": 10, "method.ict.s1": 1280,
                                     "model.dropout": 0.2, "ema_rates": (0.99997,)}),
    "lsun_bedroom256_edm": (526_304_771, {"method.name": "edm", "model.dropout": 0.1}),
    "lsun_bedroom256_cd": (526_304_771, {"method.name": "cd", "method.cd.num_scales": 40, "method.cd.target_ema": 0.95,
                                         "total_steps": 600_000, "optim.learning_rate": 1e-5}),
    "lsun_bedroom256_ct": (526_304_771, {"method.name": "ct", "method.ct.s1": 150, "method.ct.mu0": 0.95,
                                         "total_steps": 1_000_000, "optim.learning_rate": 5e-5}),
}


def _get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_settings_and_network_size(name):
    config = get_config(name)
    expected_params, settings = PUBLISHED[name]
    for key, value in settings.items():
        assert _get(config, key) == value, key
    methods.objective_from_config(config)  # every method key is a setting of the objective
    module = models.get(config.model)
    shapes = jax.eval_shape(lambda k: models.init_params(module, config, k), jax.random.key(0))
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
    if expected_params is not None:
        assert count == expected_params
    assert models.image_shape(config)  # the network fits the dataset's images
    assert config.batch_size % 8 == 0


@pytest.mark.parametrize("name,size,depth", [("imagenet256_meanflow", "b2", 12), ("imagenet256_meanflow", "xl2", 28),
                                             ("imagenet256_imf", "b2", 12), ("imagenet256_imf", "xl2", 48)])
def test_imagenet256_meanflow_recipes_say_what_they_need(name, size, depth):
    """Their settings load (docs/fidelity.md checks them); the network builds (cmjax.models.dit); the data is the
    SD-VAE latent dataset `--mode=encode` writes."""
    from cmjax.data import datasets
    from cmjax.models import dit

    config = get_config(name, size)
    assert config.model.depth == depth and config.model.num_classes == 1000 and config.model.null_label
    assert config.method.name == "meanflow" and methods.time_inputs("meanflow") == 2
    methods.objective_from_config(config)
    assert isinstance(models.get(config.model), dit.DiT)
    spec = datasets.get_spec(config.data.name)  # the SD-VAE latents of 256×256 ImageNet, from --mode=encode
    assert spec.is_latent and spec.image_shape == (32, 32, 4) and spec.source == "imagenet256"


def test_variants():
    assert get_config("cifar10_cd", "l2").method.cd.distance == "l2"
    assert get_config("cifar10_cd").method.cd.distance == "lpips"
    deep = get_config("cifar10_ict", "deep")
    assert deep.model.num_res_blocks == 2 * get_config("cifar10_ict").model.num_res_blocks
    with pytest.raises(ValueError, match=r"Unknown variant.*'lpsip'.*'l2', 'lpips', 'smoke'"):
        get_config("cifar10_cd", "lpsip")
    with pytest.raises(ValueError, match="one of the variants lpips and l2"):
        get_config("imagenet64_cd", "lpips,l2")
    # The two-step σ of openai's `--ts 0,22,39 --steps 40` (ImageNet-64 CD).
    assert get_config("imagenet64_cd").sample.two_step_sigma == pytest.approx(1.3823679, rel=1e-6)
    assert common.openai_ts_sigma(0, 40) == pytest.approx(80.0)
    # EDM's 0.5M-image half-life at batch 512 (the CIFAR-10 teacher's EMA).
    assert get_config("cifar10_edm").ema_rates[0] == pytest.approx(0.5 ** (512 / 0.5e6))


def test_method_typo_fails_when_the_config_loads():
    """Configs are locked: a misspelt key fails in the recipe file itself (and on the command line)."""
    config = get_config("cifar10_cd")
    config.method.cd.num_scale = 18  # a recipe file adds the key (it is not locked yet) ...
    with pytest.raises(ValueError, match=r"config.method.cd has key\(s\) \['num_scale'\]"):
        methods.settings(config)  # ... which the method rejects before anything is built
    config = get_config("cifar10_cd")
    config.lock()  # the command line's config is locked (main.py): an override that misspells fails there
    with pytest.raises(AttributeError, match=r"num_scale"):
        config.method.cd.num_scale = 18


# ---------------------------------------------------------------------------------------------------------
# Smoke runs.


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Runs each recipe's smoke once on demand (teachers first); returns name -> (config, workdir, metrics)."""
    root = tmp_path_factory.mktemp("recipes")
    data_dir = str(root / "tfds")
    runs = {}

    def run(name):  # a recipe, or "recipe:variant" (a teacher variant, e.g. imagenet64_edm:trigflow)
        if name in runs:
            return runs[name]
        recipe, _, chosen = name.partition(":")
        variant = ",".join(v for v in (chosen or SMOKES[recipe], "smoke") if v)
        config = get_config(recipe, variant)
        config.data.data_dir = data_dir
        if name in TEACHERS:
            config.teacher.workdir = run(TEACHERS[name])[1]
        section = config.method[config.method.name]
        if str(section.get("distance", "")).startswith("lpips") and lpips_weights_missing():
            section.distance = "l2"
        workdir = str(root / name.replace(":", "_"))
        runs[name] = (config, workdir, train.train_and_evaluate(config, workdir))
        return runs[name]

    return run


# One smoke per method in the default tier (the CIFAR-10 recipes); the ImageNet-64 and LSUN smokes repeat those
# methods with another optimizer, EMA or class conditioning and run in the second tier (`make test-slow`, CI).
def _smoke_param(name):
    return name if name.startswith("cifar10_") else pytest.param(name, marks=pytest.mark.slow)


@pytest.mark.parametrize("name", [_smoke_param(n) for n in sorted(SMOKES, key=lambda n: (n in TEACHERS, n))])
def test_smoke(name, smoke_runs):
    config, workdir, final = smoke_runs(name)
    steps = config.total_steps
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in rows)
    assert rows[-1]["skipped_steps"] == 0
    assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(steps)]
    assert final["train_step_compilations"] == 1
    assert len(os.listdir(os.path.join(workdir, "samples"))) >= 2  # 1-step and 2-step grids
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    published = get_config(name)
    assert saved["method"]["name"] == published.method.name
    # A tiny MLP (a tiny DiT for a DiT recipe) stands in for the network, class-conditional where it is.
    assert saved["model"]["name"] == ("dit" if published.model.name == "dit" else "mlp")
    assert bool(saved["model"]["num_classes"]) == bool(published.model.get("num_classes"))
    assert saved["model"]["dropout"] == published.model.dropout
    # The smoke keeps the recipe's objective settings (the distance only where LPIPS cannot run here).
    for key, value in published.method[published.method.name].items():
        if key != "distance":
            assert saved["method"][published.method.name][key] == (
                list(value) if isinstance(value, tuple) else value), key
    assert saved["optim"]["optimizer"] == published.optim.optimizer
    if name in TEACHERS:
        assert saved["teacher"]["workdir"] == smoke_runs(TEACHERS[name])[1]


def test_lpips_smoke(smoke_runs, tmp_path, request):
    config = get_config("cifar10_cd", "lpips,smoke")
    if lpips_weights_missing():
        # No pretrained VGG16 offline (CI): the same path with seeded random VGG weights through the converter.
        config.distance_weights = request.getfixturevalue("lpips_random_weights")[1]
    config.data.data_dir = os.path.join(os.path.dirname(smoke_runs("cifar10_edm")[1]), "tfds")
    config.teacher.workdir = smoke_runs("cifar10_edm")[1]
    config.total_steps = config.ckpt_every = 1
    final = train.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(final["loss"])
    with open(os.path.join(tmp_path, "config.json")) as f:
        assert json.load(f)["method"]["cd"]["distance"] == "lpips"
