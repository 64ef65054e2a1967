"""The method table and a run's method settings (`cmjax/methods.py`), and that evaluation and export read the
same facts."""
import jax
import pytest

from cmjax import errors, evaluate, losses, methods, models, sharding
from cmjax.interop import runs
from configs import default, digits


def test_every_objective_has_a_row_and_every_section_holds_exactly_its_settings():
    config = default.get_config()
    assert methods.names() == sorted(losses.OBJECTIVES)
    for name in methods.names():
        # K is config.total_steps; MeanFlow's num_classes and velocity_head are config.model's
        accepted = set(losses.objective_settings(name)) - {"total_steps", "num_classes", "velocity_head"}
        assert set(config.method[name]) == accepted, name


def test_facts():
    # ECT starts from the teacher but never calls it: its step carries no teacher weights.
    assert [m for m in methods.names() if methods.get(m).needs_teacher] == ["cd", "scd"]
    assert [m for m in methods.names() if methods.get(m).keeps_target] == ["cd", "ct"]
    assert [m for m in methods.names() if methods.get(m).starts_from_teacher] == ["cd", "ect"]  # as the releases
    known = r"\['cd', 'ct', 'ect', 'edm', 'fm', 'ict', 'meanflow', 'scd', 'sct'\]"
    with pytest.raises(errors.ConfigError, match=r"'lcm'.*" + known):
        methods.get("lcm")


def test_settings_come_from_the_methods_own_section_and_switch_with_the_name():
    config = digits.get_config()
    s = methods.settings(config)
    assert (s["s1"], s["sigma_max"], s["total_steps"]) == (80, 10.0, 18000)  # the demo's iCT settings
    config.method.name = "edm"
    assert methods.settings(config) == {"sigma_data": 0.5, "p_mean": -1.2, "p_std": 1.2,
                                      "parameterization_kind": "edm"}
    methods.select(config, "cd", num_scales=40)
    assert methods.settings(config)["num_scales"] == 40 and methods.training_grid_size(config) == 40
    with pytest.raises(errors.ConfigError, match=r"no key\(s\) \['num_scale'\]"):
        methods.select(config, "cd", num_scale=40)


def test_ect_parameterisation_is_read_alike_by_evaluation_and_export():
    """The one fact, three readers: evaluate's sampler, export's scheduler check and the table agree (evaluate
    used to sample every ECT run with the EDM denoiser while export honoured `parameterization_kind`). ECT
    trains in EDM form and is sampled as its release evaluates it: the boundary scalings at σ_min = 0.003."""
    config = digits.get_config("smoke")
    config.method.name = "ect"
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
    module = models.get(config.model)
    for trained in ("edm", "consistency"):
        config.method.ect.parameterization_kind = trained
        assert methods.parameterization_kind(config) == trained
        sampler = methods.sampler_settings(config)
        assert (sampler["parameterization"], sampler["sigma_min"]) == (
            ("consistency", 0.003) if trained == "edm" else ("consistency", 0.002))
        evaluator = evaluate.Evaluator(config, module, mesh)
        assert (evaluator.kind, evaluator.sigma_min) == (sampler["parameterization"], sampler["sigma_min"])
        assert runs.consistency_parameterised(config)
    config.method.name = "ict"
    assert evaluate.Evaluator(config, module, mesh).kind == "consistency"
    config.method.name = "edm"
    assert evaluate.Evaluator(config, module, mesh).kind == "edm" and not runs.consistency_parameterised(config)


def test_config_defaults_equal_the_library_defaults():
    """configs/default.py writes every optimizer and data key out (configs import no cmjax); they must stay the
    library's defaults, and the recipes' plain σ constants EDM's."""
    from cmjax import optim, parameterization, schedules
    from cmjax.data import pipeline
    from configs import common

    config = default.get_config()
    assert config.optim.to_dict() == optim.default_config().to_dict()
    assert config.data.to_dict() == pipeline.default_config().to_dict()
    assert (common.SIGMA_MIN, common.SIGMA_MAX, common.RHO) == (
        parameterization.SIGMA_MIN, parameterization.SIGMA_MAX, schedules.RHO)


def test_a_flow_matching_run_is_read_as_a_flow_everywhere(tmp_path):
    """fm's one fact (parameterisation "flow"), read by evaluate's sampler, export's time-input note and the
    teacher check: a flow run samples as `flow_denoise`, unclipped, and is refused as a CD/sCD teacher (and as the
    start of a student of another kind) before anything compiles, with a message naming why and what to use."""
    from cmjax import parameterization, workdir

    config = digits.get_config("smoke")
    methods.select(config, "fm")
    assert methods.parameterization_kind(config) == parameterization.FLOW
    assert methods.settings(config) == {"time_distribution": "uniform", "p_mean": 0.0, "p_std": 1.0,
                                        "train_eps": 0.0}
    sampler = methods.sampler_settings(config)
    assert (sampler["parameterization"], sampler["clip"]) == ("flow", False)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
    assert evaluate.Evaluator(config, models.get(config.model), mesh).kind == "flow"
    assert not runs.consistency_parameterised(config) and runs.exported_parameterization(config) == "flow"
    assert "SiT's t = 1/(1 + σ)" in runs.time_input_description("flow")

    teacher_dir = tmp_path / "flow_teacher"
    teacher_dir.mkdir()
    workdir.write_config(config, str(teacher_dir))
    for student, extra in (("cd", {}), ("scd", {}), ("ect", {})):
        student_config = digits.get_config("smoke")
        methods.select(student_config, student, **extra)
        student_config.teacher.workdir = str(teacher_dir)
        with pytest.raises(errors.ConfigError, match=r"holds a 'fm' run.*flow-matching velocity.*method.name=edm"):
            workdir.check_teacher(student_config)
    fine_tune = digits.get_config("smoke")  # a flow run may start from a flow run's weights
    methods.select(fine_tune, "fm")
    fine_tune.teacher.workdir, fine_tune.teacher.init_student = str(teacher_dir), True
    workdir.check_teacher(fine_tune)
