"""Errors a user can fix (a config value, a path, a file): the CLI prints their message alone and exits 2.

Every error cmjax raises for bad input derives from `UserError`; the message says what was wrong, the value,
and the fix. `cmjax.main` prints it as one line without a traceback (`--verbose` shows the traceback); any
other exception is a bug and keeps its traceback. The subclasses also derive from the built-in exception a
caller would expect (`ValueError`, `FileNotFoundError`), so library code can catch them as such.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input that the user can fix; its message is complete on its own."""


class ConfigError(UserError, ValueError):
    """A config key or value that cmjax cannot run with."""


class MissingFileError(UserError, FileNotFoundError):
    """A path the config or a flag names does not hold what cmjax needs."""
