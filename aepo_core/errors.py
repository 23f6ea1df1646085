"""Errors the `aepo` command reports as one line, and how.

- `UserError`: a mistake in what the user gave (config, data, paths) or a refused request (a run
  directory another process writes). Printed as `error: <message>`, exit status 2.
- `EnvironmentFault`: the machine or the run directory is in a state the user must fix (a full disk,
  a damaged artifact, a store locked too long). Printed as `error: <message>`, exit status 1.

Either kind carries a message that names the file, row or key and says what to do, and neither
prints a traceback unless asked (`aepo --debug ...` or AEPO_DEBUG=1). Any other exception is a bug
and keeps its traceback. `UserError` subclasses ValueError, so callers catching ValueError keep working.
"""

from __future__ import annotations

import os


class UserError(ValueError):
    """The user's input is wrong or a request is refused; the message says where and what to do."""


class EnvironmentFault(RuntimeError):
    """A full disk, a damaged artifact, a locked store: the message says which path and what to do."""


def exit_status(exc: BaseException) -> int | None:
    """2 for a UserError, 1 for an EnvironmentFault, None for anything else (a bug: keep the traceback)."""
    if isinstance(exc, UserError):
        return 2
    if isinstance(exc, EnvironmentFault):
        return 1
    return None


def is_user_error(exc: BaseException) -> bool:
    """Reported as one line (either kind above)."""
    return exit_status(exc) is not None


def debug_requested() -> bool:
    return os.environ.get("AEPO_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
