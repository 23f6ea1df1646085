"""User errors: a mistake in what the user gave (config, data, paths, a refused request).

The `aepo` command prints one of these as `error: <message>` and exits with status 2, without a
traceback (`aepo --debug ...` or AEPO_DEBUG=1 shows it). Raise `UserError` (or a subclass) with a
message that names the file, row or key and says what to do; any other exception is a bug or an
environment failure and keeps its traceback.

`UserError` subclasses ValueError, so callers that catch ValueError keep working.
"""

from __future__ import annotations

import os


class UserError(ValueError):
    """The user's input is wrong or a request is refused; the message says where and what to do."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Every exception class the CLI reports as a user error (some live in modules that must not
    import this one first, so they are collected here lazily)."""
    from aepo_core.config import ConfigError
    from aepo_core.datasets import DatasetError

    types: list[type[BaseException]] = [UserError, ConfigError, DatasetError]
    try:
        from aepo_core.sweeps import PlanError

        types.append(PlanError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, user_error_types())


def debug_requested() -> bool:
    return os.environ.get("AEPO_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
