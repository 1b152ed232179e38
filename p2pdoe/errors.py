"""The project's error hierarchy: every error a user can cause is one of these, with one clear line."""

from __future__ import annotations

from pydantic import ValidationError


class P2PDoeError(Exception):
    """Base of every error p2pdoe raises on purpose."""


class FeederError(P2PDoeError):
    """A feeder is unusable: not radial, islanded, no slack bus, bad numbers."""


class MatpowerFormatError(FeederError):
    """A MATPOWER case file cannot be read."""


class ScenarioError(P2PDoeError):
    """A scenario file is invalid or inconsistent with its feeder."""


class InfeasibleError(P2PDoeError):
    """A problem has no feasible point (for example, background load alone violates the limits)."""


def first_error(exc: ValidationError, top_level: str) -> str:
    """A validation failure in one line: where (`top_level` for the root), what, and how many more."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or top_level
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {err['msg']}{more}"
