"""A run directory: its `config.json`, `metrics.jsonl` and checkpoints, read back as parameters.

`workdir/config.json` is the config the run trained with (a later run that uses it as teacher, `--mode=sample`
or export read it back); `workdir/metrics.jsonl` one JSON object per log step; `workdir/checkpoints/<step>/`
the Orbax checkpoints (`cmjax.checkpointing`). `load_params` restores one EMA copy of a checkpoint onto any
mesh from the abstract train state the config builds.
"""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import ml_collections

from cmjax import checkpointing, errors, methods, models, optim, parameterization, sharding, train_state

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
COMPILATION_CACHE = "jax_cache"  # workdir/jax_cache, as the launch scripts name it
INIT_ONLINE_FROM = ("ema", "online")  # config.teacher.init_online_from


def enable_compilation_cache(config, workdir: str) -> str | None:
    """Turns on JAX's persistent compilation cache for this process, so a restarted or preempted run loads its
    compiled step and samplers instead of compiling them again. `config.compilation_cache_dir`: "workdir"
    (default: WORKDIR/jax_cache, local or gs://), a directory of its own (one cache can serve many runs), or ""
    (off). The environment variable JAX_COMPILATION_CACHE_DIR, where set (the launch scripts set it), wins.
    Returns the directory in use, or None."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]  # JAX reads it itself
    setting = config.get("compilation_cache_dir", "workdir")
    if not setting:
        return None
    path = os.path.join(workdir, COMPILATION_CACHE) if setting == "workdir" else setting
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def compilation_cache_note() -> str:
    path = jax.config.jax_compilation_cache_dir
    return f"compilation cache {path}" if path else "no compilation cache"


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a cmjax run wrote to `workdir/config.json`."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise errors.MissingFileError(f"{workdir!r} is not a cmjax workdir: it has no {CONFIG_FILE}.")
    return ml_collections.ConfigDict(checkpointing.read_json(path, fix=(
        "It is the config that run trained with, written whenever its training starts: rerun its training command "
        "to write it again (a finished run resumes, evaluates and exits), or restore the file from a copy.")))


def write_config(config, workdir: str) -> None:
    """Saves the run's config as JSON (process 0): a later run that uses this one as teacher reads it back."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, CONFIG_FILE)
        with open(path + ".tmp", "w") as f:  # then renamed: a full disk cannot leave a truncated config.json
            f.write(config.to_json_best_effort(indent=2))
        os.replace(path + ".tmp", path)


def truncate_metrics_log(jsonl_path: str, last_step: int) -> None:
    """Drops `metrics.jsonl` rows logged after `last_step`: a run killed after its last checkpoint logged
    steps it will now repeat, and the log should hold each step once."""
    if not os.path.exists(jsonl_path):
        return
    with open(jsonl_path) as f:
        lines = f.readlines()

    def logged_by_then(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= last_step
        except (ValueError, KeyError):  # a row cut off when the process was killed mid-write
            return False

    kept = [line for line in lines if line.endswith("\n") and logged_by_then(line)]
    if len(kept) != len(lines):
        with open(jsonl_path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(jsonl_path + ".tmp", jsonl_path)  # atomic: a crash here leaves the old or the new log


def abstract_train_state(config, module, mesh):
    """Shapes of the train state (nothing allocated) and the shardings it lives with on `mesh`."""
    optimizer, _ = optim.make_optimizer(config.optim, config.total_steps)
    keep_target = methods.get(config.method.name).keeps_target

    def create(key):
        return train_state.create(models.init_params(module, config, key), optimizer, config.ema_rates,
                                  keep_target)

    key = jax.random.key(config.seed)
    abstract = jax.eval_shape(create, key)
    param_specs = sharding.param_partition_specs(models.boxed_param_shapes(module, config, key), mesh)
    return abstract, sharding.state_shardings(abstract, mesh, param_specs=param_specs)


def with_shardings(abstract, shardings):
    """The abstract tree with each leaf's sharding attached (what Orbax restores onto)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def load_params(workdir: str, mesh, *, step: int | None = None, ema_rate: float | str | None = None,
                config: ml_collections.ConfigDict | None = None):
    """(module, params, config, step) of a cmjax run: one EMA copy of a checkpoint, sharded for `mesh`.

    `config` defaults to the run's own `config.json`; `step` to the newest checkpoint; `ema_rate` to the
    config's first EMA rate (`"online"` gives the raw online parameters).
    """
    config = read_run_config(workdir) if config is None else config
    module = models.get(config.model)
    state, restored_step = _restore_state(workdir, config, module, mesh, step)
    return module, _copy_of(state, config, ema_rate, workdir), config, restored_step


def _restore_state(workdir: str, config, module, mesh, step: int | None):
    abstract_state, shardings = abstract_train_state(config, module, mesh)
    with checkpointing.Checkpointer(workdir, save_every=1, keep=1, read_only=True) as reader:
        restored = reader.restore(with_shardings(abstract_state, shardings), step=step)
    if restored is None:
        raise errors.MissingFileError(f"Workdir {workdir!r} holds no checkpoint.")
    return restored


def _copy_of(state, config, ema_rate, workdir: str):
    """The online parameters ("online") or the EMA copy `ema_rate` (None/"": the config's first rate)."""
    if ema_rate in ("online", "params"):
        return state.params
    rate = train_state.ema_key(config.ema_rates[0] if ema_rate in (None, "") else float(ema_rate))
    if rate not in state.ema:
        raise errors.ConfigError(f"EMA rate {ema_rate!r} is not kept by the run in {workdir!r}; it keeps "
                                 f"{sorted(state.ema)} or 'online'.")
    return state.ema[rate]


def check_teacher(config) -> None:
    """Fails fast, before anything compiles, when a method that needs a teacher has none."""
    if not methods.uses_teacher(config):
        return
    if config.teacher.init_online_from not in INIT_ONLINE_FROM:
        raise errors.ConfigError(f"config.teacher.init_online_from={config.teacher.init_online_from!r}; choose "
                                 f"one of {list(INIT_ONLINE_FROM)}.")
    teacher = config.teacher.workdir
    if not teacher or not os.path.exists(os.path.join(teacher, CONFIG_FILE)):
        needs = ("needs a teacher" if methods.get(config.method.name).needs_teacher else
                 "starts from a teacher (config.teacher.init_student)")
        raise errors.ConfigError(
            f"Method {config.method.name!r} {needs}, but config.teacher.workdir={teacher!r} is not a "
            f"cmjax workdir (no {CONFIG_FILE}); train an EDM teacher first (--config.method.name=edm) and pass "
            "--config.teacher.workdir=THAT_WORKDIR.")
    teacher_config = read_run_config(teacher)
    _check_teacher_kind(config, teacher_config)
    if methods.starts_from_teacher(config):
        _check_same_function(config, teacher_config)


def _check_teacher_kind(config, teacher_config) -> None:
    """A distilling method reads its teacher as an EDM-form denoiser (`parameterization.teacher_time_input`), and
    a student that starts from a velocity network (MeanFlow, flow matching) would start from another function
    unless it is one of the same kind: both fail here, before anything compiles, naming what to use."""
    teacher_kind = methods.parameterization_kind(teacher_config)
    if teacher_kind in parameterization.TEACHER_KINDS:
        return
    if methods.get(config.method.name).needs_teacher or methods.parameterization_kind(config) != teacher_kind:
        raise errors.ConfigError(f"config.teacher.workdir={config.teacher.workdir!r} holds a "
                                 f"{teacher_config.method.name!r} run that method {config.method.name!r} cannot "
                                 f"use. {parameterization.teacher_kind_error(teacher_kind)}")


def load_teacher(config, mesh):
    """(module, params, its config) of the run's teacher (`config.teacher`: its workdir's newest checkpoint,
    EMA copy `config.teacher.ema_rate`, "" for the teacher run's first rate), sharded for `mesh`."""
    module, params, teacher_config, _ = load_params(config.teacher.workdir, mesh,
                                                    ema_rate=config.teacher.ema_rate or None)
    return module, params, teacher_config


# The teacher kind an sCM student must start from to begin as the teacher's own denoiser: its raw network is read
# with the same time conditioning (parameterization.py, TrigFlow section).
_SCM_TEACHER_KIND = {"trigflow": "trigflow", "trigflow_edm": "edm"}
_SCM_STUDENT_KIND = {teacher: student for student, teacher in _SCM_TEACHER_KIND.items()}


def _check_same_function(config, teacher_config) -> None:
    """An sCT/sCD student starting from its teacher must read the teacher's weights with the teacher's own time
    conditioning; otherwise it would start from an unrelated function."""
    kind = methods.parameterization_kind(config)
    if kind not in _SCM_TEACHER_KIND:
        return
    teacher_kind = methods.parameterization_kind(teacher_config)
    student_kind = _SCM_STUDENT_KIND.get(teacher_kind, "trigflow")
    if teacher_kind != _SCM_TEACHER_KIND[kind]:
        raise errors.ConfigError(
            f"The {config.method.name} student (parameterization_kind {kind!r}) starts from the teacher's weights "
            f"(config.teacher.init_student), but the teacher in {config.teacher.workdir!r} was trained with "
            f"parameterization_kind {teacher_kind!r}, another time conditioning: train the teacher with "
            f"--config.method.edm.parameterization_kind={_SCM_TEACHER_KIND[kind]}, or set "
            f"--config.method.{config.method.name}.parameterization_kind={student_kind}, or "
            "--config.teacher.init_student=False.")


def student_start(config, mesh, student_module):
    """(online, ema) the student starts from when `methods.starts_from_teacher(config)`: the teacher's EMA copy
    `config.teacher.ema_rate` for the EMAs, and for the online network (and target) that copy or, with
    `config.teacher.init_online_from="online"`, the teacher's online parameters (one restore of the teacher's
    newest checkpoint). A student network whose parameters differ in shape from the teacher's is an error."""
    teacher_config = read_run_config(config.teacher.workdir)
    _check_same_function(config, teacher_config)
    module = models.get(teacher_config.model)
    state, _ = _restore_state(config.teacher.workdir, teacher_config, module, mesh, None)
    ema = _copy_of(state, teacher_config, config.teacher.ema_rate or None, config.teacher.workdir)
    online = state.params if config.teacher.init_online_from == "online" else ema
    expected = jax.eval_shape(lambda k: models.init_params(student_module, config, k), jax.random.key(0))
    heads = sorted(k for k in expected if k not in online and models.is_auxiliary_head(k))
    if heads:  # the student's training-only heads (sCM's log-variance head) start fresh, as FastGen's sCD
        fresh = jax.jit(lambda k: models.init_params(student_module, config, k))(jax.random.key(config.seed))
        online, ema = ({**tree, **{k: fresh[k] for k in heads}} for tree in (online, ema))
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), nn.meta.unbox(tree))  # noqa: E731
    if shapes(expected) != shapes(online):
        raise errors.ConfigError(
            f"The student starts from the teacher's weights (config.teacher.init_student), but its network "
            f"(config.model.name={config.model.name!r}) has other parameters than the teacher's in "
            f"{config.teacher.workdir!r} ({teacher_config.model.name!r}); use the teacher's network or set "
            "--config.teacher.init_student=False.")
    return online, ema
