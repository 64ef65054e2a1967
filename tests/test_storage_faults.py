"""Storage faults: damaged checkpoints, failed writes, unwritable workdirs, a second run, unfinished saves.

Part 1 checks `cmjax.checkpointing` and `cmjax.workdir_lock` in process, on a small sharded state. Part 2 runs
the CLI as a user would (`configs/cifar10_ict.py:smoke`, 12 steps, checkpoints 4, 8, 12): every fault gives
its message, and every resume from the checkpoints left intact gives the uninterrupted run's losses bit for
bit. The CLI runs are few, started side by side in two phases and shared by the tests (module fixtures), and
reuse each other's compilations (a persistent compilation cache of this module's). Faults that a test cannot
cause for real (a disk filling up during a save, a read-only mount) are injected by tests/_storage_fault_cli.py
around the real CLI.
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
from jax.sharding import NamedSharding, PartitionSpec as P

from cmjax import checkpointing, sharding, train, workdir_lock
from cmjax.errors import MissingFileError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _storage_fault_cli as fault_cli  # noqa: E402


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


def fail_the_state_write_of(monkeypatch, step):
    """Orbax's background write of checkpoint `step`'s state fails as on a full disk (tests/_storage_fault_cli.py)."""
    original = ocp.StandardCheckpointHandler.async_save

    async def async_save(self, directory, *args, **kwargs):
        futures = list(await original(self, directory, *args, **kwargs) or [])
        if os.path.basename(os.path.dirname(str(directory))).split(".")[0] == str(step):
            futures.append(fault_cli.FailingCommit(str(directory)))
        return futures

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", async_save)


def test_a_failed_background_save_surfaces_at_the_next_save_or_wait(mesh8, tmp_path, checkpointers, monkeypatch):
    fail_the_state_write_of(monkeypatch, 8)
    checkpointer = checkpointers(tmp_path, save_every=4, keep=2)
    assert checkpointer.save(4, state_at(mesh8, 4), Position(4))
    assert checkpointer.save(8, state_at(mesh8, 8), Position(8))  # started: the failure comes later
    with pytest.raises(checkpointing.CheckpointWriteError) as caught:
        for step in range(9, 100):  # the loop calls save every step; it stops at the next save at the latest
            checkpointer.save(step, state_at(mesh8, step), Position(step))
            time.sleep(0.05)
    assert step <= 12
    message = str(caught.value)
    assert f"Saving checkpoint 8 to {tmp_path / 'checkpoints' / '8'} failed" in message
    assert "No space left on device" in message and "Free space on that disk" in message
    assert "the earlier checkpoints (4) are untouched" in message and "resumes from step 4" in message
    # keep=2 would have deleted nothing yet; what is there restores exactly, and the debris goes next start.
    assert [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith("8.")]
    again = checkpointers(tmp_path)
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith("8.")]
    state, step = again.resume(abstract_of(state_at(mesh8, 0)), Position())
    assert step == 4
    assert_same_values(state, state_at(mesh8, 4))


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
    (tmp_path / train.CONFIG_FILE).write_text('{"seed": 0, "model": {"na')
    with pytest.raises(checkpointing.CheckpointReadError, match=rf"{tmp_path}/config.json is damaged.*rerun"):
        train.read_run_config(str(tmp_path))


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
