"""End-to-end training on the 8-device CPU mesh, in process (subprocess cases: test_train_processes.py)."""
import glob
import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cmjax import losses, models, optim, sharding, train, train_step
from cmjax import workdir as workdir_lib
from configs import digits


def _config(tmp_path_factory, **overrides):
    config = digits.get_config("smoke")
    config.data.data_dir = str(tmp_path_factory.getbasetemp() / "tfds")
    config.log_every = 1
    for key, value in overrides.items():
        target = config
        *path, leaf = key.split(".")
        for part in path:
            target = target[part]
        target[leaf] = value
    return config


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def ict_run(tmp_path_factory):
    """10 iCT steps whose curriculum passes N = 11, 21, 41, 81, 161 (K′ = 2 steps per stage)."""
    config = _config(tmp_path_factory, total_steps=10, ckpt_every=5, **{"optim.warmup_steps": 0, "method.ict.s1": 160})
    workdir = str(tmp_path_factory.mktemp("ict_run"))
    final = train.train_and_evaluate(config, workdir)
    return config, workdir, final


def test_run_writes_metrics_checkpoints_grids_and_compiles_once(ict_run):
    config, workdir, final = ict_run
    rows = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 11))
    for key in ("loss", "grad_norm", "num_scales", "target_ema", "learning_rate", "steps_per_sec",
                "images_per_sec", "images_per_sec_per_device", "skipped_steps"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert sorted({int(r["num_scales"]) for r in rows}) == [11, 21, 41, 81, 161]
    assert final["train_step_compilations"] == 1  # every curriculum stage ran in one executable
    assert final["first_step_seconds"] > 0  # logged: compile (or cache load) included
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "5"]
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    grids = sorted(os.path.basename(p) for p in glob.glob(os.path.join(workdir, "samples", "*.png")))
    assert grids == ["ema0.999_1step_00000010.png", "ema0.999_2step_00000010.png"]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["method"]["name"] == "ict"


def test_rerun_of_a_finished_run_resumes_and_does_nothing(ict_run, tmp_path_factory):
    config, workdir, _ = ict_run
    before = len(_read_jsonl(os.path.join(workdir, "metrics.jsonl")))
    train.train_and_evaluate(config, workdir)
    assert len(_read_jsonl(os.path.join(workdir, "metrics.jsonl"))) == before


def test_resume_drops_metrics_rows_logged_after_the_checkpoint(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 9)]
    with open(path, "w") as f:
        f.writelines(rows + ['{"step": 9, "lo'])  # killed while writing step 9
    workdir_lib.truncate_metrics_log(path, 5)
    assert [r["step"] for r in _read_jsonl(path)] == [1, 2, 3, 4, 5]
    workdir_lib.truncate_metrics_log(path, 5)  # idempotent
    assert [r["step"] for r in _read_jsonl(path)] == [1, 2, 3, 4, 5]


def test_progress_line_is_one_compact_line():
    scalars = {"loss": 0.0312345, "steps_per_sec": 40.0, "images_per_sec": 5120.0, "skipped_steps": 0.0}
    assert train.progress_line(1200, 18000, scalars) == (
        "step 1200/18000 (6.7%)  loss 0.031234  40.0 steps/s  5,120 img/s  ETA 7m00s")
    slow = dict(scalars, steps_per_sec=0.5, skipped_steps=2.0)
    assert train.progress_line(10, 9000, slow).endswith("ETA 4h59m  skipped 2")


def test_edm_loss_falls(tmp_path_factory):
    config = _config(tmp_path_factory, total_steps=40, ckpt_every=40, batch_size=64, model=MLP,
                     **{"method.name": "edm", "optim.learning_rate": 2e-3, "optim.warmup_steps": 0,
                        "optim.optimizer": "adam"})
    workdir = str(tmp_path_factory.mktemp("edm_run"))
    train.train_and_evaluate(config, workdir)
    loss = np.array([r["loss"] for r in _read_jsonl(os.path.join(workdir, "metrics.jsonl"))])
    assert loss[-10:].mean() < 0.7 * loss[:5].mean(), loss


# configs/digits.py:smoke's MLP: these tests are about the loop, not the network (one network for the whole
# module, so its programs compile once into the session's compilation cache).
MLP = digits.get_config("smoke").model


def test_non_finite_steps_are_skipped_then_training_stops(tmp_path_factory):
    # σ_data = 0 makes the EDM weight (σ² + σd²)/(σ·σd)² infinite: every step is non-finite.
    config = _config(tmp_path_factory, total_steps=20, max_nonfinite_steps=3, ckpt_every=2, model=MLP,
                     **{"method.name": "edm", "method.edm.sigma_data": 0.0, "optim.warmup_steps": 0})
    workdir = str(tmp_path_factory.mktemp("nan_run"))
    expected = r"non-finite for 3 consecutive steps \(since step 1, stopped at step 3\)"
    with pytest.raises(train.TrainingStoppedError, match=expected):
        train.train_and_evaluate(config, workdir)
    rows = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["skipped_steps"] for r in rows] == [1, 2, 3]
    # The checkpoint written at step 2 holds the untouched (finite) initial parameters.
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]


def test_config_errors(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("bad"))
    with pytest.raises(ValueError, match=r"12.*8 devices"):
        train.train_and_evaluate(_config(tmp_path_factory, batch_size=12), workdir)
    with pytest.raises(ValueError, match=r"config.teacher.workdir"):
        train.train_and_evaluate(_config(tmp_path_factory, **{"method.name": "cd"}), workdir)
    config = _config(tmp_path_factory, **{"method.name": "edm"})
    with config.unlocked():
        config.method.edm.s0 = 3
    with pytest.raises(ValueError, match=r"config.method.edm has key\(s\) \['s0'\]"):
        train.train_and_evaluate(config, workdir)
    with pytest.raises(ValueError, match=r"yields images \(8, 8, 1\).*\(16, 16, 1\)"):
        train.train_and_evaluate(_config(tmp_path_factory, **{"model.image_size": 16, "model.in_channels": 1}), workdir)


def test_compiled_cd_step_takes_teacher_as_argument_not_constant(tmp_path_factory):
    """The teacher's parameters must be sharded arguments: a closed-over teacher would be baked into the
    executable as constants (and replicated on every chip)."""
    config = _config(tmp_path_factory, model=MLP, **{"method.name": "cd"})
    mesh = sharding.make_mesh(config.mesh)
    module = models.get(config.model)
    objective = losses.make_objective("cd", num_scales=18)
    optimizer, lr_fn = optim.make_optimizer(config.optim, config.total_steps)
    abstract_state, state_shardings = workdir_lib.abstract_train_state(config, module, mesh)
    teacher_params = jax.eval_shape(lambda k: models.init_params(module, config, k), jax.random.key(0))
    step = jax.jit(train_step.make_train_step(config, module, objective, optimizer, lr_fn, teacher_module=module),
                   in_shardings=(state_shardings, sharding.batch_sharding(mesh), None))
    batch = {"image": jax.ShapeDtypeStruct((16, 8, 8, 1), jnp.uint8),
             "label": jax.ShapeDtypeStruct((16,), jnp.int32)}
    module_text = step.lower(abstract_state, batch, teacher_params).as_text()
    main_signature = re.search(r"func.func public @main\((.*?)\) ->", module_text, re.S).group(1)
    num_args = len(re.findall(r"%arg\d+:", main_signature))
    # + the image; the label is pruned by jit because this model is unconditional.
    expected = len(jax.tree.leaves(abstract_state)) + len(jax.tree.leaves(teacher_params)) + 1
    assert num_args == expected, (num_args, expected)
    assert _largest_constant(module_text) < 4096


def test_constant_check_catches_a_closed_over_teacher():
    """The HLO check above would fail if the teacher were baked in: lower such a function and look."""
    teacher = {"w": jnp.ones((256, 256))}
    text = jax.jit(lambda x: x @ teacher["w"]).lower(jnp.ones((2, 256))).as_text()
    assert _largest_constant(text) >= 256 * 256


def _largest_constant(module_text):
    shapes = re.findall(r"stablehlo.constant dense[^\n]*?: tensor<([0-9x]*)[a-z][a-z0-9]*>", module_text)
    return max((int(np.prod([int(d) for d in shape.split("x") if d] or [1])) for shape in shapes), default=0)


@pytest.fixture(scope="module")
def edm_teacher(tmp_path_factory):
    config = _config(tmp_path_factory, total_steps=4, ckpt_every=4, model=MLP,
                     **{"method.name": "edm", "optim.warmup_steps": 0})
    workdir = str(tmp_path_factory.mktemp("edm_teacher"))
    train.train_and_evaluate(config, workdir)
    return workdir


def _restored_state(config, workdir):
    from cmjax import checkpointing

    mesh = sharding.make_mesh(config.mesh)
    abstract, shardings = workdir_lib.abstract_train_state(config, models.get(config.model), mesh)
    with checkpointing.Checkpointer(workdir, save_every=1, keep=1, read_only=True) as reader:
        return reader.restore(workdir_lib.with_shardings(abstract, shardings))


def _assert_trees_close(a, b, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=atol)


def _max_difference(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a),
                                                                                    jax.tree.leaves(b)))


@pytest.mark.slow  # an EDM teacher trained first (15–25 s on 2 cores); the CLI test trains cd/ect too
def test_cd_distils_from_an_edm_run_starting_from_the_teacher(edm_teacher, tmp_path_factory):
    """CD starts from the teacher (both CM releases): here as the CIFAR-10 JAX release's finetune, the online
    network and target from the teacher's online parameters and the EMA from the teacher's EMA."""
    config = _config(tmp_path_factory, total_steps=3, ckpt_every=3, model=MLP,
                     **{"method.name": "cd", "teacher.workdir": edm_teacher, "method.cd.num_scales": 18,
                        "optim.warmup_steps": 0, "optim.learning_rate": 1e-12,
                        "teacher.init_online_from": "online"})
    workdir = str(tmp_path_factory.mktemp("cd_run"))
    final = train.train_and_evaluate(config, workdir)
    assert np.isfinite(final["loss"]) and final["num_scales"] == 18
    mesh = sharding.make_mesh(config.mesh)
    _, teacher_online, _, _ = workdir_lib.load_params(edm_teacher, mesh, ema_rate="online")
    _, teacher_params, _ = workdir_lib.load_teacher(config, mesh)  # the teacher's EMA copy
    assert _max_difference(teacher_online, teacher_params) > 1e-5  # the two copies are distinguishable
    state, step = _restored_state(config, workdir)
    assert step == 3
    # Three updates at lr 1e-12 leave θ and θ⁻ where they started; the EMA moved 0.3 % towards θ.
    _assert_trees_close(state.params, teacher_online)
    _assert_trees_close(state.target_params, teacher_online)
    (ema,) = state.ema.values()
    assert _max_difference(ema, teacher_params) < 0.01 * _max_difference(teacher_online, teacher_params)


def test_init_student_decides_where_the_student_starts(edm_teacher, tmp_path_factory):
    """The methods table decides (CD, ECT: from the teacher); config.teacher.init_student overrides it, also
    for CT (the CM release's ImageNet-64 CT command), which then needs the teacher's workdir."""
    from cmjax import methods

    cd = _config(tmp_path_factory, model=MLP, **{"method.name": "cd", "teacher.workdir": edm_teacher})
    assert methods.starts_from_teacher(cd) and methods.uses_teacher(cd)
    cd.teacher.init_student = False
    assert not methods.starts_from_teacher(cd)
    ct = _config(tmp_path_factory, model=MLP, **{"method.name": "ct"})
    assert not methods.starts_from_teacher(ct) and not methods.uses_teacher(ct)
    ct.teacher.init_student = True
    assert methods.uses_teacher(ct) and not methods.get("ct").needs_teacher
    with pytest.raises(ValueError, match=r"starts from a teacher.*config.teacher.workdir"):
        workdir_lib.check_teacher(ct)
    ct.teacher.workdir = edm_teacher
    workdir_lib.check_teacher(ct)
    mesh = sharding.make_mesh(ct.mesh)
    online, ema = workdir_lib.student_start(ct, mesh, models.get(ct.model))
    _, teacher_ema, _ = workdir_lib.load_teacher(ct, mesh)
    _assert_trees_close(online, teacher_ema, atol=0)  # init_online_from="ema": every copy is the EMA
    _assert_trees_close(ema, teacher_ema, atol=0)
    # A student network unlike the teacher's cannot start from it: say so, and how to start fresh.
    other = _config(tmp_path_factory, model=ml_collections.ConfigDict({"name": "mlp", "hidden_dim": 32,
                                                                        "num_layers": 1}),
                    **{"method.name": "cd", "teacher.workdir": edm_teacher})
    with pytest.raises(ValueError, match=r"init_student=False"):
        workdir_lib.student_start(other, mesh, models.get(other.model))
    bad = _config(tmp_path_factory, model=MLP, **{"method.name": "cd", "teacher.workdir": edm_teacher,
                                                  "teacher.init_online_from": "latest"})
    with pytest.raises(ValueError, match=r"init_online_from='latest'"):
        workdir_lib.check_teacher(bad)


@pytest.mark.slow  # an EDM teacher trained first (15–25 s on 2 cores); the CLI test trains cd/ect too
def test_ect_starts_from_the_teacher_weights(edm_teacher, tmp_path_factory):
    config = _config(tmp_path_factory, total_steps=1, ckpt_every=1, model=MLP,
                     **{"method.name": "ect", "teacher.workdir": edm_teacher, "optim.warmup_steps": 0,
                        "optim.learning_rate": 1e-12})
    workdir = str(tmp_path_factory.mktemp("ect_run"))
    train.train_and_evaluate(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    _, teacher_params, _ = workdir_lib.load_teacher(config, mesh)
    state, step = _restored_state(config, workdir)
    assert step == 1
    # One update at lr 1e-12 leaves the student equal to the teacher's EMA weights it started from.
    _assert_trees_close(state.params, teacher_params)


def test_the_compilation_cache_defaults_to_the_workdir_and_the_environment_wins(monkeypatch, tmp_path):
    """`config.compilation_cache_dir`: "workdir" → WORKDIR/jax_cache, a directory as given, "" off; the launch
    scripts' JAX_COMPILATION_CACHE_DIR wins. (jax.config.update is captured: this process keeps its own cache.)"""
    from cmjax import workdir as workdir_lib
    from configs import default

    updates = []
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    config = default.get_config()
    assert config.compilation_cache_dir == "workdir"
    assert workdir_lib.enable_compilation_cache(config, str(tmp_path)) == str(tmp_path / "jax_cache")
    config.compilation_cache_dir = "/shared/cache"
    assert workdir_lib.enable_compilation_cache(config, str(tmp_path)) == "/shared/cache"
    config.compilation_cache_dir = ""
    assert workdir_lib.enable_compilation_cache(config, str(tmp_path)) is None
    assert updates == [("jax_compilation_cache_dir", str(tmp_path / "jax_cache")),
                       ("jax_compilation_cache_dir", "/shared/cache")]
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "gs://bucket/cache")
    config.compilation_cache_dir = "workdir"
    assert workdir_lib.enable_compilation_cache(config, str(tmp_path)) == "gs://bucket/cache"
    assert len(updates) == 2


def test_cpu_steps_compile_at_the_cheaper_backend_level(monkeypatch):
    """CPU programs get CPU_COMPILER_OPTIONS (bench/results/compile_time_cpu.md), accelerators none, and an
    XLA_FLAGS setting of the same option is left to win."""
    import types

    from cmjax import train_step

    cpus = jax.devices()
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert train_step.compiler_options(cpus) == {"xla_backend_optimization_level": 1}
    assert train_step.compiler_options([types.SimpleNamespace(platform="tpu")]) is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=3")
    assert train_step.compiler_options(cpus) is None
    # The option reaches XLA: a jitted function compiles with it.
    compiled = jax.jit(lambda x: x * 2.0, compiler_options={"xla_backend_optimization_level": 1}).lower(1.0).compile()
    assert float(compiled(1.0)) == 2.0


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["color_ncsnpp", "color_adm"])
def test_cifar10_network_families_train_on_colour_digits(tmp_path_factory, variant):
    """configs/digits.py:color_ncsnpp / color_adm (the CIFAR-10 recipes' NCSN++ and ADM UNet, reduced) on the
    32×32×3 colour digits through the loop: finite loss, a checkpoint, and the digits metric scoring the
    colour samples through the grey mapping."""
    config = digits.get_config(variant)
    config.data.data_dir = str(tmp_path_factory.getbasetemp() / "tfds")
    config.batch_size, config.total_steps, config.ckpt_every, config.log_every = 8, 2, 2, 1
    config.optim.warmup_steps = 1
    config.eval_every, config.sample.num_images, config.sample.metric_samples = 0, 8, 128
    config.ema_rates = config.ema_rates[:1]
    workdir = str(tmp_path_factory.mktemp(variant))
    train.train_and_evaluate(config, workdir)
    rows = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert rows and all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
    scores = json.load(open(glob.glob(os.path.join(workdir, "samples", "metrics_*.json"))[-1]))
    assert any(k.endswith("confident_fraction") for k in scores), scores
