"""Strict decoding shared by every wire message: a size limit and no duplicate JSON keys.

pydantic's JSON parser keeps the last of two equal keys without a word, so a payload could carry a
limit twice and mean either; we refuse it. Everything that is not valid JSON, too large, or repeats a
key raises `WireError` (a ValueError) before pydantic sees it.
"""

from __future__ import annotations

import json
from typing import Any

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # a proposal of 50 peers x 96 intervals is about 0.2 MB


class WireError(ValueError):
    pass


def checked_json(payload: bytes, limit: int = MAX_MESSAGE_BYTES) -> bytes:
    """The payload, unchanged, if it is at most `limit` bytes of UTF-8 JSON without repeated keys."""
    if len(payload) > limit:
        raise WireError(f"message of {len(payload)} bytes exceeds the limit of {limit}")
    try:
        json.loads(payload.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as exc:
        raise WireError("message is not UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise WireError(f"message is not JSON: {exc.msg} at {exc.pos}") from exc
    return payload


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise WireError(f"message repeats the key {repeated[0]!r}")
    return dict(pairs)
