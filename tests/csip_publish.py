"""Publishes envelopes as the coordinator does (signed, retained, as `dso` of a bundle), from
cactus-client admin instructions' parameters (tests/cactus_admin): the project's Python runs it.

    python tests/csip_publish.py BUNDLE SITE create-der-control '{"status": "active", "opModExpLimW": 0}'
    python tests/csip_publish.py BUNDLE SITE    # one instruction a line on stdin, `ok` or `error ...` back

The second form connects once and serves a whole procedure: a step's instructions (S-ALL-44 sets 24
controls a minute long, the first starting a minute on) are published within moments of each other.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from p2pdoe.core import topics
from p2pdoe.core.schemas.runtime import Doe
from p2pdoe.services.provision import access

UNBOUNDED_KW = 1000.0  # a limit the instruction does not set: 1 MW
SUPPORTED = {"status", "opModExpLimW", "opModImpLimW", "duration_seconds", "start_offset_seconds", "primacy"}
ACTIVE_DURATION_S = 3600  # an active control's length when the instruction does not set it
SCHEDULED_LEAD_S = 60  # a scheduled control without start_offset_seconds starts this soon,
SCHEDULED_DURATION_S = 120  # this long, after the scheduled ones before it (stacked, not overlapping)


@dataclass
class Stack:
    """Where the next scheduled control without start_offset_seconds may start: after the last."""

    free_from: datetime | None = None


def envelope(
    site: str, kind: str, parameters: dict[str, object], at: datetime, stack: Stack | None = None
) -> Doe:
    """The Doe an instruction issued at `at` asks for, limits in W: the default; an active control
    (started a minute before `at`); or a scheduled one starting `start_offset_seconds` after `at`,
    else SCHEDULED_LEAD_S on and after the scheduled ones `stack` has seen."""
    unsupported = set(parameters) - SUPPORTED
    if unsupported:
        raise ValueError(f"an envelope sets import and export limits only, not {sorted(unsupported)}")
    up = float(parameters.get("opModExpLimW", UNBOUNDED_KW * 1e3)) / 1e3  # type: ignore[arg-type]
    lo = -float(parameters.get("opModImpLimW", UNBOUNDED_KW * 1e3)) / 1e3  # type: ignore[arg-type]
    at = at.replace(microsecond=0)
    if kind == "create-default-der-control":
        return Doe.from_box(site, None, at - timedelta(minutes=1), 86400, lo, up)
    scheduled = parameters.get("status", "active") == "scheduled"
    duration = int(
        parameters.get("duration_seconds", SCHEDULED_DURATION_S if scheduled else ACTIVE_DURATION_S)
    )  # type: ignore[call-overload]
    if "start_offset_seconds" in parameters:
        start = at + timedelta(seconds=int(parameters["start_offset_seconds"]))  # type: ignore[call-overload]
    elif scheduled:
        start = at + timedelta(seconds=SCHEDULED_LEAD_S)
        if stack is not None and stack.free_from is not None:
            start = max(start, stack.free_from)
    else:
        start = at - timedelta(minutes=1)
    if scheduled and stack is not None:
        end = start + timedelta(seconds=duration)
        stack.free_from = end if stack.free_from is None else max(stack.free_from, end)
    return Doe.from_box(site, f"cactus-{secrets.token_hex(4)}", start, duration, lo, up)


def _topic(doe: Doe) -> str:
    return topics.site(doe.site, "doe/default" if doe.round is None else "doe")


async def publish(bundle: Path, doe: Doe) -> None:
    description = json.loads((bundle / "provision.json").read_text())
    dso = await access(description, "dso").connect(f"cactus-admin-{secrets.token_hex(3)}", 30.0)
    try:
        await dso.publish(_topic(doe), doe.model_dump_json().encode(), retain=True)
    finally:
        await dso.close()


async def serve(bundle: Path, site: str) -> None:
    """One connection; each stdin line `{"kind": ..., "parameters": ..., "at": ISO time}` published,
    answered `ok` (once published) or `error <why>`."""
    description = json.loads((bundle / "provision.json").read_text())
    dso = await access(description, "dso").connect(f"cactus-admin-{secrets.token_hex(3)}", 30.0)
    stack = Stack()
    try:
        while line := await asyncio.to_thread(sys.stdin.readline):
            try:
                asked = json.loads(line)
                at = datetime.fromisoformat(asked["at"])
                doe = envelope(site, asked["kind"], asked["parameters"], at, stack)
            except (ValueError, KeyError, TypeError) as exc:
                print(f"error {exc}", flush=True)
                continue
            await dso.publish(_topic(doe), doe.model_dump_json().encode(), retain=True)
            print("ok", flush=True)
    finally:
        await dso.close()


def main(argv: list[str]) -> None:
    bundle, site = Path(argv[0]), argv[1]
    if len(argv) == 2:
        asyncio.run(serve(bundle, site))
        return
    kind, parameters = argv[2], json.loads(argv[3])
    try:
        doe = envelope(site, kind, parameters, datetime.now(UTC))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    asyncio.run(publish(bundle, doe))


if __name__ == "__main__":
    main(sys.argv[1:])
