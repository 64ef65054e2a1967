"""Storage faults: damaged checkpoints, failed writes, unwritable workdirs, a second run, unfinished saves.

Part 1 checks `cmjax.checkpointing` and `cmjax.workdir_lock` in process, on a small sharded state (the default
tier; its two-process case is in the second). Part 2 (the second tier, `make test-slow`) runs the CLI as a
user would (`configs/cifar10_ict.py:smoke`, 12 steps, checkpoints 4, 8, 12): every fault gives its message,
and every resume from the checkpoints left intact gives the uninterrupted run's losses bit for bit. The CLI
runs are few, started side by side in two phases and shared by the tests (module fixtures), and reuse each
other's compilations (a persistent compilation cache of this module's). Faults that a test cannot cause for
real (a disk filling up during a save, a read-only mount) are injected by tests/_storage_fault_cli.py around
the real CLI.
"""
import errno
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cmjax import checkpointing, sharding, workdir_lock
from cmjax import workdir as workdir_lib
from cmjax.errors import MissingFileError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _storage_fault_cli as fault_cli  # noqa: E402

# When one TensorStore read of a damaged checkpoint fails, Orbax's event loop closes while the step's other reads
# are in flight; their completions then report "Event loop is closed" as unraisable exceptions. Harmless noise.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


# ---------------------------------------------------------------------------------------------------------
# Part 1: in process.


class Position:
    """A stand-in data iterator whose state is its position."""

    def __init__(self, position=0):
        self.position = position

    def get_state(self) -> bytes:
        return f"position={self.position}".encode()

    def set_state(self, state: bytes) -> None:
        if not state.startswith(b"position="):
            raise ValueError("Not a position (bad header).")
        self.position = int(state.split(b"=")[1])


@pytest.fixture(scope="module")
def mesh8():
    return sharding.make_mesh({"data": 8, "fsdp": 1})


def state_at(mesh, step):
    """A train-state-like tree whose every value depends on `step`: sharded params, Adam moments, a step."""
    params = {"kernel": jax.device_put(jnp.arange(128.0).reshape(16, 8) + step, NamedSharding(mesh, P("data"))),
              "bias": jax.device_put(jnp.linspace(-1.0, 1.0, 8) * step, NamedSharding(mesh, P()))}
    tx = optax.adam(1e-2)
    _, opt_state = tx.update(jax.tree.map(jnp.cos, params), tx.init(params), params)
    return {"params": params, "opt_state": opt_state, "step": jnp.asarray(step, jnp.int32)}


def abstract_of(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def assert_same_values(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@pytest.fixture
def checkpointers():
    opened = []

    def open_checkpointer(workdir, **kwargs):
        opened.append(checkpointing.Checkpointer(str(workdir), **{"save_every": 4, "keep": 5, **kwargs}))
        return opened[-1]

    yield open_checkpointer
    for checkpointer in reversed(opened):
        try:
            checkpointer.close()
        except checkpointing.CheckpointWriteError:
            pass  # a test that made a save fail has seen its error already


def saved_run(tmp_path, mesh, checkpointers, steps=(4, 8, 12)):
    checkpointer = checkpointers(tmp_path, async_save=False)
    for step in steps:
        assert checkpointer.save(step, state_at(mesh, step), Position(step))
    checkpointer.close()
    return tmp_path / "checkpoints"


def truncate_state_files(step_dir):
    files = [f for f in glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True)]
    assert files
    for name in files:
        with open(name, "r+b") as f:
            f.truncate(5)


def test_a_damaged_newest_checkpoint_is_named_with_the_intact_one_and_nothing_moves(mesh8, tmp_path,
                                                                                   checkpointers):
    root = saved_run(tmp_path, mesh8, checkpointers)
    truncate_state_files(root / "12")
    checkpointer = checkpointers(tmp_path)
    with pytest.raises(checkpointing.CheckpointReadError) as caught:
        checkpointer.resume(abstract_of(state_at(mesh8, 0)), Position())
    message = str(caught.value)
    assert isinstance(caught.value, UserError)
    assert f"checkpoint 12: cannot read {root / '12' / 'state'}" in message
    assert "not valid for value of size 5" in message  # what the reader said
    assert "reads back in full is 8; also kept, not checked: 4" in message
    assert "--config.restore_step=8" in message and "--config.restore_fallback=True" in message
    assert checkpointer.all_steps() == [4, 8, 12] and not (tmp_path / checkpointing.SET_ASIDE_DIR).exists()
    # Readers (sample, eval, export, a teacher) get the same facts and their own flag.
    with pytest.raises(checkpointing.CheckpointReadError, match=r"checkpoint 12: cannot read .*--step=8"):
        checkpointer.restore(abstract_of(state_at(mesh8, 0)))


def test_fallback_resumes_from_the_newest_readable_sets_the_rest_aside_and_logs_it(mesh8, tmp_path,
                                                                                  checkpointers):
    root = saved_run(tmp_path, mesh8, checkpointers)
    data_file = root / "12" / "data" / checkpointing.data_state_filename(0, 1)
    data_file.write_bytes(b"\x00garbled")
    iterator = Position()
    checkpointer = checkpointers(tmp_path)
    state, step = checkpointer.resume(abstract_of(state_at(mesh8, 0)), iterator, fallback=True)
    assert step == 8 and iterator.position == 8
    assert_same_values(state, state_at(mesh8, 8))
    aside = tmp_path / checkpointing.SET_ASIDE_DIR / "12"
    assert checkpointer.all_steps() == [4, 8] and (aside / "data").is_dir()  # moved, not deleted
    [skipped] = checkpointer.skipped
    assert skipped["skipped_step"] == 12 and skipped["moved_to"] == str(aside)
    assert str(data_file) in skipped["reason"] and "bad header" in skipped["reason"]
    metrics = tmp_path / "metrics.jsonl"
    checkpointer.log_skipped(str(metrics))
    [row] = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert row == {"step": 8, "event": "checkpoint_skipped", **skipped}
    assert checkpointer.save(12, state_at(mesh8, 12), Position(12))  # no collision with the one set aside
    checkpointer.wait()
    assert checkpointer.all_steps() == [4, 8, 12]


def test_restore_step_sets_newer_checkpoints_aside_once(mesh8, tmp_path, checkpointers):
    saved_run(tmp_path, mesh8, checkpointers)
    abstract = abstract_of(state_at(mesh8, 0))
    with pytest.raises(MissingFileError, match=r"restore_step=6.*it holds: 4, 8, 12"):
        checkpointers(tmp_path).resume(abstract, restore_step=6)
    checkpointer = checkpointers(tmp_path, async_save=False)
    state, step = checkpointer.resume(abstract, Position(), restore_step=4)
    assert step == 4 and checkpointer.all_steps() == [4]
    assert_same_values(state, state_at(mesh8, 4))
    assert [s["skipped_step"] for s in checkpointer.skipped] == [8, 12]
    assert "newer than config.restore_step=4" in checkpointer.skipped[0]["reason"]
    for step in (8, 12, 16):  # the run goes on ...
        checkpointer.save(step, state_at(mesh8, 100 + step), Position(100 + step))
    # ... and is restarted with the same command: the newest checkpoint again, not a second rollback.
    state, step = checkpointers(tmp_path).resume(abstract, Position(), restore_step=4)
    assert step == 16
    assert_same_values(state, state_at(mesh8, 116))
    assert sorted(os.listdir(tmp_path / checkpointing.SET_ASIDE_DIR)) == ["12", "8", checkpointing.SET_ASIDE_LOG]


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(mesh8, tmp_path, checkpointers):
    root = saved_run(tmp_path, mesh8, checkpointers, steps=(4, 8))
    for step in (4, 8):
        (root / str(step) / "state" / "_METADATA").write_text("{trunc")
    with pytest.raises(checkpointing.CheckpointReadError) as caught:
        checkpointers(tmp_path).resume(abstract_of(state_at(mesh8, 0)), Position(), fallback=True)
    message = str(caught.value)
    assert "No checkpoint in" in message and "new --workdir" in message
    for step in (8, 4):  # both named, with the garbled file Orbax's own error does not name
        assert f"checkpoint {step}: cannot read {root / str(step) / 'state' / '_METADATA'}: not valid JSON" in message


def test_a_mismatched_config_is_not_taken_for_damage(mesh8, tmp_path, checkpointers):
    saved_run(tmp_path, mesh8, checkpointers, steps=(4,))
    other = dict(state_at(mesh8, 0), extra=jnp.zeros(3))
    with pytest.raises(checkpointing.CheckpointMismatchError, match="extra"):
        checkpointers(tmp_path).resume(abstract_of(other), fallback=True)
    assert checkpointers(tmp_path).all_steps() == [4]


@pytest.mark.multiprocess  # two jax.distributed processes
@pytest.mark.parametrize("what", ["data", "state"])
def test_two_processes_agree_on_the_step_when_only_one_cannot_read(tmp_path, what):
    """Process 1 cannot read its data state (after Orbax's restore) or its shards (inside it) of step 8,
    process 0 can: both stop naming step 8, or both resume from 4; neither waits for the other forever."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env["XLA_FLAGS"] = " ".join([f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
                                + ["--xla_force_host_platform_device_count=4"])
    worker = os.path.join(ROOT, "tests", "_checkpoint_worker.py")
    processes = [subprocess.Popen([sys.executable, worker, "damaged", str(port), str(i), str(tmp_path), what],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    try:
        logs = [process.communicate(timeout=180)[0].decode(errors="replace") for process in processes]
    finally:
        for process in processes:
            process.kill()
    for i, (process, log) in enumerate(zip(processes, logs)):
        assert process.returncode == 0, log[-3000:]
        result = [line for line in log.splitlines() if line.startswith("RESULT")][-1]
        assert result == "RESULT strict='error naming 8' fallback_step=4 position=4", (i, result)
    assert sorted(os.listdir(tmp_path / checkpointing.SET_ASIDE_DIR)) == ["8", checkpointing.SET_ASIDE_LOG]


def fail_the_state_write_of(monkeypatch, step):
    """Orbax's background write of checkpoint `step`'s state fails as on a full disk (tests/_storage_fault_cli.py)."""
    original = ocp.StandardCheckpointHandler.async_save

    async def async_save(self, directory, *args, **kwargs):
        futures = list(await original(self, directory, *args, **kwargs) or [])
        if os.path.basename(os.path.dirname(str(directory))).split(".")[0] == str(step):
            futures.append(fault_cli.FailingCommit(str(directory)))
        return futures

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", async_save)


def test_a_failed_background_save_surfaces_at_the_next_save_and_keeps_the_earlier_ones(mesh8, tmp_path,
                                                                                    checkpointers, monkeypatch):
    fail_the_state_write_of(monkeypatch, 12)
    checkpointer = checkpointers(tmp_path, save_every=4, keep=2)
    for step in (4, 8):
        assert checkpointer.save(step, state_at(mesh8, step), Position(step))
    assert checkpointer.save(12, state_at(mesh8, 12), Position(12))  # started: the failure comes later
    with pytest.raises(checkpointing.CheckpointWriteError) as caught:
        for step in range(13, 100):  # the loop calls save every step; it stops at the next save at the latest
            checkpointer.save(step, state_at(mesh8, step), Position(step))
            time.sleep(0.05)
    assert step <= 16
    message = str(caught.value)
    assert f"Saving checkpoint 12 to {tmp_path / 'checkpoints' / '12'} failed" in message
    assert "No space left on device" in message and "Free space on that disk" in message
    assert "the earlier checkpoints (4, 8) are untouched" in message and "resumes from step 8" in message
    # keep=2: a finished save of 12 would have deleted 4. Both are there and restore exactly; the debris of 12
    # goes when the workdir is opened again.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["12.orbax-checkpoint-tmp", "4", "8"]
    again = checkpointers(tmp_path)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8"]
    for step in (8, 4):
        iterator = Position()
        state, restored = again.restore(abstract_of(state_at(mesh8, 0)), iterator, step=step)
        assert restored == step and iterator.position == step
        assert_same_values(state, state_at(mesh8, step))


def test_a_failed_foreground_write_names_step_and_path(mesh8, tmp_path, checkpointers, monkeypatch):
    checkpointer = checkpointers(tmp_path)
    assert checkpointer.save(4, state_at(mesh8, 4), Position(4))
    checkpointer.wait()

    def full_disk(self, directory, args):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(checkpointing.DataIteratorHandler, "save", full_disk)
    with pytest.raises(checkpointing.CheckpointWriteError, match=r"Saving checkpoint 8 to .*checkpoints/8 failed.*"
                       r"No space left.*the earlier checkpoints \(4\) are untouched"):
        checkpointer.save(8, state_at(mesh8, 8), Position(8))


def test_unfinished_saves_are_removed_with_a_note(mesh8, tmp_path, checkpointers, caplog):
    root = saved_run(tmp_path, mesh8, checkpointers, steps=(4, 8))
    shutil.copytree(root / "8", root / "12.orbax-checkpoint-tmp")  # complete-looking, never renamed
    with caplog.at_level("WARNING"):
        checkpointer = checkpointers(tmp_path)
    assert "Removed 1 unfinished checkpoint(s)" in caplog.text and "12.orbax-checkpoint-tmp" in caplog.text
    assert sorted(os.listdir(root)) == ["4", "8"]
    assert checkpointer.resume(abstract_of(state_at(mesh8, 0)), Position())[1] == 8


def test_a_damaged_config_json_is_named(tmp_path):
    (tmp_path / workdir_lib.CONFIG_FILE).write_text('{"seed": 0, "model": {"na')
    with pytest.raises(checkpointing.CheckpointReadError, match=rf"{tmp_path}/config.json is damaged.*rerun"):
        workdir_lib.read_run_config(str(tmp_path))


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(workdir, **fields):
    os.makedirs(workdir, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": os.getppid(), "started": "2030-01-01T00:00:00",
              "command": "python -m cmjax.main --workdir=elsewhere", **fields}
    path = os.path.join(workdir, workdir_lock.LOCK_FILE)
    with open(path, "w") as f:
        json.dump(record, f)
    return path


def test_lock_is_taken_refused_while_live_and_taken_over_when_stale(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    lock = workdir_lock.WorkdirLock(workdir).acquire()  # creates the workdir too
    holder = json.load(open(os.path.join(workdir, workdir_lock.LOCK_FILE)))
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    lock.release()
    assert os.listdir(workdir) == []

    path = write_lock(workdir)  # the parent process: alive, on this host
    with pytest.raises(workdir_lock.WorkdirLockedError, match=rf"in use by another run: pid {os.getppid()} on host "
                       rf"{socket.gethostname()}, started 2030-01-01T00:00:00 .*delete {path}"):
        workdir_lock.WorkdirLock(workdir).acquire()
    write_lock(workdir, host="another-host")  # alive as far as anyone can tell: refreshed just now
    with pytest.raises(workdir_lock.WorkdirLockedError, match="another-host"):
        workdir_lock.WorkdirLock(workdir).acquire()

    with open(path, "w") as f:
        f.write('{"host": "vm", "pi')  # a start killed while writing its lock, or one writing it right now
    with pytest.raises(workdir_lock.WorkdirLockedError, match="one that is starting now"):
        workdir_lock.WorkdirLock(workdir).acquire()
    os.utime(path, (time.time() - 2 * workdir_lock.HEARTBEAT_S,) * 2)
    with caplog.at_level("WARNING"):
        workdir_lock.WorkdirLock(workdir).acquire().release()
    assert "Taking over the stale lock" in caplog.text and "it is unreadable and" in caplog.text

    stale = {
        "its process .* on this host is gone": dict(pid=dead_pid()),
        "now belongs to another process": dict(pid_start="1"),
        "has not refreshed it for": dict(host="another-host", age=2 * workdir_lock.STALE_AFTER_S),
    }
    for reason, fields in stale.items():
        age = fields.pop("age", 0)
        path = write_lock(workdir, **fields)
        os.utime(path, (time.time() - age, time.time() - age))
        caplog.clear()
        with caplog.at_level("WARNING"):
            lock = workdir_lock.WorkdirLock(workdir).acquire()
        assert "Taking over the stale lock" in caplog.text
        assert re.search(reason, caplog.text), caplog.text
        assert json.load(open(path))["pid"] == os.getpid()
        lock.release()


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    @workdir_lock.hold
    def failing_run(config, workdir):
        assert os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing_run(None, str(tmp_path / "run"))
    assert os.listdir(tmp_path / "run") == []


def test_unwritable_workdirs_are_named(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(workdir_lock.WorkdirError, match=rf"Cannot create the workdir {tmp_path}/a_file/run: "
                       rf"{tmp_path}/a_file is a file, not a directory"):
        workdir_lock.WorkdirLock(str(tmp_path / "a_file" / "run")).acquire()
    os.symlink(tmp_path / "unmounted", tmp_path / "disk")
    with pytest.raises(workdir_lock.WorkdirError, match=r"disk is a link to .*unmounted.*which does not exist"):
        workdir_lock.WorkdirLock(str(tmp_path / "disk" / "run")).acquire()
    (tmp_path / "existing").mkdir()
    for name, function in fault_cli.read_only_under(str(tmp_path / "existing")).items():
        monkeypatch.setattr(os, name, function)  # an existing workdir on a read-only disk
    with pytest.raises(workdir_lock.WorkdirError, match=r"Cannot write in the workdir .*existing: Read-only "
                       r"file system \(EROFS\)"):
        workdir_lock.WorkdirLock(str(tmp_path / "existing")).acquire()
    monkeypatch.undo()
    assert os.listdir(tmp_path / "existing") == []


# ---------------------------------------------------------------------------------------------------------
# Part 2: the CLI.

STEPS, EVERY = 12, 4  # checkpoints 4, 8, 12 (keep_checkpoints = 3)
RECIPE = "configs/cifar10_ict.py:smoke"
RUN_TIMEOUT = 600
# Fields of a metrics.jsonl row that are wall-clock measurements, not results.
TIMING_KEYS = ("steps_per_sec", "images_per_sec", "images_per_sec_per_device")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    from cmjax.data import digits

    root = tmp_path_factory.mktemp("storage_faults_cli")
    digits.prepare(str(root / "tfds"))  # once here, not concurrently in several processes
    return {"root": root, "data_dir": str(root / "tfds"), "cache_dir": str(root / "jax_cache")}


def cli_env(shared, **extra):
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env.update(XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=8"]), JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="2", JAX_COMPILATION_CACHE_DIR=shared["cache_dir"],
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]), **extra)
    return env


class Run:
    """`python -m cmjax.main RECIPE ... --workdir=WORKDIR` (or through tests/_storage_fault_cli.py with `fault`),
    stdout and stderr in files beside the workdir; `stderr` holds the log and any error."""

    def __init__(self, shared, name, workdir, *flags, fault=None, recipe=RECIPE, env=None):
        self.name, self.workdir = name, str(workdir)
        entry = [os.path.join(ROOT, "tests", "_storage_fault_cli.py"), fault] if fault else ["-m", "cmjax.main"]
        command = [sys.executable, *entry, f"--config={recipe}", f"--config.total_steps={STEPS}",
                   f"--config.ckpt_every={EVERY}", f"--config.data.data_dir={shared['data_dir']}",
                   f"--workdir={self.workdir}", *flags]
        self.log = str(shared["root"] / name)
        self._out, self._err = open(self.log + ".out", "wb"), open(self.log + ".err", "wb")
        self.started = time.time()
        self.process = subprocess.Popen(command, env=env or cli_env(shared), cwd=ROOT, stdout=self._out,
                                        stderr=self._err)

    def finish(self):
        try:
            self.process.wait(timeout=max(1.0, self.started + RUN_TIMEOUT - time.time()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        finally:
            self._out.close()
            self._err.close()
        with open(self.log + ".err", errors="replace") as f:
            self.stderr = f.read()
        self.seconds = time.time() - self.started
        return self

    @property
    def returncode(self):
        return self.process.returncode

    def rows(self):
        with open(os.path.join(self.workdir, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]


def finished_ok(run):
    assert run.returncode == 0, f"{run.name}: exit {run.returncode}; log tail:\n{run.stderr[-4000:]}"
    return run


def failed_saying(run, *texts):
    assert run.returncode not in (0, None), f"{run.name}: exit {run.returncode}:\n{run.stderr[-4000:]}"
    for text in texts:
        assert text in run.stderr, f"{run.name}: {text!r} not in its stderr:\n{run.stderr[-4000:]}"


def results(rows):
    """{step: the row without timings}, for the training rows (event rows left out)."""
    return {row["step"]: {k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows if "loss" in row}


def checkpoint_names(workdir):
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def nothing_compiled(run):
    return "Finished XLA compilation" not in run.stderr  # JAX_LOG_COMPILES=1 logs every compilation


@pytest.fixture(scope="module")
def first_phase(shared):
    """The uninterrupted reference run, and beside it the runs that do not need its checkpoints: a save that
    fails for want of space, a read-only disk, a workdir under a file, a workdir another run holds."""
    root = shared["root"]
    logs_compiles = cli_env(shared, JAX_LOG_COMPILES="1")
    (root / "a_file").write_text("not a directory")
    (root / "read_only_disk").mkdir()
    holder = write_lock(str(root / "locked"), pid=os.getpid())  # this test process: alive, on this host
    runs = {
        "reference": Run(shared, "reference", root / "reference"),
        "enospc": Run(shared, "enospc", root / "enospc", fault="enospc_at=8"),
        "read_only": Run(shared, "read_only", root / "read_only_disk" / "run", env=logs_compiles,
                         fault=f"erofs={root / 'read_only_disk'}"),
        "under_a_file": Run(shared, "under_a_file", root / "a_file" / "run", env=logs_compiles),
        "locked": Run(shared, "locked", root / "locked", env=logs_compiles),
    }
    reference, lock_path = runs["reference"], str(root / "reference" / workdir_lock.LOCK_FILE)
    lock_seen = None
    while lock_seen is None and reference.process.poll() is None:
        try:
            with open(lock_path) as f:
                lock_seen = json.loads(f.read())
        except (OSError, ValueError):
            time.sleep(0.05)
    for run in runs.values():
        run.finish()
    return {**runs, "lock_seen": lock_seen, "holder": holder}


def damaged_copy(shared, name, damage):
    workdir = shared["root"] / name
    shutil.copytree(shared["root"] / "reference", workdir)
    damage(workdir)
    return workdir


@pytest.fixture(scope="module")
def second_phase(shared, first_phase):
    """Runs on damaged copies of the reference workdir, and the rerun of the run whose save failed."""
    finished_ok(first_phase["reference"])

    def truncate_state(workdir):
        truncate_state_files(workdir / "checkpoints" / "12")

    def garble_data_state(workdir):
        (workdir / "checkpoints" / "12" / "data" / checkpointing.data_state_filename(0, 1)).write_bytes(b"garbled")

    def garble_config(workdir):
        (workdir / workdir_lib.CONFIG_FILE).write_text((workdir / workdir_lib.CONFIG_FILE).read_text()[:100])

    damaged = damaged_copy(shared, "damaged", truncate_state)
    rolled_back = damaged_copy(shared, "rolled_back", truncate_state)
    write_lock(str(rolled_back), pid=dead_pid(), command="a run killed earlier")
    teacher = damaged_copy(shared, "teacher", garble_config)
    enospc = first_phase["enospc"].workdir
    unfinished = [name for name in checkpoint_names(enospc) if "." in name]  # before the rerun cleans up
    runs = {
        "damaged": Run(shared, "damaged", damaged),
        "config_json": Run(shared, "config_json", shared["root"] / "student", f"--config.teacher.workdir={teacher}",
                           recipe="configs/cifar10_cd.py:l2,smoke"),
        "rolled_back": Run(shared, "rolled_back", rolled_back, "--config.restore_step=8"),
        "fallback": Run(shared, "fallback", damaged_copy(shared, "fallback", garble_data_state),
                        "--config.restore_fallback=True"),
        "after_enospc": Run(shared, "after_enospc", enospc),
    }
    for run in runs.values():
        run.finish()
    return {**runs, "teacher": teacher, "unfinished": unfinished}


@pytest.mark.multiprocess  # CLI subprocesses: the second tier
def test_cli_reference_run_holds_the_workdir_lock_while_it_trains(first_phase):
    run = finished_ok(first_phase["reference"])
    lock = first_phase["lock_seen"]
    assert lock and lock["pid"] == run.process.pid and lock["host"] == socket.gethostname()
    assert "cmjax/main.py" in lock["command"] and f"--workdir={run.workdir}" in lock["command"]
    assert not os.path.exists(os.path.join(run.workdir, workdir_lock.LOCK_FILE))  # released at the end
    assert checkpoint_names(run.workdir) == ["12", "4", "8"]
    assert sorted(results(run.rows())) == list(range(1, STEPS + 1))


@pytest.mark.multiprocess  # CLI subprocesses: the second tier
def test_cli_second_run_on_a_workdir_in_use_refuses_naming_the_holder(first_phase):
    run = first_phase["locked"]
    failed_saying(run, f"The workdir {run.workdir} is in use by another run: pid {os.getpid()} on host "
                  f"{socket.gethostname()}, started 2030-01-01T00:00:00", "--workdir=elsewhere")
    assert nothing_compiled(run)
    assert sorted(os.listdir(run.workdir)) == [workdir_lock.LOCK_FILE]  # nothing written, the lock not taken
    with open(first_phase["holder"]) as f:
        assert json.load(f)["pid"] == os.getpid()


@pytest.mark.multiprocess  # CLI subprocesses: the second tier
def test_cli_read_only_disk_or_a_file_as_parent_fails_before_compiling(first_phase, shared):
    root = shared["root"]
    read_only, under_a_file = first_phase["read_only"], first_phase["under_a_file"]
    failed_saying(read_only, f"Cannot create the workdir {root}/read_only_disk/run: Read-only file system (EROFS)")
    failed_saying(under_a_file, f"Cannot create the workdir {root}/a_file/run: {root}/a_file is a file, not a "
                  "directory")
    assert nothing_compiled(read_only) and nothing_compiled(under_a_file)
    assert os.listdir(root / "read_only_disk") == []


@pytest.mark.multiprocess  # CLI subprocesses: the second tier
def test_cli_damaged_newest_checkpoint_names_step_file_intact_steps_and_command(second_phase):
    run = second_phase["damaged"]
    failed_saying(run, f"checkpoint 12: cannot read {run.workdir}/checkpoints/12/state",
                  "The newest checkpoint that reads back in full is 8; also kept, not checked: 4.",
                  f"Resume from it with: python -m cmjax.main --config={RECIPE}",
                  f"--workdir={run.workdir}", "--config.restore_step=8", "--config.restore_fallback=True")
    assert "OUT_OF_RANGE" not in run.stderr.split("CheckpointReadError")[-1]  # no raw TensorStore error after it
    assert checkpoint_names(run.workdir) == ["12", "4", "8"]  # nothing moved or deleted
    assert not os.path.exists(os.path.join(run.workdir, checkpointing.SET_ASIDE_DIR))
    assert not os.path.exists(os.path.join(run.workdir, workdir_lock.LOCK_FILE))  # released on the error


@pytest.mark.multiprocess  # CLI subprocesses: the second tier
def test_cli_restore_step_resumes_bit_exactly_and_takes_over_a_stale_lock(first_phase, second_phase):
    run = finished_ok(second_phase["rolled_back"])
    assert "Taking over the stale lock" in run.stderr and "a run killed earlier" in run.stderr
    assert f"Resumed from step 8 in {run.workdir}." in run.stderr
    assert results(run.rows()) == results(first_phase["reference"].rows())  # steps 9-12 trained again, same
    aside = os.path.join(run.workdir, checkpointing.SET_ASIDE_DIR)
    assert sorted(os.listdir(aside)) == ["12", checkpointing.SET_ASIDE_LOG]  # the damaged one, kept
    assert checkpoint_names(run.workdir) == ["12", "4", "8"]
    with open(os.path.join(aside, checkpointing.SET_ASIDE_LOG)) as f:
        [row] = [json.loads(line) for line in f]
    assert row["step"] == 12 and row["resumed_from"] == 8 and row["restore_step"] == 8


@pytest.mark.multiprocess  # CLI subprocesses: the second tier
def test_cli_restore_fallback_over_a_damaged_data_state_warns_records_and_is_bit_exact(first_phase,
                                                                                       second_phase):
    run = finished_ok(second_phase["fallback"])
    data_file = f"{run.workdir}/checkpoints/12/data/{checkpointing.data_state_filename(0, 1)}"
    assert f"RESTORE FALLBACK (config.restore_fallback=True): checkpoint 12: cannot read {data_file}" in run.stderr
    assert "Resuming from checkpoint 8 instead: steps 9-12 are trained again" in run.stderr
    rows = run.rows()
    [event] = [row for row in rows if "event" in row]
    assert event["event"] == "checkpoint_skipped" and event["step"] == 8 and event["skipped_step"] == 12
    assert data_file in event["reason"] and event["moved_to"].endswith(f"{checkpointing.SET_ASIDE_DIR}/12")
    assert results(rows) == results(first_phase["reference"].rows())


@pytest.mark.multiprocess  # CLI subprocesses: the second tier
def test_cli_damaged_config_json_of_a_teacher_is_named(second_phase):
    run = second_phase["config_json"]
    failed_saying(run, f"{second_phase['teacher']}/config.json is damaged: it is not valid JSON",
                  "rerun its training command")


@pytest.mark.multiprocess  # CLI subprocesses: the second tier
def test_cli_a_save_that_fails_for_want_of_space_stops_the_run(first_phase):
    run = first_phase["enospc"]
    failed_saying(run, f"Saving checkpoint 8 to {run.workdir}/checkpoints/8 failed: OSError: [Errno 28] No space "
                  "left on device", "the earlier checkpoints (4) are untouched. Free space on that disk",
                  "rerun the same command: it resumes from step 4.")
    steps = sorted(results(run.rows()))
    assert steps[-1] <= 12  # stopped at the next save (12) at the latest, never training on unsaved
    assert not os.path.exists(os.path.join(run.workdir, workdir_lock.LOCK_FILE))


@pytest.mark.multiprocess  # CLI subprocesses: the second tier
def test_cli_rerun_after_the_failed_save_removes_the_debris_and_resumes_bit_exactly(first_phase, second_phase):
    assert second_phase["unfinished"] == ["8.orbax-checkpoint-tmp"]  # what the failed save left
    run = finished_ok(second_phase["after_enospc"])
    assert "Removed 1 unfinished checkpoint(s)" in run.stderr and "checkpoints/8.orbax-checkpoint-tmp" in run.stderr
    assert [name for name in checkpoint_names(run.workdir) if "." in name] == []
    assert f"Resumed from step 4 in {run.workdir}." in run.stderr
    assert checkpoint_names(run.workdir) == ["12", "4", "8"]
    assert results(run.rows()) == results(first_phase["reference"].rows())
