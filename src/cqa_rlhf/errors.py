"""User-facing errors: one line that names the file and the position or key, and a non-zero exit."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


class CqaError(Exception):
    """An error caused by the user's input (data, params, paths), reported as one line."""


class ConfigError(CqaError):
    """A wrong, missing or unknown key in params.yaml."""


class DataError(CqaError):
    """Raw data that cannot be read: malformed XML/JSON, invalid UTF-8, a missing source."""


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def cli(main: F) -> F:
    """Wrap a stage's ``main`` so a :class:`CqaError` prints ``error: ...`` on one line and exits 2.

    Programming errors still raise with a traceback: those are bugs, not bad input.
    """

    @functools.wraps(main)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return main(*args, **kwargs)
        except CqaError as exc:
            print(f"error: {one_line(str(exc))}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
