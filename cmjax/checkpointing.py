"""Checkpoints over Orbax: asynchronous saves, keep-N, preemption, data-iterator state, resharding restore.

A checkpoint is `workdir/checkpoints/<step>/` with two items:
  state   the train state (any pytree of arrays), written by Orbax's StandardCheckpointHandler, so it can be
          restored onto a different mesh, device count or process count: the caller passes the target's
          abstract tree (`jax.ShapeDtypeStruct`s with the new shardings) and Orbax reads each shard it needs.
  data    one file per process holding that process's input-iterator state (`get_state()` bytes), written by
          `DataIteratorHandler`. Same file names as `cmjax.data.pipeline.save_state`.

Orbax writes every checkpoint into a temporary directory and renames it (or, on object stores, writes a commit
marker) only after every process has finished; a job killed mid-save leaves only an unfinalized directory,
which `latest_step()` ignores and the next `Checkpointer` deletes.

Preemption: the loop asks `should_stop_for_preemption(step)` every step; when it says yes, it calls
`save(step, ..., force=True)`, `wait()`, and exits 0. The answer is the same on every process:
  - With `jax.distributed` and its preemption service (the default on multi-host), JAX itself catches SIGTERM,
    tells every host, and Orbax's `reached_preemption(step)` turns true on all of them at the same step.
  - Otherwise this class installs a SIGTERM handler that only sets a flag (a handler must not do work: it
    runs between two Python bytecodes of the train step). On one process the flag is the answer; on several,
    the flags are all-gathered every `preemption_check_every` steps (a collective that waits for the device).

Storage faults (docs/troubleshooting.md):
  - A checkpoint that cannot be read back (truncated or missing files, a damaged data-iterator state) raises
    `CheckpointReadError` naming the step, the file and the newest checkpoint that does read back; the
    loop's `resume(..., fallback=True)` instead resumes from that one, loudly, and `log_skipped` records the
    skip in metrics.jsonl. Checkpoints passed over are moved to `workdir/checkpoints_set_aside/`, never
    deleted, so a later save of the same step cannot be mistaken for them.
  - A save that fails (disk full, read-only disk), in the foreground or in Orbax's background thread, raises
    `CheckpointWriteError` naming the step and the path at the next `save` (called every step) or `wait`;
    the checkpoints before it are untouched (Orbax deletes old ones only after a save has finished).
  - Temporary directories of saves that never finished are removed, with a one-line note, when a writable
    `Checkpointer` opens.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import threading
from typing import Any, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from cmjax import errors
from cmjax.errors import MissingFileError, UserError

# The error types and the set-aside names are part of this module's API too (callers catch them from here).
from cmjax.storage_faults import (  # noqa: F401
    SET_ASIDE_DIR,
    SET_ASIDE_LOG,
    CheckpointReadError,
    CheckpointWriteError,
    Unreadable,
    UnreadableCheckpoint,
    describe_read_error,
    garbled_json_file,
    log_set_aside,
    one_line,
    read_json,
    restore_step_applied,
    resume_command,
    steps_text,
    write_fix,
)

STATE_ITEM, DATA_ITEM = "state", "data"
# How many mismatched or non-finite leaves an error message lists before "... and N more".
_LISTED = 5
# Orbax writes a step into `<step>.orbax-checkpoint-tmp-<timestamp>` and renames it when complete.
_UNFINISHED_MARK = ".orbax-checkpoint-tmp"


class CheckpointMismatchError(UserError, ValueError):
    """The saved train state's tree differs from the one the current config builds."""


class NonFiniteStateError(FloatingPointError):
    """The train state holds NaN or Inf, so it must not become the checkpoint a restart resumes from."""


class ResumableIterator(Protocol):
    """What a data iterator needs to be checkpointed: its position as bytes, per process."""

    def get_state(self) -> bytes: ...

    def set_state(self, state: bytes) -> None: ...


def data_state_filename(process_index: int, process_count: int) -> str:
    """File of one process's iterator state; equals `cmjax.data.pipeline.state_filename` (tested)."""
    # Spelled out here rather than imported: the pipeline module pulls in TensorFlow, which a checkpoint
    # reader (export, evaluation) does not otherwise need.
    return f"data_process_{process_index:05d}-of-{process_count:05d}.tfdata"


# ----------------------------------------------------------------------------------------------------------
# The per-process data item.


class ReadFailure:
    """What a handler's `restore` hands back instead of raising: see `StateHandler`."""

    def __init__(self, error: BaseException):
        self.error = error


class StateHandler(ocp.StandardCheckpointHandler):
    """Orbax's handler for the train state, except that a failed read is handed back (`ReadFailure`) instead of
    raised. Orbax's restore then still ends in its barrier on every process, whichever of them could not read
    its shards, and all of them can decide together what to resume from (`Checkpointer._read_newest`)."""

    def restore(self, directory: epath.Path, args: Optional[ocp.args.StandardRestore] = None) -> Any:
        try:
            return super().restore(directory, args=args)
        except Exception as error:
            return ReadFailure(error)


@ocp.args.register_with_handler(StateHandler, for_save=True)
class StateSave(ocp.args.StandardSave):
    """`StandardSave` of the train state, for `StateHandler`."""


@ocp.args.register_with_handler(StateHandler, for_restore=True)
class StateRestore(ocp.args.StandardRestore):
    """`StandardRestore` of the train state, for `StateHandler`."""


class DataIteratorHandler(ocp.CheckpointHandler):
    """Orbax handler for per-process iterator states: every process writes and reads only its own file."""

    def save(self, directory: epath.Path, args: "DataIteratorSave") -> None:
        """Writes this process's state bytes into the item directory (called on every process)."""
        name = data_state_filename(jax.process_index(), jax.process_count())
        (directory / name).write_bytes(args.state)

    def restore(self, directory: epath.Path, args: Optional["DataIteratorRestore"] = None) -> Any:
        """This process's state bytes (a `ReadFailure` if they cannot be read, see `StateHandler`)."""
        try:
            return self._read(directory)
        except Exception as error:
            return ReadFailure(error)

    def _read(self, directory: epath.Path) -> bytes:
        """This process's state bytes; a clear error when the checkpoint came from another process count."""
        path = directory / data_state_filename(jax.process_index(), jax.process_count())
        if not path.exists():
            found = self.metadata(directory) if directory.exists() else []
            count = f"-of-{jax.process_count():05d}."
            if not found or any(count in name for name in found):  # saved by this process count: damaged
                raise FileNotFoundError(errno.ENOENT, "file missing", str(path))
            raise MissingFileError(
                f"No data iterator state {str(path)!r} for process {jax.process_index()} of "
                f"{jax.process_count()}; the checkpoint holds {found}. Iterator states are per process: resume "
                "with the process count that saved them, or restore without `data_iterator` to start the data "
                "stream afresh."
            )
        return path.read_bytes()

    def metadata(self, directory: epath.Path) -> list[str]:
        """The per-process state files present (one per process that saved)."""
        return sorted(p.name for p in directory.glob("data_process_*"))


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
class DataIteratorSave(ocp.args.CheckpointArgs):
    """This process's iterator state, taken when `save` is called (not later, in the background)."""

    def __init__(self, state: bytes):
        self.state = bytes(state)


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
class DataIteratorRestore(ocp.args.CheckpointArgs):
    """Restore this process's iterator state bytes."""


# ----------------------------------------------------------------------------------------------------------
# Checks before saving and restoring.


def _path_str(path: tuple[Any, ...]) -> str:
    """`a/b/0/c` for a key path: dict keys, attributes (dataclasses, namedtuples) and indices alike."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def _shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
    """Leaf shapes keyed by `_path_str`; works for arrays, ShapeDtypeStructs and Orbax array metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_str(path): tuple(getattr(leaf, "shape", np.shape(leaf))) for path, leaf in leaves}


def tree_mismatches(saved: Any, expected: Any) -> list[str]:
    """Human-readable differences between a saved tree (metadata) and the expected abstract tree."""
    saved_shapes, expected_shapes = _shapes_by_path(saved), _shapes_by_path(expected)
    problems = []
    for key in sorted(expected_shapes.keys() - saved_shapes.keys()):
        problems.append(f"missing from checkpoint: {key} (expected shape {expected_shapes[key]})")
    for key in sorted(saved_shapes.keys() - expected_shapes.keys()):
        problems.append(f"not in the config's state: {key} (saved shape {saved_shapes[key]})")
    for key in sorted(saved_shapes.keys() & expected_shapes.keys()):
        if saved_shapes[key] != expected_shapes[key]:
            problems.append(f"shape differs: {key} saved {saved_shapes[key]} vs expected {expected_shapes[key]}")
    return problems


def _listing(items: list[str]) -> str:
    """The first few items, one per line, and how many were left out."""
    shown = "\n  ".join(items[:_LISTED])
    more = f"\n  ... and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return f"\n  {shown}{more}"


@jax.jit
def _all_finite_per_leaf(leaves: list[jax.Array]) -> jax.Array:
    """One bool per leaf: no NaN or Inf in it. A single compiled reduction over the whole state."""
    return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])


def non_finite_leaves(tree: Any) -> list[str]:
    """Paths of floating-point leaves holding NaN or Inf (integer leaves cannot)."""
    floating = [
        (path, leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    if not floating:
        return []
    finite = np.asarray(jax.device_get(_all_finite_per_leaf([leaf for _, leaf in floating])))
    return [_path_str(path) for (path, _), ok in zip(floating, finite) if not ok]



# ----------------------------------------------------------------------------------------------------------
# The checkpointer.


def _jax_owns_sigterm() -> bool:
    """True when JAX's preemption service catches SIGTERM and syncs it (multi-process `jax.distributed`)."""
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class Checkpointer:
    """Saves and restores `workdir/checkpoints/<step>/{state,data}`; also the loop's preemption signal."""

    def __init__(
        self,
        workdir: str,
        *,
        save_every: int,
        keep: int,
        async_save: bool = True,
        preemption_check_every: int = 10,
        read_only: bool = False,
    ):
        """`read_only=True` opens another run's checkpoints (a teacher) without touching them: no saves, no
        clean-up of its temporary directories, no SIGTERM handler."""
        if save_every < 1 or keep < 1 or preemption_check_every < 1:
            raise errors.ConfigError(
                f"save_every={save_every}, keep={keep} and preemption_check_every={preemption_check_every} "
                "must all be at least 1."
            )
        if "://" not in str(workdir):  # Orbax needs absolute local paths; gs:// and other URLs stay as given
            workdir = os.path.abspath(workdir)
        self.workdir = epath.Path(workdir)
        self.directory = self.workdir / "checkpoints"
        self.preemption_check_every = preemption_check_every
        # Checkpoints the last `resume` passed over: {"skipped_step", "reason", "moved_to"} (see `log_skipped`).
        self.skipped: list[dict[str, Any]] = []
        self._resumed_step: Optional[int] = None
        self._saving: Optional[int] = None  # the step of the save started last, until it is known to be done
        if not read_only:
            self._remove_unfinished_saves()
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            # Every `save_every` steps, and at the step all processes agree on after a preemption notice.
            save_decision_policy=policies.AnySavePolicy(
                [policies.FixedIntervalPolicy(save_every), policies.PreemptionCheckpointingPolicy()]
            ),
            enable_async_checkpointing=async_save,
            # Temporary directories of a save that never finished (a killed job) are garbage; drop them.
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={STATE_ITEM: StateHandler(), DATA_ITEM: DataIteratorHandler()},
        )
        self._sigterm_received = threading.Event()
        self._previous_sigterm_handler = None
        if not read_only:
            self._install_sigterm_handler()

    def _remove_unfinished_saves(self) -> None:
        """Deletes the temporary directories of saves that never finished (process 0), with a one-line note.

        Orbax lists only renamed (complete) steps, so these are never restored; it would delete them in the
        background too, but silently. A live run's save in flight is never one of them: the workdir lock
        (`cmjax.workdir_lock`) keeps a second run out of a workdir in use."""
        if jax.process_index() != 0 or not self.directory.exists():
            return
        unfinished = sorted(path for path in self.directory.iterdir() if _UNFINISHED_MARK in path.name)
        for path in unfinished:
            path.rmtree()
        if unfinished:
            logging.warning("Removed %d unfinished checkpoint(s) that an interrupted save left behind (never "
                            "complete, so never restorable): %s", len(unfinished), ", ".join(map(str, unfinished)))

    # -- preemption --------------------------------------------------------------------------------------

    def _install_sigterm_handler(self) -> None:
        """Flag-only SIGTERM handler, unless JAX's preemption service already owns the signal."""
        if _jax_owns_sigterm():
            return  # Replacing JAX's handler would blind `reached_preemption` on this host.
        if threading.current_thread() is not threading.main_thread():
            logging.warning("Checkpointer created off the main thread: SIGTERM will not stop training cleanly.")
            return

        def on_sigterm(signum, frame):
            del signum, frame
            self._sigterm_received.set()

        self._previous_sigterm_handler = signal.signal(signal.SIGTERM, on_sigterm)

    def reached_preemption(self, step: int) -> bool:
        """Orbax's preemption sync point: true on every process at the same step after a notice."""
        return self._manager.reached_preemption(step)

    def should_stop_for_preemption(self, step: int) -> bool:
        """Save `step` and stop? The same answer on every process; call it at every step on every process."""
        if self.reached_preemption(step):
            return True
        if _jax_owns_sigterm():
            return False  # Our flag is never set then, on any process: no collective needed.
        local = self._sigterm_received.is_set()
        if jax.process_count() == 1:
            return local
        if step % self.preemption_check_every:
            return False
        flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
        return bool(np.any(flags))

    # -- save --------------------------------------------------------------------------------------------

    def save(self, step: int, state: Any, data_iterator: Optional[ResumableIterator] = None, *,
             force: bool = False) -> bool:
        """Starts saving `step` if it is due (or `force`); True if a save started. Raises on a non-finite state.

        Call it after the step that consumed the iterator's last batch and before the next `next()`, so the
        iterator state saved is the position that step `step + 1` starts from. With `async_save` it returns
        once the arrays are copied off the devices: the caller may donate `state` to the next step at once.

        Called every step, it also reports a failed earlier save (`CheckpointWriteError`) as soon as Orbax's
        background thread has given up on it, so training does not go on with nothing being saved.
        """
        if self._saving is not None and not self._manager.is_saving_in_progress():
            self.wait()  # the last save is over: returns at once, or raises its failure
        if step in self._manager.all_steps():
            return False  # Already saved (a periodic save and a preemption save can fall on one step).
        if not force and not self._manager.should_save(step):
            return False
        bad = non_finite_leaves(state)
        if bad:
            raise NonFiniteStateError(
                f"Refusing to checkpoint step {step}: the train state holds NaN or Inf in{_listing(bad)}\n"
                f"The checkpoints already in {self.directory} are kept (latest: step {self.latest_step()}). "
                "Training diverged: lower the learning rate or enable gradient clipping, then resume."
            )
        if self._saving is not None:
            self.wait()  # Orbax would wait for it too; this way its failure is reported as its own
        items = {STATE_ITEM: StateSave(state)}
        if data_iterator is not None:
            items[DATA_ITEM] = DataIteratorSave(data_iterator.get_state())
        try:
            started = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as error:
            raise self._write_error(step, error) from error
        if started:
            self._saving = step
        return started

    def _write_error(self, step: Optional[int], error: BaseException) -> CheckpointWriteError:
        """The message for a failed save of `step`: the step, the path, the cause, the fix, what is intact."""
        try:
            self._manager.reload()  # what is on disk now: the failed step's temporary directory is not a step
            kept = [s for s in self.all_steps() if s != step]
        except Exception:  # noqa: BLE001 - the message must not fail too
            kept = []
        what = f"checkpoint {step} to {self.directory / str(step)}" if step is not None else f"to {self.directory}"
        kept_text = (f"the earlier checkpoints ({steps_text(kept)}) are untouched" if kept else
                     "there is no earlier checkpoint")
        resume = f"it resumes from step {kept[-1]}" if kept else "it starts from step 0"
        return CheckpointWriteError(
            f"Saving {what} failed: {one_line(f'{type(error).__name__}: {error}')}. Training stopped so that no "
            f"more steps go unsaved; {kept_text}. {write_fix(error)}, then rerun the same command: {resume}.")

    # -- restore -----------------------------------------------------------------------------------------

    def latest_step(self) -> Optional[int]:
        """The newest complete checkpoint's step (unfinished saves are not listed), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints kept, ascending."""
        return sorted(self._manager.all_steps())

    def restore(self, abstract_state: Any, data_iterator: Optional[ResumableIterator] = None,
                step: Optional[int] = None) -> Optional[tuple[Any, int]]:
        """(state, step) from the latest (or given) checkpoint, laid out as `abstract_state`; None if none exist.

        `abstract_state` is the target tree of `jax.ShapeDtypeStruct`s with the shardings of the current mesh,
        so a checkpoint written on another mesh or process count is resharded while it is read. A checkpoint
        that does not read back raises `CheckpointReadError` naming the newest one that does (`--step=N`).
        """
        steps = self.all_steps()
        if step is None or step < 0:
            if not steps:
                return None
            step = steps[-1]
        elif step not in steps:
            raise MissingFileError(
                f"No complete checkpoint for step {step} in {self.directory}; present: {steps}.")
        state, read, unreadable = self._read_newest([s for s in reversed(steps) if s <= step], abstract_state,
                                                    data_iterator)
        if unreadable:
            raise CheckpointReadError(self._unreadable_message(
                unreadable, read, f"Read it instead with --step={read} (sample, eval, export)."))
        return state, read

    def resume(self, abstract_state: Any, data_iterator: Optional[ResumableIterator] = None, *,
               restore_step: int = -1, fallback: bool = False) -> Optional[tuple[Any, int]]:
        """The training loop's restore: (state, step) of the newest checkpoint, or of `restore_step` (>= 0);
        None in a workdir without checkpoints.

        A checkpoint that does not read back stops with `CheckpointReadError` (naming the step, the file, the
        newest checkpoint that does read back and the command that resumes from it), unless `fallback`: then
        the loop resumes from that one with a loud warning, and `skipped` says what was passed over. Every
        checkpoint newer than the one resumed from (unreadable ones, or those after `restore_step`) is moved
        to `workdir/checkpoints_set_aside/`, so that the saves to come cannot collide with it; nothing is
        deleted. `restore_step` acts once: a restart with the same command, after the run saved newer
        checkpoints, resumes from the newest again (`checkpoints_set_aside/set_aside.jsonl` remembers).
        """
        self.skipped, self._resumed_step = [], None
        steps = self.all_steps()
        if restore_step >= 0 and restore_step not in steps:
            raise MissingFileError(
                f"config.restore_step={restore_step}, but {self.directory} holds no complete checkpoint "
                f"{restore_step}; it holds: {steps_text(steps)}. Pick one of those, or -1 for the newest.")
        if not steps:
            return None
        target, requested = steps[-1], None
        if 0 <= restore_step < steps[-1]:
            applied = restore_step_applied(self.workdir, restore_step)
            if applied:
                logging.warning("config.restore_step=%d was already applied (%s); resuming from the newest "
                                "checkpoint, %d. Drop --config.restore_step from the command to silence this.",
                                restore_step, applied, steps[-1])
            else:
                target, requested = restore_step, restore_step
        state, step, unreadable = self._read_newest([s for s in reversed(steps) if s <= target], abstract_state,
                                                    data_iterator)
        if unreadable and not fallback:
            raise CheckpointReadError(self._unreadable_message(unreadable, step, (
                f"Resume from it with: {resume_command(f'--config.restore_step={step}')} (the checkpoints "
                f"after it are then moved to {self.workdir / SET_ASIDE_DIR}, not deleted), or set "
                "--config.restore_fallback=True to resume from the newest readable checkpoint automatically.")))
        newer = [s for s in steps if s > step]
        reasons = {u.step: f"unreadable: {u.file}: {u.reason}" for u in unreadable}
        reasons.update({s: f"newer than config.restore_step={requested}" for s in newer if s not in reasons})
        moved = self._set_aside(newer, step, reasons, requested)
        self.skipped = [{"skipped_step": s, "reason": reasons[s], "moved_to": moved[s]} for s in newer]
        self._resumed_step = step
        if unreadable:
            logging.warning(
                "RESTORE FALLBACK (config.restore_fallback=True): %s. Resuming from checkpoint %d instead: steps "
                "%d-%d are trained again. Moved aside, not deleted: %s.", "; ".join(map(str, unreadable)), step,
                step + 1, newer[-1], ", ".join(moved.values()))
        elif newer:
            logging.warning("Resuming from checkpoint %d (config.restore_step=%d); the newer checkpoint(s) %s "
                            "were moved to %s.", step, step, steps_text(newer), self.workdir / SET_ASIDE_DIR)
        return state, step

    def log_skipped(self, metrics_path: str) -> None:
        """Appends to `metrics_path` (metrics.jsonl) one row per checkpoint the last `resume` passed over:
        `{"step": <resumed from>, "event": "checkpoint_skipped", "skipped_step", "reason", "moved_to"}`."""
        if not self.skipped:
            return
        with open(metrics_path, "a") as f:
            for row in self.skipped:
                f.write(json.dumps({"step": self._resumed_step, "event": "checkpoint_skipped", **row}) + "\n")

    def _read_step(self, step: int, abstract_state: Any, data_iterator: Optional[ResumableIterator]) -> Any:
        """The state of checkpoint `step` (and the iterator set to its position). Files that do not read back
        raise `UnreadableCheckpoint`; a checkpoint of another model, process count or data stream raises
        its own error (a user error: an older checkpoint would not do better)."""
        where = self.directory / str(step)

        def unreadable(error: BaseException, default_file: str) -> UnreadableCheckpoint:
            file, reason = describe_read_error(error, default_file)
            if file == default_file:  # the reader did not say which file: a garbled metadata file is likely
                file, reason = garbled_json_file(where, STATE_ITEM) or (file, reason)
            return UnreadableCheckpoint(Unreadable(step, file, reason))

        try:
            saved = self._manager.item_metadata(step)
        except UserError:
            raise
        except Exception as error:
            raise unreadable(error, str(where)) from error
        if saved is None or saved.get(STATE_ITEM) is None:
            raise UnreadableCheckpoint(Unreadable(step, str(where / STATE_ITEM), "its metadata is missing"))
        problems = tree_mismatches(saved[STATE_ITEM], abstract_state)
        if problems:
            raise CheckpointMismatchError(
                f"The checkpoint {where} does not match the train state this config "
                f"builds ({len(problems)} difference(s)):{_listing(problems)}\n"
                "Resume with the model/optimizer config that wrote it, or start from a fresh workdir."
            )
        items = {STATE_ITEM: StateRestore(abstract_state)}
        if data_iterator is not None and saved.get(DATA_ITEM) is None and step == 0:
            # A step-0 checkpoint written without a data stream (imported weights): nothing has been read
            # yet, so the iterator's own fresh start is exactly where training begins.
            logging.info("Checkpoint %s holds no data iterator state; the data stream starts fresh.", where)
            data_iterator = None
        if data_iterator is not None:
            if saved.get(DATA_ITEM) is None:
                raise MissingFileError(
                    f"The checkpoint {where} holds no data iterator state; restore "
                    "without `data_iterator` to start the data stream afresh."
                )
            items[DATA_ITEM] = DataIteratorRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except UserError:
            raise
        except Exception as error:
            raise unreadable(error, str(where / STATE_ITEM)) from error
        for item in items:
            if isinstance(restored[item], ReadFailure):
                if isinstance(restored[item].error, UserError):
                    raise restored[item].error
                raise unreadable(restored[item].error, str(where / item)) from restored[item].error
        if data_iterator is not None:
            try:
                data_iterator.set_state(restored[DATA_ITEM])
            except UserError:
                raise
            except Exception as error:
                name = data_state_filename(jax.process_index(), jax.process_count())
                raise UnreadableCheckpoint(Unreadable(step, str(where / DATA_ITEM / name),
                                                       one_line(f"{type(error).__name__}: {error}"))) from error
        return restored[STATE_ITEM]

    def _read_newest(self, candidates: list[int], abstract_state: Any, data_iterator: Optional[ResumableIterator]
                     ) -> tuple[Any, Optional[int], list[Unreadable]]:
        """(state, step, unreadable): the first of `candidates` (newest first) that reads back, on every process,
        and those that did not. Raises `CheckpointReadError` when none does."""
        unreadable: list[Unreadable] = []
        state, step = None, None
        for candidate in candidates:
            try:
                state, read_here = self._read_step(candidate, abstract_state, data_iterator), True
            except UnreadableCheckpoint as error:
                logging.error("%s", error.unreadable)
                unreadable.append(error.unreadable)
                state, read_here = None, False
            # Every process must resume from the same step, and try the same steps in the same order (each
            # restore ends in a collective barrier): the first that every process could read.
            read_everywhere = read_here
            if jax.process_count() > 1:
                read_everywhere = bool(np.all(multihost_utils.process_allgather(np.asarray(read_here, np.int32))))
                if read_here and not read_everywhere:
                    unreadable.append(Unreadable(candidate, "it on another process", "see the other processes' logs"))
            if read_everywhere:
                step = candidate
                break
            state = None
        if step is None:
            raise CheckpointReadError(
                f"No checkpoint in {self.directory} reads back: {'; '.join(map(str, unreadable))}. Restore the "
                "files from a backup, or start afresh with a new --workdir (nothing in this one was changed).")
        return state, step, unreadable

    def _unreadable_message(self, unreadable: list[Unreadable], intact: int, how: str) -> str:
        older = [s for s in reversed(self.all_steps()) if s < intact]
        also = f"; also kept, not checked: {steps_text(older)}" if older else ""
        return (f"Cannot resume from {self.directory}: {'; '.join(map(str, unreadable))}. The newest checkpoint "
                f"that reads back in full is {intact}{also}. {how}")

    def _set_aside(self, steps: list[int], resumed_from: int, reasons: dict[int, str],
                   restore_step: Optional[int]) -> dict[int, str]:
        """Moves checkpoints `steps` to workdir/checkpoints_set_aside/ (process 0) and logs why; {step: new path}."""
        if not steps:
            return {}
        aside = self.workdir / SET_ASIDE_DIR
        moved = {}
        for step in steps:
            target, copy = aside / str(step), 1
            while target.exists():
                copy += 1
                target = aside / f"{step}-{copy}"
            moved[step] = str(target)
            if jax.process_index() != 0:
                continue
            aside.mkdir(parents=True, exist_ok=True)
            try:
                (self.directory / str(step)).rename(target)
            except OSError as error:
                raise CheckpointWriteError(
                    f"Could not move checkpoint {step} aside ({self.directory / str(step)} -> {target}): "
                    f"{one_line(error)}. Move or delete it yourself, then rerun the same command.") from error
            log_set_aside(self.workdir, {"step": step, "moved_to": str(target), "resumed_from": resumed_from,
                                         "restore_step": restore_step, "reason": reasons[step]})
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("cmjax checkpoints set aside")
        self._manager.reload()
        return moved

    # -- lifetime ----------------------------------------------------------------------------------------

    def wait(self) -> None:
        """Blocks until the save in flight (if any) is finalized on every process; raises `CheckpointWriteError`
        if it failed."""
        step, self._saving = self._saving, None
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            raise self._write_error(step, error) from error

    def close(self) -> None:
        """Finishes pending saves and gives SIGTERM back to whoever handled it before."""
        try:
            step, self._saving = self._saving, None
            try:
                self._manager.close()
            except Exception as error:
                raise self._write_error(step, error) from error
        finally:
            if self._previous_sigterm_handler is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm_handler)
                self._previous_sigterm_handler = None

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

