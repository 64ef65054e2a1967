"""Storage faults of checkpoints, in words: the error types, which file a failed read names, the fix for a failed
write, and the set-aside log. `cmjax.checkpointing` raises them; docs/troubleshooting.md lists every message.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shlex
import sys
import time
from typing import Any, Optional, Sequence

from etils import epath

from cmjax.errors import UserError

# Checkpoints a resume passed over (unreadable, or newer than `restore_step`) move here, beside checkpoints/;
# SET_ASIDE_LOG (JSON lines) says why, when, and which step the run resumed from instead.
SET_ASIDE_DIR = "checkpoints_set_aside"
SET_ASIDE_LOG = "set_aside.jsonl"


class CheckpointReadError(UserError, OSError):
    """A checkpoint's files cannot be read back (truncated, missing, garbled); the message names the step, the
    file, the newest checkpoint that does read back, and how to resume from it."""


class CheckpointWriteError(UserError, OSError):
    """Writing a checkpoint failed (disk full, read-only, permissions); the checkpoints before it are intact."""


@dataclasses.dataclass(frozen=True)
class Unreadable:
    """A checkpoint that did not read back: its step, the file that failed, and what the reader said."""

    step: int
    file: str
    reason: str

    def __str__(self) -> str:
        return f"checkpoint {self.step}: cannot read {self.file}: {self.reason.rstrip('.')}"


class UnreadableCheckpoint(Exception):
    """Raised inside a restore for a checkpoint that does not read back; carries the `Unreadable`."""

    def __init__(self, unreadable: Unreadable):
        super().__init__(str(unreadable))
        self.unreadable = unreadable


def one_line(text: Any, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from, outermost first."""
    chain: list[BaseException] = []
    while exc is not None and all(exc is not seen for seen in chain) and len(chain) < 10:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


# TensorStore: `... in OCDBT database at local file "/w/checkpoints/12/state/": Error reading Byte range [0, 9) of
# local file "/w/checkpoints/12/state/d/3f...": Requested byte range [0, 9) is not valid for value of size 5`.
_STORE_FILE = re.compile(r'(?:local file|database at|file) "([^"]+)"')
_STORE_ENTRY = re.compile(r'(?:Error reading|Metadata at) "([^"]+)"')
_STORE_SPEC = re.compile(r"\s*\[tensorstore_spec=.*", re.S)
# The JSON files of a checkpoint step, relative to its directory (Orbax's step and item metadata): {item} is
# the train state's item.
_JSON_FILES = ("_CHECKPOINT_METADATA", "{item}/_METADATA", "{item}/_sharding", "{item}/array_metadatas/*")


def describe_read_error(exc: BaseException, default_file: str) -> tuple[str, str]:
    """(file, reason) of a failed read: the file an OSError or a TensorStore message names, else `default_file`."""
    chain = _chain(exc)
    for error in chain:
        if isinstance(error, OSError) and error.filename:
            return str(error.filename), one_line(error.strerror or error)
        text = _STORE_SPEC.sub("", str(error))
        files = list(_STORE_FILE.finditer(text))
        if files:
            entry = _STORE_ENTRY.search(text)
            rest = text[files[-1].end():].lstrip(' :"').strip()
            file = files[-1].group(1) + (f" (entry {entry.group(1)})" if entry else "")
            return file, one_line(rest if len(rest) > 20 else text)
    return default_file, one_line(f"{type(chain[-1]).__name__}: {chain[-1]}")


def garbled_json_file(step_directory: epath.Path, item: str) -> Optional[tuple[str, str]]:
    """(file, reason) for the first metadata file of a checkpoint step that is not valid JSON, if any: what
    Orbax's own error (often a bare StopIteration or KeyError) does not say."""
    for pattern in _JSON_FILES:
        for path in sorted(step_directory.glob(pattern.format(item=item))):
            try:
                json.loads(path.read_text())
            except (OSError, ValueError) as error:
                return str(path), one_line(f"not valid JSON ({error})")
    return None


def write_fix(exc: BaseException) -> str:
    """What to do about a failed write, from the errno or message of its cause."""
    chain = _chain(exc)
    codes = {getattr(error, "errno", None) for error in chain}
    text = " ".join(str(error) for error in chain).lower()
    if errno.ENOSPC in codes or errno.EDQUOT in codes or "no space left" in text or "quota" in text:
        return "Free space on that disk (or point --workdir at one with room)"
    if codes & {errno.EROFS, errno.EACCES, errno.EPERM} or "read-only" in text or "permission denied" in text:
        return "Make that directory writable (or point --workdir at a writable disk)"
    return "Fix the cause above"


def resume_command(flag: str) -> str:
    """This process's command line with `flag` (`--name=value`) set, when it is the cmjax CLI; else `flag`."""
    argv = sys.argv
    if not argv or not argv[0].endswith(os.path.join("cmjax", "main.py")):
        return flag
    name = flag.split("=", 1)[0]
    kept = [arg for arg in argv[1:] if arg.split("=", 1)[0] != name]
    return shlex.join(["python", "-m", "cmjax.main", *kept, flag])


def steps_text(steps: Sequence[int]) -> str:
    return ", ".join(str(step) for step in steps) or "none"


def log_set_aside(workdir: epath.Path, row: dict[str, Any]) -> None:
    """Appends `row` (step, moved_to, resumed_from, restore_step, reason), stamped with the time, to the log."""
    with (workdir / SET_ASIDE_DIR / SET_ASIDE_LOG).open("a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **row}) + "\n")


def restore_step_applied(workdir: epath.Path, restore_step: int) -> Optional[str]:
    """When an earlier start already resumed from `restore_step` and set newer checkpoints aside: when, and which."""
    log = workdir / SET_ASIDE_DIR / SET_ASIDE_LOG
    if not log.exists():
        return None
    for line in log.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a row cut off by a crash
        if row.get("restore_step") == restore_step:
            return f"at {row.get('time')}, which moved checkpoint {row.get('step')} aside"
    return None


def read_json(path: str, fix: str) -> Any:
    """The JSON value in the file `path`; a damaged (truncated, garbled) one raises `CheckpointReadError`
    naming the file, what is wrong with it, and `fix`."""
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except ValueError as error:
        raise CheckpointReadError(f"{path} is damaged: it is not valid JSON ({error}). {fix}") from error
