"""The one table of method facts, and a run's method settings read from its config.

`config.method.name` selects a method; its settings live in their own section `config.method.<name>`
(`config.method.ict.s1`), so switching `--config.method.name=edm|cd|ct|ict|ect|sct|scd|meanflow|fm` on any recipe
runs that method with its own defaults. What a method *is* — whether it needs a teacher, keeps a target network θ⁻,
starts from the teacher's weights, which parameterisation its online network has, the Karras grid its
sampler's scheduler knows — is written once here and read by train, evaluate, interop, bench and demo_2d.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from cmjax import errors, losses, parameterization, schedules


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a method's release samples its few-step models (docs/fidelity.md): CM Algorithm 1 unless it says
    otherwise. `parameterization`/`sigma_min` (None: as trained) apply to a network trained in EDM form."""
    parameterization: str | None = None  # the form f is evaluated in; None: the training parameterisation
    sigma_min: float | None = None  # σ_min of that form's boundary scalings; None: the training σ_min
    # "cm": x0 + √(τ² − σmin²)·z, τ clipped to [σmin, σmax] (CM Alg. 1) | "plain": x0 + τ·z (ECT)
    renoise: str = "cm"
    clip: bool = True  # clip each denoised estimate to [−1, 1] (CM); False: only the uint8 quantisation clips


# ECT's release evaluates its EDM-trained network with the boundary scalings at its own σ_min = 0.003
# (locuslab/ect training/networks.py:684,709-711, eval mode) and renoises with x + t·z, unclipped
# (training/ct_training_loop.py:79-97).
ECT_SAMPLING = Sampling(parameterization="consistency", sigma_min=0.003, renoise="plain", clip=False)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    # The objective calls the teacher (config.teacher.workdir) in every step, so its parameters are arguments of
    # the compiled step. ECT only starts from the teacher: its step does not carry the teacher's weights.
    needs_teacher: bool
    keeps_target: bool  # a target EMA network θ⁻ updated with the objective's μ(k) (CM 2023); else sg(θ)
    # The student (its target and EMAs) begins as the teacher's weights unless config.teacher.init_student
    # says otherwise (`starts_from_teacher(config)`): CD in both CM releases, ECT.
    starts_from_teacher: bool
    # "edm": D(x, σ) with f(x, 0) = x (EDM and ECT's default); "consistency": CM App. C boundary scalings;
    # "setting": the objective's own `parameterization_kind` setting decides (ECT: edm | consistency; sCT/sCD:
    # trigflow | trigflow_edm, sCM's TrigFlow f as a function of σ, `parameterization.trigflow_denoise`);
    # "meanflow": an average velocity u(z, r, t); "flow": SiT's velocity v(x_t, t), read as D by
    # `parameterization.flow_denoise`.
    parameterization: str
    summary: str
    sampling: Sampling = Sampling()
    # Scalars the network is conditioned on: 1 = the noise level's time input [B]; MeanFlow 2 = (t, t − r), a
    # time input [B, 2] (models.sample_inputs shapes the init input by it; cmjax.models.layers.embed_times).
    time_inputs: int = 1


METHODS: dict[str, Method] = {m.name: m for m in (
    # EDM's `parameterization_kind` setting: "edm" (time input 250·ln σ) or "trigflow" (t = arctan(σ/σd), sCM's
    # TrigFlow diffusion model: the same denoiser D, the teacher an sCD student starts from).
    Method("edm", needs_teacher=False, keeps_target=False, starts_from_teacher=False, parameterization="setting",
           summary="EDM denoising score matching (the teacher of CD, ECT and sCD)"),
    # CD: openai/consistency_models scripts/cm_train.py:75-115 copies the teacher into the student, target and
    # EMAs; the CIFAR-10 JAX release's finetune=True (jcm/losses.py:136-142) does the same.
    Method("cd", needs_teacher=True, keeps_target=True, starts_from_teacher=True,
           parameterization="consistency", summary="consistency distillation (CM 2023)"),
    Method("ct", needs_teacher=False, keeps_target=True, starts_from_teacher=False,
           parameterization="consistency", summary="consistency training (CM 2023)"),
    Method("ict", needs_teacher=False, keeps_target=False, starts_from_teacher=False,
           parameterization="consistency", summary="improved consistency training (Song & Dhariwal 2023)"),
    Method("ect", needs_teacher=False, keeps_target=False, starts_from_teacher=True, parameterization="setting",
           summary="easy consistency tuning from an EDM model (Geng et al. 2024)", sampling=ECT_SAMPLING),
    # sCM (Lu & Song 2024): TrigFlow f(x_t, t) = cos t·x_t − sin t·σd·F; its `parameterization_kind` setting is
    # "trigflow" (c_noise(t) = t) or "trigflow_edm" (EDM's 250·ln σ; as a function of σ, f is then EDM's D with
    # the same network). Target sg(θ), no EMA target. sCD starts fresh unless config.teacher.init_student (its
    # teacher then trained with the student's time conditioning; losses.scd_loss, imagenet64_scd).
    Method("sct", needs_teacher=False, keeps_target=False, starts_from_teacher=False, parameterization="setting",
           summary="continuous-time consistency training, sCT (Lu & Song 2024)"),
    Method("scd", needs_teacher=True, keeps_target=False, starts_from_teacher=False, parameterization="setting",
           summary="continuous-time consistency distillation, sCD (Lu & Song 2024)"),
    # MeanFlow (Geng et al. 2025) and its improved form iMF (options of the same objective, losses.meanflow_loss):
    # the network is the average velocity u(z_t, r, t) of the flow-matching path, conditioned on (t, t − r);
    # sampled by its own sampler, z_r = z_t − (t − r)·u(z_t, r, t) from t = 1 (sampling.meanflow_sample).
    Method("meanflow", needs_teacher=False, keeps_target=False, starts_from_teacher=False,
           parameterization="meanflow", summary="MeanFlow / improved MeanFlow, average-velocity one-step flows "
           "(Geng et al. 2025)", sampling=Sampling(clip=False), time_inputs=2),
    # Flow matching as SiT trains it (Ma et al. 2024, willisma/SiT): the network is the velocity v(x_t, t) of the
    # linear interpolant x_t = t·x1 + (1 − t)·x0 (t = 0 noise, t = 1 data), conditioned on t; no target, no
    # teacher. Read as the EDM denoiser D(x_σ, σ) at t = 1/(1 + σ) (`parameterization.flow_denoise`), so the EDM
    # samplers solve its ODE; SiT's samplers never clip (transport/integrators.py), nor does cmjax's here.
    Method("fm", needs_teacher=False, keeps_target=False, starts_from_teacher=False, parameterization="flow",
           summary="flow matching on SiT's linear interpolant, velocity prediction (Ma et al. 2024)",
           sampling=Sampling(clip=False)),
)}
# Settings a method takes from elsewhere in the config rather than from its own section.
# MeanFlow's `num_classes` (label dropout and guidance need a class-conditional network) is config.model's.
# iMF's `velocity_head` (the auxiliary v-loss needs the network's v-head) is config.model's too.
_FROM_CONFIG = {"total_steps", "num_classes", "velocity_head"}


def names() -> list[str]:
    return sorted(METHODS)


def get(name: str) -> Method:
    if name not in METHODS:
        raise errors.ConfigError(f"Unknown config.method.name {name!r}; choose one of {names()}.")
    return METHODS[name]


def _section(config) -> Mapping[str, Any]:
    name = config.method.name
    get(name)
    section = config.method.get(name)
    return {} if section is None else dict(section)


def settings(config) -> dict[str, Any]:
    """Every setting of the run's objective: the objective's defaults, updated by `config.method.<name>`;
    `total_steps` (K of the curricula) is `config.total_steps`. A key the objective lacks is an error."""
    name = config.method.name
    section = _section(config)
    accepted = losses.objective_settings(name)
    unknown = sorted(set(section) - (set(accepted) - _FROM_CONFIG))
    if unknown:
        raise errors.ConfigError(
            f"config.method.{name} has key(s) {unknown} that method {name!r} does not take; its settings are "
            f"{sorted(set(accepted) - _FROM_CONFIG)}.")
    result = {**accepted, **section}
    if "total_steps" in accepted:
        result["total_steps"] = int(config.total_steps)
    if "velocity_head" in accepted:
        result["velocity_head"] = bool(config.model.get("velocity_head", False))
    if "num_classes" in accepted:
        result["num_classes"] = int(config.model.get("num_classes") or 0)
        if not result["num_classes"] and result.get("guidance", "none") != "none":
            raise errors.ConfigError(
                f"config.method.{name}.guidance={result['guidance']!r} needs a class-conditional model "
                "(config.model.num_classes > 0); use guidance='none'.")
        drops = result.get("class_dropout", 0) > 0 or result.get("guidance", "none") != "none"
        if result["num_classes"] and drops and not config.model.get("null_label"):
            raise errors.ConfigError(
                f"Method {name!r} drops class labels to the 'no class' label {result['num_classes']} (class_dropout="
                f"{result.get('class_dropout')}, guidance={result.get('guidance')!r}), which the network lacks: set "
                f"--config.model.null_label=True, or config.method.{name}.class_dropout=0 and guidance='none'.")
    return result


def objective_from_config(config) -> Callable:
    """The objective `config.method.name` with its settings bound; settings the network cannot serve (sCM's
    adaptive weight without a log-variance head, guidance without class labels) are errors here, before a run
    directory is touched."""
    s = settings(config)
    name = config.method.name
    if str(s.get("weighting", "")).startswith("adaptive") and not config.model.get("logvar_head"):
        raise errors.ConfigError(
            f"config.method.{name}.weighting={s['weighting']!r} learns the weight w(t) with the network's "
            f"log-variance head, and config.model ({config.model.name!r}) has none: set "
            "config.model.logvar_head=True, or choose weighting 'none' or 'prior'.")
    if float(s.get("guidance_scale", 1.0)) != 1.0 and not config.model.get("num_classes"):
        raise errors.ConfigError(
            f"config.method.{name}.guidance_scale={s['guidance_scale']} guides a class-conditional teacher, and "
            "this run is unconditional (config.model.num_classes = 0): set guidance_scale=1.0.")
    imf_sampling_guidance(config)  # an iMF run's sampling guidance is checked before anything runs
    return losses.make_objective(name, **s)


def parameterization_of(name: str, method_settings: Mapping[str, Any]) -> str:
    """"edm", "consistency", "trigflow", "trigflow_edm", "meanflow" or "flow": how method `name`'s online network
    with these settings turns F into a clean-image estimate (ECT and sCT/sCD: their `parameterization_kind`
    setting)."""
    method = get(name)
    if method.parameterization == "setting":
        return method_settings.get("parameterization_kind",
                                   losses.objective_settings(name)["parameterization_kind"])
    return method.parameterization


def time_inputs(name: str, method_settings: Mapping[str, Any] | None = None) -> int:
    """How many scalars method `name`'s network is conditioned on: 1 (a time or noise level), MeanFlow's 2
    ((t, t − r)), or 5 with iMF's guidance conditioning (`guidance="conditioned"` in `method_settings`, the
    method's config section: (t, t − r, 1 − 1/ω, t_min, t_max), `parameterization.meanflow_time_input`)."""
    count = get(name).time_inputs
    if method_settings is not None and method_settings.get("guidance") == "conditioned":
        count += 3
    return count


def is_meanflow(config) -> bool:
    """Whether the run's network is a MeanFlow average velocity, sampled by `sampling.meanflow_sample`."""
    return parameterization_kind(config) == parameterization.MEANFLOW


def parameterization_kind(config) -> str:
    """The run's `parameterization_of` its method and settings (read by evaluate and interop alike)."""
    return parameterization_of(config.method.name, settings(config))


def starts_from_teacher(config) -> bool:
    """Whether the run's student (online network, target and EMAs) starts from the teacher's weights:
    `config.teacher.init_student` when set (True/False), else the method's fact (CD, ECT: yes)."""
    chosen = config.teacher.get("init_student")
    return get(config.method.name).starts_from_teacher if chosen is None else bool(chosen)


def uses_teacher(config) -> bool:
    """Whether the run reads a teacher workdir: to distil from it (CD, ECT) or to start from it (e.g. CT
    with `config.teacher.init_student=True`, the CM release's ImageNet-64/LSUN CT command)."""
    return get(config.method.name).needs_teacher or starts_from_teacher(config)


def sampler_settings(config) -> dict[str, Any]:
    """How the run's few-step samples are drawn (evaluate, interop): {"parameterization", "sigma_min",
    "sigma_max", "sigma_data", "renoise", "clip"}. The run's own parameterisation and σ range, except that a
    network trained in EDM form by a method whose release evaluates it otherwise is sampled as that release
    does (ECT: the boundary scalings at σ_min = 0.003, x + τ·z, no clipping between steps)."""
    sampling = get(config.method.name).sampling
    kind, noise = parameterization_kind(config), noise_range(config)
    result = {"parameterization": kind, "sigma_min": noise["sigma_min"], "sigma_max": noise["sigma_max"],
              "sigma_data": noise["sigma_data"], "renoise": sampling.renoise, "clip": sampling.clip,
              "guidance": imf_sampling_guidance(config)}
    if kind == "edm" and sampling.parameterization is not None:
        result["parameterization"] = sampling.parameterization
        if sampling.sigma_min is not None:
            result["sigma_min"] = float(sampling.sigma_min)
    return result


def imf_sampling_guidance(config) -> tuple[float, float, float] | None:
    """(ω, t_min, t_max) an iMF network is sampled with (config.sample.guidance_scale, guidance_interval), for a
    run trained with guidance as conditioning (`config.method.meanflow.guidance = "conditioned"`); else None."""
    if config.method.name != "meanflow" or _section(config).get("guidance") != "conditioned":
        return None
    omega = float(config.sample.get("guidance_scale", 1.0))
    interval = tuple(float(v) for v in config.sample.get("guidance_interval", (0.0, 1.0)))
    if omega < 1.0 or len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
        raise errors.ConfigError(
            f"config.sample.guidance_scale={omega} / guidance_interval={interval} are not an iMF guidance: the "
            "scale is ω ≥ 1 (1: unguided) and the interval two times 0 ≤ t_min ≤ t_max ≤ 1, e.g. "
            "--config.sample.guidance_scale=8.0 --config.sample.guidance_interval='(0.4, 0.65)'.")
    return (omega, *interval)


def noise_range(config) -> dict[str, float]:
    """σ_min, σ_max, σ_data and ρ the run trained with (the objective's settings, else EDM's)."""
    s = settings(config)
    return {
        "sigma_min": float(s.get("sigma_min", parameterization.SIGMA_MIN)),
        "sigma_max": float(s.get("sigma_max", parameterization.SIGMA_MAX)),
        "sigma_data": float(s.get("sigma_data", parameterization.SIGMA_DATA)),
        "rho": float(s.get("rho", schedules.RHO)),
    }


def training_grid_size(config) -> int:
    """The Karras grid the run trained on, as a scheduler's `num_train_timesteps`: cd/ct their largest grid
    (`num_scales`, or s1 + 1 with a curriculum), ict s1 + 1; others 40, openai's default `--steps`."""
    s = settings(config)
    if config.method.name in ("cd", "ct"):
        return losses.max_num_scales(curriculum=s["curriculum"], num_scales=s["num_scales"], s1=s["s1"])
    if config.method.name == "ict":
        return int(s["s1"]) + 1
    return 40


def distance_name(config) -> str | None:
    """The run's distance (`config.method.<name>.distance`), or None for a method without one."""
    return settings(config).get("distance")


def select(config, name: str, **method_settings) -> None:
    """Switches `config` (a ConfigDict from configs/) to method `name`, updating `config.method.<name>` with
    `method_settings` (a key the section lacks is an error); for scripts and tests that build configs."""
    get(name)
    config.method.name = name
    section = config.method[name]
    unknown = sorted(set(method_settings) - set(section))
    if unknown:
        raise errors.ConfigError(f"config.method.{name} has no key(s) {unknown}; it has {sorted(section)}.")
    section.update(method_settings)
