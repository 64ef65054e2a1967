"""`python -m cmjax.main` with one storage fault injected, for tests/test_storage_faults.py.

  python tests/_storage_fault_cli.py FAULT [cmjax.main flags ...]

FAULT:
  enospc_at=STEP  the write of checkpoint STEP's train state fails in Orbax's background thread with
                  OSError(ENOSPC), after the save was started and the arrays handed over: what a disk that
                  fills up during an asynchronous save does. Every other checkpoint is written normally.
  erofs=PATH      creating a directory or a file under PATH fails with OSError(EROFS), as on a read-only mount.

Everything else is the real CLI: the module runs as `__main__`, with this process's remaining arguments.
"""
import errno
import os
import runpy
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FailingCommit:
    """An Orbax commit future whose write runs out of space."""

    def __init__(self, path: str):
        self.path = path

    def result(self, timeout=None):
        del timeout
        time.sleep(0.1)  # the other writes of the step go ahead meanwhile
        raise OSError(errno.ENOSPC, "No space left on device", self.path)


def inject_enospc(step: int) -> None:
    import orbax.checkpoint as ocp

    original = ocp.StandardCheckpointHandler.async_save

    async def async_save(self, directory, *args, **kwargs):
        futures = list(await original(self, directory, *args, **kwargs) or [])
        # directory: <workdir>/checkpoints/<step>.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp
        if os.path.basename(os.path.dirname(str(directory))).split(".")[0] == str(step):
            futures.append(FailingCommit(str(directory)))
        return futures

    ocp.StandardCheckpointHandler.async_save = async_save


def read_only_under(prefix: str) -> dict:
    """Replacements for `os.mkdir` and `os.open` that fail with EROFS for paths under `prefix`."""
    prefix = os.path.abspath(prefix)
    writing = os.O_CREAT | os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC
    mkdir, open_ = os.mkdir, os.open

    def under(path) -> bool:
        path = os.path.abspath(os.fsdecode(path))
        return path == prefix or path.startswith(prefix + os.sep)

    def read_only_mkdir(path, *args, **kwargs):
        if under(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        return mkdir(path, *args, **kwargs)

    def read_only_open(path, flags, *args, **kwargs):
        if flags & writing and under(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        return open_(path, flags, *args, **kwargs)

    return {"mkdir": read_only_mkdir, "open": read_only_open}


def inject_erofs(prefix: str) -> None:
    for name, function in read_only_under(prefix).items():
        setattr(os, name, function)


def main() -> None:
    fault, value = sys.argv[1].split("=", 1)
    {"enospc_at": lambda: inject_enospc(int(value)), "erofs": lambda: inject_erofs(value)}[fault]()
    sys.argv = [os.path.join(ROOT, "cmjax", "main.py"), *sys.argv[2:]]
    runpy.run_module("cmjax.main", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
