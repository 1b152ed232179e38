"""`python -m p2pdoe.services.lockstep`: the lockstep clock's granter (the protocol:
p2pdoe.core.lockstep), and the member side's `LockstepClock` (p2pdoe.services.lockstep_clock).

A shell around the pure `Granter`: it clears a stale retained grant, subscribes to the members' and
dones' topics, turns each message into an event, publishes the machine's grants and status (retained)
and logs its reports, and sends a `Tick` at the machine's next timeout. Its timeouts are wall-clock
patience (`time.time()`). After the last step it clears the retained grant and exits 0.

    python -m p2pdoe.services.lockstep --broker mqtt://127.0.0.1:1883 --start 2024-06-01T00:00Z \\
        --step-s 5 --hours 24 --members meter-s1:plant,edge-s1:control,dso:grid

Bad options: one line on stderr and exit status 2. Environment prefix: P2PDOE_CLOCK_.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from p2pdoe.core import topics
from p2pdoe.core.lockstep import (
    Command,
    Done,
    Ended,
    Event,
    Granter,
    GranterConfig,
    Joined,
    Left,
    PublishGrant,
    PublishStatus,
    Report,
    Tick,
)
from p2pdoe.core.schemas.lockstep import (
    MEMBER_PATTERN,
    PHASES,
    ClockDone,
    ClockMember,
    Phase,
    decode_lockstep,
)
from p2pdoe.services.lockstep_clock import LockstepClock
from p2pdoe.services.runner import run_service, service_transport, setup
from p2pdoe.services.settings import ConfigError, ServiceSettings
from p2pdoe.services.transport import InboundMessage, Transport, TransportError

__all__ = ["LockstepClock", "LockstepSettings", "granter_config", "main", "run_granter"]

PROG = "p2pdoe-lockstep"
log = logging.getLogger(__name__)
Seconds = Annotated[float, Field(gt=0, le=86400)]


class LockstepSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="P2PDOE_CLOCK_", extra="forbid")

    step_s: Seconds = 5.0  # simulated seconds per step (the meters' reading rate)
    end: str | None = None  # no step after this ISO 8601 time; or give `hours`
    hours: Annotated[float | None, Field(gt=0, le=24 * 366)] = None  # the end, `hours` after the start
    members: str = ""  # the expected members, "name:phase,name:phase"
    join_timeout_s: Seconds = 120.0  # then step 0 goes ahead without the missing
    silence_timeout_s: Seconds = 30.0  # a granted member this long silent is left out


def granter_config(settings: LockstepSettings) -> GranterConfig:
    """The machine's configuration from the settings, or a ConfigError (one line)."""
    start = _iso(settings.start, "start")
    if (settings.end is None) == (settings.hours is None):
        raise ConfigError("give the end of the day: --end or --hours (one of them)")
    hours = settings.hours
    end = start + timedelta(hours=hours) if hours is not None else _iso(settings.end or "", "end")
    try:
        return GranterConfig(
            start,
            settings.step_s,
            end,
            _members(settings.members),
            settings.join_timeout_s,
            settings.silence_timeout_s,
            STATUS_EVERY_S,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


STATUS_EVERY_S = 1.0  # the status's progress at most once a wall second: people read it, not members


def _iso(value: str, name: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"setting {name}: {value!r} is not an ISO 8601 time") from None
    if moment.utcoffset() is None:
        raise ConfigError(f"setting {name}: {value!r} needs a time zone")
    return moment


def _members(text: str) -> dict[str, Phase]:
    members: dict[str, Phase] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, phase = item.partition(":")
        if not re.fullmatch(MEMBER_PATTERN, name) or phase not in PHASES:
            raise ConfigError(f"setting members: {item!r} is not name:phase (phase: {', '.join(PHASES)})")
        if name in members:
            raise ConfigError(f"setting members: {name!r} is named twice")
        members[name] = phase
    return members


# -- the shell ------------------------------------------------------------------------------------


async def clear_grants(transport: Transport) -> None:
    for phase in PHASES:
        await transport.publish(topics.clock_grant(phase), b"", qos=1, retain=True)


async def run_granter(transport: Transport, granter: Granter, wall: Callable[[], float] = time.time) -> int:
    """Feed `granter` from `transport` until the day has ended (0)."""
    await clear_grants(transport)  # an earlier run's
    await transport.subscribe(topics.clock_member())
    await transport.subscribe(topics.clock_done())
    inbox = transport.messages()
    receive: asyncio.Future[InboundMessage] | None = None
    event: Event | None = Tick()
    try:
        while True:
            if event is not None and await _execute(transport, granter.handle(event, wall())):
                return 0
            receive = receive or asyncio.ensure_future(anext(inbox))
            await asyncio.wait({receive}, timeout=_timeout(granter, wall()))
            if not receive.done():
                event = Tick()
                continue
            message, receive = _received(receive), None
            event = _event(message)
    finally:
        if receive is not None:
            receive.cancel()


def _timeout(granter: Granter, now_s: float) -> float | None:
    wake = granter.next_wakeup_wall_s()
    return None if wake is None else max(0.0, wake - now_s) + 0.01


def _received(receive: asyncio.Future[InboundMessage]) -> InboundMessage:
    try:
        return receive.result()
    except StopAsyncIteration:
        raise TransportError("the transport closed before the day ended") from None


def _event(message: InboundMessage) -> Event | None:
    """The machine's event for a member or done message; None (logged) for anything else."""
    parsed = topics.parse(message.topic)
    if parsed is None or parsed.area != "clock" or parsed.member is None:
        return None
    if not message.payload:
        return Left(parsed.member) if parsed.kind == "member" else None
    try:
        decoded = decode_lockstep(message.payload)
    except ValueError as exc:
        log.warning("dropped a bad message on %s: %s", message.topic, exc)
        return None
    if isinstance(decoded, ClockMember) and parsed.kind == "member" and decoded.member == parsed.member:
        return Joined(decoded.member, decoded.phase) if decoded.state == "joined" else Left(decoded.member)
    if isinstance(decoded, ClockDone) and parsed.kind == "done" and decoded.member == parsed.member:
        return Done(decoded.member, decoded.step, decoded.phase, decoded.next, decoded.holding)
    log.warning("dropped a %s message on %s", decoded.kind, message.topic)
    return None


async def _execute(transport: Transport, commands: list[Command]) -> bool:
    """Carry out the commands; True once the day has ended."""
    ended = False
    for command in commands:
        if isinstance(command, PublishGrant):
            payload = command.grant.model_dump_json().encode()
            await transport.publish(topics.clock_grant(command.grant.phase), payload, qos=1, retain=True)
        elif isinstance(command, PublishStatus):
            payload = command.status.model_dump_json().encode()
            await transport.publish(topics.CLOCK_STATUS, payload, qos=1, retain=True)
        elif isinstance(command, Report):
            log.warning("%s", command.text)
        elif isinstance(command, Ended):
            ended = True
    if ended:
        await clear_grants(transport)
        log.info("the last step is over")
    return ended


# -- the entry point ------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="The lockstep clock's granter.")
    p.add_argument("--config", type=Path, help="a YAML or JSON settings file")
    p.add_argument("--secrets-dir", type=Path, help="a directory of secret files")
    p.add_argument("--broker", help="mqtt://[user:password@]host[:port], or mqtts:// for TLS")
    p.add_argument("--username")
    p.add_argument("--password-file", type=Path, help="a file holding the broker password")
    p.add_argument("--ca-cert", type=Path, help="the CA certificate of an mqtts:// broker")
    p.add_argument("--client-id", help="default: clock")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--start", help="t_0, an ISO 8601 time with its zone")
    p.add_argument("--step-s", type=float, help="simulated seconds per step (default 5)")
    p.add_argument("--end", help="no step after this ISO 8601 time")
    p.add_argument("--hours", type=float, help="or: the end, this many hours after the start")
    p.add_argument("--members", help="the expected members: name:phase,... (plant, control, grid)")
    p.add_argument("--join-timeout-s", type=float, help="then step 0 goes ahead without the missing")
    p.add_argument("--silence-timeout-s", type=float, help="a granted member this long silent is left out")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    settings = setup(PROG, LockstepSettings, parser().parse_args(argv))
    if isinstance(settings, int):
        return settings

    async def serve() -> int:
        granter = Granter(granter_config(settings))
        async with service_transport(settings, "clock", None) as transport:
            return await run_granter(transport, granter)

    return run_service(PROG, serve)


if __name__ == "__main__":
    sys.exit(main())
