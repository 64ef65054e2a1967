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
"""
from __future__ import annotations

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

STATE_ITEM, DATA_ITEM = "state", "data"
# How many mismatched or non-finite leaves an error message lists before "... and N more".
_LISTED = 5


class CheckpointMismatchError(errors.UserError, ValueError):
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


class DataIteratorHandler(ocp.CheckpointHandler):
    """Orbax handler for per-process iterator states: every process writes and reads only its own file."""

    def save(self, directory: epath.Path, args: "DataIteratorSave") -> None:
        """Writes this process's state bytes into the item directory (called on every process)."""
        name = data_state_filename(jax.process_index(), jax.process_count())
        (directory / name).write_bytes(args.state)

    def restore(self, directory: epath.Path, args: Optional["DataIteratorRestore"] = None) -> bytes:
        """This process's state bytes; a clear error when the checkpoint came from another process count."""
        path = directory / data_state_filename(jax.process_index(), jax.process_count())
        if not path.exists():
            found = self.metadata(directory) if directory.exists() else []
            raise errors.MissingFileError(
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
    """`a/b/0/c` for a key path, the same for dict keys, attributes (dataclasses, namedtuples) and indices."""
    parts = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


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
        self.directory = epath.Path(workdir) / "checkpoints"
        self.preemption_check_every = preemption_check_every
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
            item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(), DATA_ITEM: DataIteratorHandler()},
        )
        self._sigterm_received = threading.Event()
        self._previous_sigterm_handler = None
        if not read_only:
            self._install_sigterm_handler()

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
        """
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
        items = {STATE_ITEM: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA_ITEM] = DataIteratorSave(data_iterator.get_state())
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

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
        so a checkpoint written on another mesh or process count is resharded while it is read.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                return None
        elif step not in self._manager.all_steps():
            raise errors.MissingFileError(
                f"No complete checkpoint for step {step} in {self.directory}; present: {self.all_steps()}."
            )
        saved = self._manager.item_metadata(step)
        problems = tree_mismatches(saved[STATE_ITEM], abstract_state)
        if problems:
            raise CheckpointMismatchError(
                f"The checkpoint {self.directory / str(step)} does not match the train state this config "
                f"builds ({len(problems)} difference(s)):{_listing(problems)}\n"
                "Resume with the model/optimizer config that wrote it, or start from a fresh workdir."
            )
        items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None and saved.get(DATA_ITEM) is None and step == 0:
            # A step-0 checkpoint written without a data stream (imported weights): nothing has been read
            # yet, so the iterator's own fresh start is exactly where training begins.
            logging.info("Checkpoint %s holds no data iterator state; the data stream starts fresh.",
                         self.directory / str(step))
            data_iterator = None
        if data_iterator is not None:
            if saved.get(DATA_ITEM) is None:
                raise errors.MissingFileError(
                    f"The checkpoint {self.directory / str(step)} holds no data iterator state; restore "
                    "without `data_iterator` to start the data stream afresh."
                )
            items[DATA_ITEM] = DataIteratorRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if data_iterator is not None:
            data_iterator.set_state(restored[DATA_ITEM])
        return restored[STATE_ITEM], step

    # -- lifetime ----------------------------------------------------------------------------------------

    def wait(self) -> None:
        """Blocks until the save in flight (if any) is finalized on every process."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and gives SIGTERM back to whoever handled it before."""
        self._manager.close()
        if self._previous_sigterm_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm_handler)
            self._previous_sigterm_handler = None

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
