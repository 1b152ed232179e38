"""A service's liveness and readiness, for container and Kubernetes health checks.

A service with `health_file` set rewrites that file every `BEAT_S` seconds while its event loop runs
(`heartbeat`), saying whether it is connected to its broker. Then
`python -m p2pdoe.services.health FILE MAX_AGE_S [--connected]` exits 0 when FILE was written within
MAX_AGE_S seconds (and, with --connected, says connected), else 1 with one line saying why.
- Liveness: without --connected. A stale file means a stuck or dead service: restart it. A broker
  outage is not one: the edge keeps enforcing and journaling through it.
- Readiness: with --connected.
Imports nothing heavy, so a check is cheap.
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


CONNECTED, DISCONNECTED = "connected", "disconnected"


async def heartbeat(transport: Connected, path: Path, every_s: float = BEAT_S) -> None:
    """Write `path` every `every_s` (until cancelled): whether `transport` is connected."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        state = CONNECTED if transport.connected else DISCONNECTED
        tmp = path.with_name(f".{path.name}.new")
        tmp.write_text(state + "\n", encoding="utf-8")
        os.replace(tmp, path)  # a check never reads a half-written file
        await asyncio.sleep(every_s)


def age_s(path: Path, now: float | None = None) -> float | None:
    """Seconds since `path` was last written, or None if it does not exist."""
    try:
        modified = path.stat().st_mtime
    except FileNotFoundError:
        return None
    return (time.time() if now is None else now) - modified


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    connected = "--connected" in args
    args = [a for a in args if a != "--connected"]
    if len(args) != 2:
        print("usage: python -m p2pdoe.services.health FILE MAX_AGE_S [--connected]", file=sys.stderr)
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
        print(f"unhealthy: {args[0]} last written {age:.0f} s ago (limit {limit:g} s)", file=sys.stderr)
        return 1
    if connected and _state(Path(args[0])) != CONNECTED:
        print(f"not ready: {args[0]} says the service is not connected to its broker", file=sys.stderr)
        return 1
    return 0


def _state(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
