"""A service's liveness, for container and Kubernetes health checks.

While connected to its broker, a service with `health_file` set touches that file every
`BEAT_S` seconds (`heartbeat`). `python -m p2pdoe.services.health FILE MAX_AGE_S` exits 0 when
FILE was touched within MAX_AGE_S seconds, else 1 with one line saying why: a stale file means the
service lost its broker or its event loop is stuck. Imports nothing heavy, so a check is cheap.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

BEAT_S = 5.0


class Connected(Protocol):
    @property
    def connected(self) -> bool: ...


async def heartbeat(transport: Connected, path: Path, every_s: float = BEAT_S) -> None:
    """Touch `path` every `every_s` while `transport` is connected (until cancelled)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        if transport.connected:
            path.touch()
            os.utime(path)
        await asyncio.sleep(every_s)


def age_s(path: Path, now: float | None = None) -> float | None:
    """Seconds since `path` was last touched, or None if it does not exist."""
    try:
        modified = path.stat().st_mtime
    except FileNotFoundError:
        return None
    return (time.time() if now is None else now) - modified


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m p2pdoe.services.health FILE MAX_AGE_S", file=sys.stderr)
        return 2
    try:
        limit = float(args[1])
    except ValueError:
        print(f"health: MAX_AGE_S must be a number of seconds, not {args[1]!r}", file=sys.stderr)
        return 2
    age = age_s(Path(args[0]))
    if age is None:
        print(f"unhealthy: {args[0]} does not exist (never connected)", file=sys.stderr)
        return 1
    if age > limit:
        print(f"unhealthy: {args[0]} last touched {age:.0f} s ago (limit {limit:g} s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
