"""One run per workdir: the lock file `workdir/cmjax.lock`, and the checks that a run can write there at all.

`hold` wraps the training entry point (`@workdir_lock.hold` on `train_and_evaluate(config, workdir)`). Before
anything else runs, process 0
  1. creates the workdir (and missing parents) or fails naming the path it could not create and why (a
     read-only disk, a parent that is a file or a dangling link, a full disk);
  2. creates `cmjax.lock` atomically (O_EXCL), which also proves the workdir is writable, recording host, pid,
     the process's start time, the time and the command; a lock already there refuses the start
     (`WorkdirLockedError`, naming the run holding it) unless it is stale:
       - same host, and the pid is gone (or now belongs to another process: its start time differs);
       - another host, and the lock has not been refreshed for `STALE_AFTER_S` (a live run touches it every
         `HEARTBEAT_S` from a daemon thread, so a run whose machine was lost does not block its restart);
     a stale lock is taken over with a one-line warning naming its old holder;
  3. releases the lock when the wrapped function returns or raises. A killed process leaves it behind; the
     stale rule above lets the next start take it.
Only process 0 takes the lock (the other processes of a multi-host run share its workdir). Object-store
workdirs (gs://...) are not locked or probed: they have no atomic create-if-absent here.
"""
from __future__ import annotations

import errno
import functools
import json
import os
import shlex
import socket
import sys
import threading
import time
from typing import Any, Callable, Optional

import jax
from absl import logging

from cmjax.errors import UserError

LOCK_FILE = "cmjax.lock"
HEARTBEAT_S = 30.0  # how often a live run refreshes its lock's modification time
STALE_AFTER_S = 300.0  # a lock from another host not refreshed for this long (10 heartbeats) is stale


class WorkdirError(UserError, OSError):
    """The workdir cannot be created or written (read-only disk, a parent that is a file, no space)."""


class WorkdirLockedError(UserError, RuntimeError):
    """Another live run holds the workdir's lock."""


def _process_start(pid: int) -> Optional[str]:
    """The kernel's start time of `pid` (clock ticks since boot, Linux), to tell a reused pid apart; else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _why(error: OSError) -> str:
    name = errno.errorcode.get(error.errno or 0, "")
    return f"{error.strerror or error}{f' ({name})' if name else ''}"


def _cannot_create(path: str, error: OSError) -> str:
    """Why `os.makedirs(path)` failed, in terms of the nearest existing ancestor."""
    ancestor = path
    while ancestor != os.path.dirname(ancestor) and not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if os.path.islink(ancestor) and not os.path.exists(ancestor):
        cause = f"{ancestor} is a link to {os.readlink(ancestor)!r}, which does not exist (a disk not mounted?)"
        fix = f"mount what {ancestor} points to, or choose another --workdir"
    elif os.path.lexists(ancestor) and not os.path.isdir(ancestor):
        cause, fix = f"{ancestor} is a file, not a directory", "choose another --workdir"
    else:
        cause = f"{_why(error)} at {error.filename or ancestor}"
        fix = "choose a --workdir on a writable disk with free space"
    return f"Cannot create the workdir {path}: {cause}. To run, {fix}."


def describe_holder(holder: dict[str, Any], lock_path: str) -> str:
    age = time.time() - os.path.getmtime(lock_path) if os.path.exists(lock_path) else 0.0
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')} "
            f"(lock refreshed {age:.0f} s ago; command: {holder.get('command', '?')})")


def stale_reason(holder: Optional[dict[str, Any]], lock_path: str) -> Optional[str]:
    """Why the lock recorded in `holder` (None: unreadable) belongs to no live run; None if it may be live."""
    age = time.time() - os.path.getmtime(lock_path)
    if holder is None:
        # An empty or garbled lock: a start killed between creating and writing it, unless that is now.
        return f"it is unreadable and {age:.0f} s old" if age > HEARTBEAT_S else None
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        if pid == os.getpid():
            return "it was left by an earlier run in this same process"
        if not _pid_alive(pid):
            return f"its process {pid} on this host is gone"
        start = holder.get("pid_start")
        if start is not None and _process_start(pid) not in (None, start):
            return f"its pid {pid} now belongs to another process"
        return None
    if age > STALE_AFTER_S:
        return f"host {holder.get('host')} has not refreshed it for {age:.0f} s (more than {STALE_AFTER_S:.0f} s)"
    return None


class WorkdirLock:
    """The lock of one local workdir, held by this process from `acquire` to `release`."""

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self._stop = threading.Event()
        self._heartbeat: Optional[threading.Thread] = None
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": shlex.join(sys.argv)}

    def acquire(self) -> "WorkdirLock":
        """Creates the workdir and the lock (see the module docstring); raises WorkdirError/WorkdirLockedError."""
        if os.path.lexists(self.workdir) and not os.path.isdir(self.workdir):
            raise WorkdirError(f"--workdir={self.workdir} is a file, not a directory; choose another --workdir.")
        try:
            os.makedirs(self.workdir, exist_ok=True)
        except OSError as error:
            raise WorkdirError(_cannot_create(self.workdir, error)) from error
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as error:
                raise WorkdirError(
                    f"Cannot write in the workdir {self.workdir}: {_why(error)} (creating {self.path}). Choose a "
                    "--workdir on a writable disk with free space.") from error
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(self.record) + "\n")
            except OSError as error:
                self._remove()
                raise WorkdirError(
                    f"Cannot write in the workdir {self.workdir}: {_why(error)} (writing {self.path}). Free space "
                    "there or choose another --workdir.") from error
            self._heartbeat = threading.Thread(target=self._refresh, name="cmjax-workdir-lock", daemon=True)
            self._heartbeat.start()
            return self
        raise WorkdirLockedError(f"Could not take the lock {self.path}: other runs keep creating it.")

    def _take_over_if_stale(self) -> None:
        try:
            with open(self.path) as f:
                holder = json.loads(f.read())
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError):
            holder = None
        holder = holder if isinstance(holder, dict) else None
        try:
            reason = stale_reason(holder, self.path)
        except FileNotFoundError:
            return
        if reason is None:
            who = (describe_holder(holder, self.path) if holder is not None else
                   f"one that is starting now (its lock {self.path} is not written yet)")
            raise WorkdirLockedError(
                f"The workdir {self.workdir} is in use by another run: {who}. "
                "Wait for it to finish or stop it, or use another --workdir. If that run is gone (its machine "
                f"was lost), delete {self.path} and rerun.")
        logging.warning("Taking over the stale lock %s (%s): %s.", self.path,
                        describe_holder(holder, self.path) if holder else "unreadable", reason)
        self._remove()

    def _refresh(self) -> None:
        """Touches the lock every HEARTBEAT_S, so a run on another host can tell that this one is alive."""
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError as error:
                logging.warning("Could not refresh the workdir lock %s: %s", self.path, error)

    def _remove(self) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        """Removes the lock if it is still this process's."""
        self._stop.set()
        try:
            with open(self.path) as f:
                holder = json.loads(f.read())
        except (OSError, ValueError):
            return
        if holder.get("host") == self.record["host"] and holder.get("pid") == self.record["pid"]:
            self._remove()


def hold(function: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps `function(config, workdir, ...)`: process 0 holds `workdir`'s lock while it runs (see module)."""

    @functools.wraps(function)
    def holding(config, workdir, *args, **kwargs):
        lock = None
        if jax.process_index() == 0 and "://" not in str(workdir):
            lock = WorkdirLock(str(workdir)).acquire()
        try:
            return function(config, workdir, *args, **kwargs)
        finally:
            if lock is not None:
                lock.release()

    return holding
