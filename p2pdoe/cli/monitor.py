"""`p2pdoe monitor`: a live view of the system from its MQTT topics alone.

`MonitorState` (p2pdoe.core.monitor_state, no I/O) folds every message of the topic tree into the
latest view of each site and of the coordinator; `run_monitor` feeds it from a broker and draws it
with rich. The monitor only reads:
it never publishes and registers no last will.

Only the standard library and p2pdoe.core are imported here: this module is loaded whenever the
command line's parser is built. rich (the `report` extra) and the transport are imported when used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from p2pdoe.cli.console import make_console
from p2pdoe.core import topics
from p2pdoe.core.monitor_state import (  # noqa: F401 (MARKET_ROUNDS_KEPT: read where the monitor is)
    MARKET_ROUNDS_KEPT,
    CoordinatorView,
    MonitorState,
    SiteView,
    validity,
)
from p2pdoe.core.schemas.runtime import (
    Doe,
    Progress,
    SiteStatus,
    Telemetry,
)
from p2pdoe.errors import P2PDoeError
from p2pdoe.report.numbers import fixed
from p2pdoe.services.provision import Access

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from rich.console import Console, RenderableType
    from rich.live import Live

    from p2pdoe.services.signing import SignedTransport
    from p2pdoe.services.transport import MqttTransport

log = logging.getLogger(__name__)

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
SUBSCRIPTION = f"{topics.ROOT}/#"
REFRESH_S = 0.25  # at most four redraws a second

# -- rendering (rich, imported lazily) -------------------------------------------------------------

SITE_COLUMNS = (
    "site",
    "bus",
    "status",
    "applies",
    "DOE kW",
    "imp/exp kW",
    "until",
    "round",
    "default kW",
    "p kW",
    "inside",
    "age",
)
NUMERIC_COLUMNS = frozenset({"bus", "p kW", "age"})
VALIDITY_MARKS = {"in_force": "", "expired": " [red]expired[/]", "pending": " [yellow]pending[/]"}


def _kw(value: float) -> str:
    return fixed(value)


def _box(doe: Doe) -> str:
    return f"{_kw(doe.lo_kw)}…{_kw(doe.up_kw)}"


def _clock(moment: datetime, now: datetime) -> str:
    """The time of day in UTC, with the date when it is not today's."""
    moment, today = moment.astimezone(UTC), now.astimezone(UTC)
    return f"{moment:%H:%M}Z" if moment.date() == today.date() else f"{moment:%Y-%m-%d %H:%M}Z"


def _status_cells(status: SiteStatus | None) -> list[str]:
    if status is None:
        return ["?", "?"]
    colour = "green" if status.state == "online" else "red"
    return [f"[{colour}]{status.state}[/]", status.envelope]


def _doe_cells(doe: Doe | None, now: datetime) -> list[str]:
    """Box, CSIP-AUS limits, end (marked when not in force) and round of the envelope in force."""
    if doe is None:
        return ["-", "-", "-", "-"]
    limits = f"{_kw(doe.opModImpLimW / 1e3)}/{_kw(doe.opModExpLimW / 1e3)}"
    until = _clock(doe.end, now) + VALIDITY_MARKS[validity(doe, now)]
    return [_box(doe), limits, until, doe.round or "-"]


def _default_cell(doe: Doe | None, now: datetime) -> str:
    """The default's box in force now (a profile's step then)."""
    if doe is None:
        return "-"
    lo, up = doe.box_at(now)
    return f"{_kw(lo)}…{_kw(up)}" + VALIDITY_MARKS[validity(doe, now)]


def _telemetry_cells(telemetry: Telemetry | None, now: datetime) -> list[str]:
    if telemetry is None:
        return ["-", "-", "-"]
    inside = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[telemetry.inside]
    age_s = (now - telemetry.ts).total_seconds()
    return [_kw(telemetry.p_kw), inside, f"{age_s:.1f}s"]


def site_row(site_id: str, view: SiteView, now: datetime) -> list[str]:
    bus = str(view.registration.bus) if view.registration else "-"
    return [
        site_id,
        bus,
        *_status_cells(view.status),
        *_doe_cells(view.doe, now),
        _default_cell(view.default, now),
        *_telemetry_cells(view.telemetry, now),
    ]


def _residuals(name: str, primal: float, dual: float, eps: float) -> str:
    colour = "green" if max(primal, dual) <= eps else "yellow"
    return f"{name} primal {primal:.3g} dual {dual:.3g} [{colour}]eps {eps:.3g}[/] kW"


def _price_move(p: Progress) -> list[str]:
    if p.prices_settled is None:
        return []
    colour = "green" if p.prices_settled else "yellow"
    moved, eps = p.price_change_max_eur_per_kwh, p.eps_price_eur_per_kwh
    return [f"prices moved {moved:.3g} [{colour}]eps {eps:.3g}[/] EUR/kWh"]


def _progress_line(p: Progress) -> str:
    parts = [
        f"round {p.round} iteration {p.iteration} {p.status}",
        _residuals("trade", p.primal_trade_kw, p.dual_trade_kw, p.eps_trade_kw),
        _residuals("envelope", p.primal_envelope_kw, p.dual_envelope_kw, p.eps_envelope_kw),
        *_price_move(p),
        f"{len(p.sites)} sites",
    ]
    if p.excluded_sites:
        parts.append(f"excluded: {', '.join(p.excluded_sites)}")
    if p.missing_sites:
        parts.append(f"[red]missing: {', '.join(p.missing_sites)}[/]")
    if p.frozen_sites:
        parts.append(f"[yellow]frozen: {', '.join(p.frozen_sites)}[/]")
    return " · ".join(parts)


def coordinator_line(view: CoordinatorView) -> str:
    status = view.status
    if status is None:
        head = "coordinator ?"
    else:
        colour = "green" if status.state == "online" else "red"
        head = f"coordinator [{colour}]{status.state}[/] (round {status.round or '-'})"
        if status.day is not None:
            head += f" · day {status.day.isoformat()}"
        if status.next_round is not None:
            head += f" · next day: {status.next_round} ({status.next_phase or '-'})"
    if view.progress is None:
        return head
    return f"{head} · {_progress_line(view.progress)}"


def without_credentials(url: str) -> str:
    """The broker URL without user and password, fit to be shown."""
    parts = urlsplit(url)
    if parts.hostname is None or "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()


def footer_line(state: MonitorState, now: datetime, broker: str, connected: bool) -> str:
    """`broker` must already be escaped for rich markup."""
    link = "[green]connected[/]" if connected else "[red]reconnecting[/]"
    last = state.last_message_at
    heard = "nothing heard" if last is None else f"last message {(now - last).total_seconds():.1f}s ago"
    dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(state.dropped.items())) or "none"
    line = f"broker {broker} {link} · {heard} · dropped: {dropped}"
    rounds = list(state.market_messages)
    if rounds:
        line += f" · market messages in round {rounds[-1]}: {state.market_messages[rounds[-1]]}"
    return line


def render(state: MonitorState, now: datetime, broker: str, connected: bool = True) -> RenderableType:
    from rich import box
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    title = f"sites at {now.astimezone(UTC):%H:%M:%S}Z"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name in SITE_COLUMNS:
        table.add_column(name, justify="right" if name in NUMERIC_COLUMNS else "left")
    for site_id in sorted(state.sites):
        table.add_row(*site_row(site_id, state.sites[site_id], now))
    return Group(
        Text.from_markup(coordinator_line(state.coordinator)),
        table,
        Text.from_markup(footer_line(state, now, escape(without_credentials(broker)), connected)),
    )


def bridge_word(up: bool | None) -> str:
    return {True: "up", False: "down", None: "not heard"}[up]


def render_feeders(
    states: Mapping[str, MonitorState],
    now: datetime,
    broker: str,
    connected: Mapping[str, bool],
    bridges: Mapping[str, bool | None],
) -> RenderableType:
    """Each feeder's view, under its name and its bridge's state (read through the DSO's core broker)."""
    from rich.console import Group
    from rich.markup import escape
    from rich.text import Text

    parts: list[RenderableType] = []
    for feeder, state in states.items():
        up = bridges.get(feeder)
        colour = {True: "green", False: "red", None: "yellow"}[up]
        heading = f"[bold]feeder {escape(feeder)}[/] · bridge [{colour}]{bridge_word(up)}[/]"
        parts += [Text.from_markup(heading), render(state, now, broker, connected[feeder])]
    return Group(*parts)


# -- the command -------------------------------------------------------------------------------------


def add_monitor_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--broker", default=DEFAULT_BROKER, help=f"the broker URL, or mqtts:// (default {DEFAULT_BROKER})"
    )
    p.add_argument("--password-file", type=Path, help="a file holding the password (the bundle's monitor)")
    p.add_argument("--ca-cert", type=Path, help="the CA certificate of an mqtts:// broker (the bundle's)")
    p.add_argument(
        "--trusted-keys", type=Path, help="public-keys.json: show only messages their owners signed"
    )
    p.add_argument(
        "--feeder",
        action="append",
        type=_feeder,
        metavar="ID[=KEYS]",
        help="on the DSO's core broker: show feeder ID (its tree under feeder/ID/), its signatures checked "
        "against KEYS (the core bundle's feeders/ID/public-keys.json; default --trusted-keys); repeatable",
    )
    p.add_argument("--duration", type=_positive, metavar="S", help="stop after S seconds (default: Ctrl-C)")
    p.add_argument("--once", action="store_true", help="gather the retained state, print it once and exit")
    p.add_argument(
        "--settle", type=_positive, default=1.0, metavar="S", help="with --once: listen S seconds (default 1)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON snapshot (implies --once)")
    p.add_argument(
        "--connect-timeout",
        type=_positive,
        default=10.0,
        metavar="S",
        help="give up if the broker cannot be reached within S seconds (default 10)",
    )


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _feeder(text: str) -> tuple[str, Path | None]:
    feeder, _, keys = text.partition("=")
    if not topics.FEEDER_ID.match(feeder):
        raise argparse.ArgumentTypeError(
            f"not a feeder id: {feeder!r} (lower-case letters, digits, '-', '_')"
        )
    return feeder, Path(keys) if keys else None


def run_monitor(args: argparse.Namespace) -> int:
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a live monitor ends
        asyncio.run(_monitor(args))
    return 0


def _now() -> datetime:
    return datetime.now(UTC)


async def _monitor(args: argparse.Namespace) -> None:
    access = Access(args.broker, args.password_file, args.ca_cert, trusted_keys=args.trusted_keys)
    if args.feeder:
        await _monitor_feeders(args, access)
        return
    transport = await _connect(access, args.connect_timeout)
    try:
        await transport.subscribe(SUBSCRIPTION)
        states = {"": MonitorState()}
        if args.once or args.json:
            await _gather(transport, states[""], args.settle)
            _print_once(states, args)
        else:
            await _watch({"": transport}, states, args)
    finally:
        await transport.close()


async def _monitor_feeders(args: argparse.Namespace, access: Access) -> None:
    """Each `--feeder` through the DSO's core broker, on one connection (one per identity there)."""
    from p2pdoe.services.feeder_views import FeederViews
    from p2pdoe.services.signing import SignedTransport, Signer, read_public_keys
    from p2pdoe.services.transport import connect_within

    keys = _feeder_keys(args)
    trusted = {f: None if k is None else read_public_keys(k) for f, k in keys.items()}
    client_id = f"p2pdoe-monitor-{secrets.token_hex(4)}"
    inner = await connect_within(access.url, client_id, args.connect_timeout, **access.transport_options())
    try:
        views = FeederViews(inner, list(keys))
        await views.watch_bridges()
        feeds = {f: SignedTransport(views.view(f), Signer(f"monitor/{f}", None), trusted[f]) for f in keys}
        for transport in feeds.values():
            await transport.subscribe(SUBSCRIPTION)
        states = {f: MonitorState() for f in keys}
        reader = asyncio.create_task(views.run(), name="feeder-views")
        try:
            if args.once or args.json:
                await asyncio.gather(*(_gather(feeds[f], states[f], args.settle) for f in keys))
                _print_once(states, args, views.bridge)
            else:
                await _watch(feeds, states, args, views.bridge)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    finally:
        await inner.close()


def _feeder_keys(args: argparse.Namespace) -> dict[str, Path | None]:
    """Each --feeder's public keys (its own, else --trusted-keys, else none: said aloud)."""
    keys: dict[str, Path | None] = {}
    for feeder, own in args.feeder:
        if feeder in keys:
            raise P2PDoeError(f"--feeder {feeder} is given twice")
        keys[feeder] = own or args.trusted_keys
        if keys[feeder] is None:
            log.warning(
                "feeder %s: no public keys (--feeder %s=KEYS): its messages are unchecked", feeder, feeder
            )
    return keys


async def _connect(access: Access, timeout_s: float) -> MqttTransport | SignedTransport:
    """A connected, read-only transport; P2PDoeError if the broker stays unreachable for `timeout_s`."""
    return await access.connect(f"p2pdoe-monitor-{secrets.token_hex(4)}", timeout_s)


async def _gather(
    transport: MqttTransport | SignedTransport, state: MonitorState, seconds: float | None
) -> None:
    """Apply every message for `seconds` (None: until the transport closes)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for message in transport.messages():
                state.apply(message.topic, message.payload, _now())


def _print_once(
    states: Mapping[str, MonitorState],
    args: argparse.Namespace,
    bridges: Mapping[str, bool | None] | None = None,
) -> None:
    now = _now()
    if args.json:
        print(json.dumps(_snapshot(states, now, bridges), indent=1))
        return
    _console().print(_view(states, now, args.broker, dict.fromkeys(states, True), bridges))


def _snapshot(
    states: Mapping[str, MonitorState], now: datetime, bridges: Mapping[str, bool | None] | None
) -> dict[str, Any]:
    if bridges is None:
        return states[""].snapshot(now)
    return {
        "feeders": {f: {**s.snapshot(now), "bridge": bridge_word(bridges.get(f))} for f, s in states.items()}
    }


def _view(
    states: Mapping[str, MonitorState],
    now: datetime,
    broker: str,
    connected: Mapping[str, bool],
    bridges: Mapping[str, bool | None] | None = None,
) -> RenderableType:
    if bridges is None:
        return render(states[""], now, broker, connected[""])
    return render_feeders(states, now, broker, connected, bridges)


def _console() -> Console:
    return make_console()


async def _watch(
    transports: Mapping[str, MqttTransport | SignedTransport],
    states: Mapping[str, MonitorState],
    args: argparse.Namespace,
    bridges: Mapping[str, bool | None] | None = None,
) -> None:
    from rich.live import Live

    def view() -> RenderableType:
        connected = {name: bool(t.connected) for name, t in transports.items()}
        return _view(states, _now(), args.broker, connected, bridges)

    with Live(view(), console=_console(), auto_refresh=False) as live:
        painter = asyncio.create_task(_paint(live, view))
        try:
            await asyncio.gather(*(_gather(transports[n], states[n], args.duration) for n in states))
        finally:
            painter.cancel()
            live.update(view(), refresh=True)


async def _paint(live: Live, view: Callable[[], RenderableType]) -> None:
    while True:
        live.update(view(), refresh=True)
        await asyncio.sleep(REFRESH_S)
