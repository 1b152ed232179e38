"""The project's error hierarchy: every error a user can cause is one of these, with one clear line."""

from __future__ import annotations

import difflib

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
    """A validation failure in one line: where (`top_level` for the root), what, and how many more.
    An unknown key comes first (a typo), with the missing key it was probably meant to be."""
    errors = exc.errors()
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    if not unknown:
        err = errors[0]
        where = ".".join(str(p) for p in err["loc"]) or top_level
        return f"{where}: {err['msg']}{_more(len(errors) - 1)}"
    err = unknown[0]
    parent, key = err["loc"][:-1], str(err["loc"][-1])
    where = ".".join(str(p) for p in err["loc"])
    missing = {
        str(e["loc"][-1]): e
        for e in errors
        if e["type"] == "missing" and tuple(e["loc"][:-1]) == tuple(parent)
    }
    meant = difflib.get_close_matches(key, list(missing), n=1, cutoff=0.6)
    hint = f" (did you mean {meant[0]!r}?)" if meant else ""
    explained = 1 + bool(meant)
    return f"{where}: {err['msg']}{hint}{_more(len(errors) - explained)}"


def _more(n: int) -> str:
    return f" (and {n} more)" if n > 0 else ""
