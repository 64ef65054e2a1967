"""The training CLI end to end, in subprocesses: preemption and restart, another device count, two processes, errors.

Every case runs `python -m cmjax.main` as a user would. Each training subprocess compiles the train step, so the
runs are few and shared between tests (module-scoped fixtures), the network is tiny (one resolution, no
attention), and JAX's persistent compilation cache (a directory of this module's) lets a run reuse what an
earlier run with the same device layout compiled (verified on CPU: a repeated 8-device run drops from about
70 s to 24 s). Runs that compile different programs start together (one compile keeps one core busy). A hang
fails through the subprocess timeouts. The whole module: 5.5-8 minutes on 2 cores shared at load 5-7.
"""
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.multiprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
PREEMPT_AFTER = 3  # SIGTERM once metrics.jsonl shows this step
RUN_TIMEOUT = 600  # seconds for one training subprocess (20-370 s seen on 2 cores under load 5-7)
ERROR_TIMEOUT = 180
# configs/digits.py:smoke (the tiny MLP, batch 16, checkpoint every 3 steps, no periodic evaluation).
TRAIN_ARGS = [f"--config.total_steps={STEPS}", "--config.log_every=1", "--config.ckpt_every=3"]
# Fields of a metrics.jsonl row that are wall-clock measurements, not results.
TIMING_KEYS = ("steps_per_sec", "images_per_sec", "images_per_sec_per_device")


# ---------------------------------------------------------------------------------------------------------
# Helpers.


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A prepared TFDS directory and a compilation cache directory shared by this module's subprocesses."""
    from cmjax.data import digits

    root = tmp_path_factory.mktemp("train_processes")
    data_dir = str(root / "tfds")
    digits.prepare(data_dir)  # once here, not concurrently in two processes
    # Every run of the session reads one copy of the config, even if configs/digits.py is edited meanwhile.
    config_file = str(root / "digits_config.py")
    shutil.copy(os.path.join(ROOT, "configs", "digits.py"), config_file)
    return {"data_dir": data_dir, "cache_dir": str(root / "jax_cache"), "root": root, "config": config_file}


def subprocess_env(shared, devices, **extra):
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env.update(
        XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        JAX_COMPILATION_CACHE_DIR=shared["cache_dir"],
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]),
        **extra,
    )
    return env


def train_command(shared, workdir, *extra):
    return [sys.executable, "-m", "cmjax.main", f"--config={shared['config']}:smoke", *TRAIN_ARGS,
            f"--config.data.data_dir={shared['data_dir']}", f"--workdir={workdir}", *extra]


class Run:
    """One subprocess with stdout and stderr in files (no pipe to fill); `finish` waits, kills on timeout."""

    def __init__(self, command, env, log_path, timeout=RUN_TIMEOUT):
        self.log_path, self.timeout, self.started = str(log_path), timeout, time.time()
        self._out, self._err = open(self.log_path + ".out", "wb"), open(self.log_path + ".err", "wb")
        self.process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=self._out, stderr=self._err)

    def finish(self):
        try:
            self.process.wait(timeout=max(1.0, self.started + self.timeout - time.time()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"{self.log_path}: no exit within {self.timeout} s; log tail:\n{self.log[-3000:]}")
        finally:
            self._out.close()
            self._err.close()
        self.seconds = time.time() - self.started
        return self

    @property
    def stderr(self):
        with open(self.log_path + ".err", errors="replace") as f:
            return f.read()

    @property
    def log(self):
        with open(self.log_path + ".out", errors="replace") as f:
            return f.read() + self.stderr

    @property
    def returncode(self):
        return self.process.returncode

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def finished_ok(run):
    run.finish()
    assert run.returncode == 0, f"exit {run.returncode}; log tail:\n{run.log[-4000:]}"
    return run


def read_metrics(workdir):
    """Complete rows of metrics.jsonl (a line being written is left out)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f.read().splitlines(keepends=True) if line.endswith("\n")]


def results(row):
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def checkpoint_steps(workdir):
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    return sorted(int(n) for n in names if n.isdigit())


def logged_scalars(log):
    """{step: {"loss": value string}} from the loop's progress lines ("step 3/8 (37.5%)  loss 5.1803  ...")."""
    return {int(step): {"loss": loss} for step, loss in re.findall(r"\] step (\d+)/\d+ \S+  loss (\S+)  ", log)}


# ---------------------------------------------------------------------------------------------------------
# Shared runs.


def selected(request, fragment):
    """Whether a test whose id holds `fragment` runs in this session (so its subprocesses may start early)."""
    return any(fragment in item.nodeid for item in request.session.items)


@pytest.fixture(scope="module")
def uninterrupted(shared, request):
    """STEPS steps on one process with 8 devices, never stopped (its compile fills the cache for the next runs).

    The 2-process run and the error cases compile other programs (or nothing): they start first and run
    alongside, since a compile keeps one core busy and the machine has two.
    """
    for fragment, fixture in (("two_processes", "two_processes_started"), ("config_error", "error_runs_started")):
        if selected(request, fragment):
            request.getfixturevalue(fixture)
    workdir = str(shared["root"] / "uninterrupted")
    run = finished_ok(Run(train_command(shared, workdir), subprocess_env(shared, 8), shared["root"] / "uninterrupted"))
    return {"workdir": workdir, "rows": read_metrics(workdir), "run": run}


@pytest.fixture(scope="module")
def preempted(shared, uninterrupted):
    """The same run, sent SIGTERM once it logged step PREEMPT_AFTER; a copy of its workdir as it was left."""
    workdir = str(shared["root"] / "preempted")
    run = Run(train_command(shared, workdir), subprocess_env(shared, 8), shared["root"] / "preempted")
    try:
        while not any(row["step"] >= PREEMPT_AFTER for row in read_metrics(workdir)):
            assert run.process.poll() is None, f"exit {run.returncode} before step {PREEMPT_AFTER}:\n{run.log[-3000:]}"
            assert time.time() - run.started < RUN_TIMEOUT, f"no step {PREEMPT_AFTER} in time:\n{run.log[-3000:]}"
            time.sleep(0.02)
        run.process.send_signal(signal.SIGTERM)
        run.finish()
    finally:
        run.kill()
    snapshot = str(shared["root"] / "preempted_snapshot")
    shutil.copytree(workdir, snapshot)
    return {"workdir": workdir, "snapshot": snapshot, "run": run, "rows": read_metrics(workdir)}


@pytest.fixture(scope="module")
def four_devices_started(shared, preempted):
    """Resumes a copy of the preempted 8-device run's workdir in a process with 4 devices."""
    run = Run(train_command(shared, preempted["snapshot"], "--config.mesh.data=-1"), subprocess_env(shared, 4),
              shared["root"] / "four_devices")
    yield run
    run.kill()


@pytest.fixture(scope="module")
def restarted(shared, preempted, request):
    """The preempted run restarted with its command (the 4-device resume, which compiles, runs alongside)."""
    if selected(request, "four_devices"):
        request.getfixturevalue("four_devices_started")
    run = finished_ok(Run(train_command(shared, preempted["workdir"]), subprocess_env(shared, 8),
                          shared["root"] / "restart"))
    return {"run": run, "rows": read_metrics(preempted["workdir"])}


# ---------------------------------------------------------------------------------------------------------
# 1. Preemption, then a restart with the same command, gives the uninterrupted run's results bit for bit.


def test_uninterrupted_run_logs_every_step_and_checkpoints(uninterrupted):
    rows = uninterrupted["rows"]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(row["loss"]) for row in rows)
    assert checkpoint_steps(uninterrupted["workdir"]) == [3, 6, STEPS]


def test_sigterm_saves_the_current_step_and_exits_zero(preempted):
    run, rows = preempted["run"], preempted["rows"]
    assert run.returncode == 0, f"exit {run.returncode}; log tail:\n{run.log[-4000:]}"
    stop = rows[-1]["step"]
    assert PREEMPT_AFTER <= stop < STEPS, f"stopped at {stop}: the signal came too late to test anything"
    assert [row["step"] for row in rows] == list(range(1, stop + 1))
    assert f"Preempted: saved step {stop}, exiting." in run.log
    assert checkpoint_steps(preempted["workdir"])[-1] == stop  # the preempted step's checkpoint, complete


def test_restart_after_preemption_is_bit_identical(uninterrupted, preempted, restarted):
    stop, workdir = preempted["rows"][-1]["step"], preempted["workdir"]
    assert f"Resumed from step {stop} in {workdir}." in restarted["run"].log
    rows = restarted["rows"]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))  # the restart continues at stop + 1
    expected = uninterrupted["rows"]
    # Exactly equal JSON floats: loss, grad norm, noise levels, curriculum, learning rate, skipped steps.
    assert [row["loss"] for row in rows[stop:]] == [row["loss"] for row in expected[stop:]]
    assert [results(row) for row in rows] == [results(row) for row in expected]
    assert checkpoint_steps(workdir)[-1] == STEPS


# ---------------------------------------------------------------------------------------------------------
# 2. A checkpoint written on 8 devices resumes on 4.


def test_resume_on_four_devices_from_an_eight_device_checkpoint(uninterrupted, preempted, four_devices_started):
    stop = preempted["rows"][-1]["step"]
    workdir = preempted["snapshot"]  # as the 8-device run left it: checkpoint `stop`, metrics up to `stop`
    run = finished_ok(four_devices_started)
    assert f"Resumed from step {stop} in {workdir}." in run.log
    assert f"from step {stop} to {STEPS} on 4 devices" in run.log
    rows = read_metrics(workdir)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert checkpoint_steps(workdir)[-1] == STEPS
    # Same data stream and noise; only the order of the reductions over devices differs (seen: 1e-7 relative).
    for row, reference in zip(rows[stop:], uninterrupted["rows"][stop:]):
        assert row["num_scales"] == reference["num_scales"], row["step"]
        for key in ("loss", "mean_sigma", "grad_norm"):
            assert row[key] == pytest.approx(reference[key], rel=1e-5), (row["step"], key)


# ---------------------------------------------------------------------------------------------------------
# 3. Two processes x 4 devices over 127.0.0.1.


@pytest.fixture(scope="module")
def two_processes_started(shared):
    workdir = str(shared["root"] / "two_processes")
    port = free_port()
    runs = [Run(train_command(shared, workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                              f"--process_id={i}"),
                subprocess_env(shared, 4), shared["root"] / f"two_processes_{i}")
            for i in range(2)]
    yield workdir, runs
    for run in runs:
        run.kill()


@pytest.fixture(scope="module")
def two_processes(two_processes_started):
    workdir, runs = two_processes_started
    for run in runs:
        run.finish()
    return {"workdir": workdir, "runs": runs, "rows": read_metrics(workdir)}


def test_two_processes_train_and_agree(two_processes, uninterrupted):
    runs, rows = two_processes["runs"], two_processes["rows"]
    for i, run in enumerate(runs):
        assert run.returncode == 0, f"process {i} exit {run.returncode}; log tail:\n{run.log[-4000:]}"
        assert f"JAX process {i}/2, 4 local / 8 global devices." in run.log
    # Process 0 alone writes metrics.jsonl: one row per step, not two.
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(row["loss"]) for row in rows)
    logged = [logged_scalars(run.log) for run in runs]
    for step, row in enumerate(rows, start=1):
        assert logged[0][step]["loss"] == logged[1][step]["loss"], step  # both processes saw the same loss
        assert float(logged[0][step]["loss"]) == pytest.approx(row["loss"], rel=1e-4)  # printed to 5 digits
    # Every process reads its own half of the split, so the batches, and hence the losses, differ from the
    # 1-process run's; the noise levels and curriculum depend only on (seed, step) and agree.
    reference = uninterrupted["rows"]
    assert [r["num_scales"] for r in rows] == [r["num_scales"] for r in reference]
    assert [r["mean_sigma"] for r in rows] == pytest.approx([r["mean_sigma"] for r in reference], rel=1e-6)
    assert checkpoint_steps(two_processes["workdir"]) == [3, 6, STEPS]
    data_files = sorted(os.listdir(os.path.join(two_processes["workdir"], "checkpoints", str(STEPS), "data")))
    assert [f for f in data_files if f.startswith("data_process")] == [
        "data_process_00000-of-00002.tfdata", "data_process_00001-of-00002.tfdata"]


# ---------------------------------------------------------------------------------------------------------
# 4. Config errors through the CLI: non-zero exit, a message naming the value, before anything compiles.

ERROR_CASES = {
    "unknown_key": (["--config.not_a_key=1"], ["not_a_key"]),
    "misspelt_model_key": (["--config.model.model_chanels=32"], ["model_chanels"]),
    "batch_not_divisible": (["--config.batch_size=12"], ["12", "8 devices"]),
    "cd_without_teacher": (["--config.method.name=cd"], ["config.teacher.workdir"]),
}


@pytest.fixture(scope="module")
def error_runs_started(shared):
    """All error cases at once (each only imports and fails); JAX logs every compilation it does."""
    runs = {name: Run(train_command(shared, shared["root"] / f"error_{name}", *args),
                      subprocess_env(shared, 8, JAX_LOG_COMPILES="1"), shared["root"] / f"error_{name}",
                      timeout=ERROR_TIMEOUT)
            for name, (args, _) in ERROR_CASES.items()}
    yield runs
    for run in runs.values():
        run.kill()


@pytest.fixture(scope="module")
def error_runs(error_runs_started):
    for run in error_runs_started.values():
        run.finish()
    return error_runs_started


@pytest.mark.parametrize("name", [
    "unknown_key", "misspelt_model_key", "batch_not_divisible",
    "cd_without_teacher",
])
def test_config_error_exits_nonzero_naming_the_value_before_compiling(error_runs, name):
    run, (_, expected) = error_runs[name], ERROR_CASES[name]
    stderr = run.stderr
    assert run.returncode not in (0, None), stderr[-3000:]
    for text in expected:
        assert text in stderr, f"{text!r} not in stderr:\n{stderr[-3000:]}"
    # Nothing of the model was compiled (state creation, train step) and no checkpoint was started.
    compiled = re.findall(r"Finished XLA compilation of (\S+)", stderr)
    assert not [c for c in compiled if "create_state" in c or "step_fn" in c], compiled
    assert "Training ict/" not in stderr
    assert not os.path.exists(os.path.join(run.log_path, "checkpoints"))  # the log path is the workdir's
