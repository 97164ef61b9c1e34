"""The benchmarks' arguments: checks, and how the results record them."""

from __future__ import annotations

from typing import Any

from ..errors import InputError


def check_positive_int(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise InputError(f"{name} must be an integer >= 1, got {v!r}")


def as_recorded(x: Any) -> str | None:
    """A path or name argument as the results record it (None stays None)."""
    return None if x is None else str(x)
