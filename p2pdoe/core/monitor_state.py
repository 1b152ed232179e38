"""What the MQTT topics say, folded message by message into the latest view of each site and of the
coordinator (pure, no I/O): the monitor draws it, the CSIP-AUS server serves its envelopes."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from p2pdoe.core import topics
from p2pdoe.core.schemas.messages import Message
from p2pdoe.core.schemas.runtime import (
    Doe,
    DsoStatus,
    Progress,
    Registration,
    Runtime,
    SiteStatus,
    Telemetry,
    decode_runtime,
)
from p2pdoe.core.schemas.wire import WireError

log = logging.getLogger(__name__)

MARKET_ROUNDS_KEPT = 16  # message counts are kept for the latest rounds only

# Topic kind -> (the message it carries, the attribute of the view that holds it).
SITE_SLOTS: dict[str, tuple[type[Message], str]] = {
    "doe": (Doe, "doe"),
    "doe/default": (Doe, "default"),
    "status": (SiteStatus, "status"),
    "register": (Registration, "registration"),
    "telemetry": (Telemetry, "telemetry"),
}
DSO_SLOTS: dict[str, tuple[type[Message], str]] = {
    "status": (DsoStatus, "status"),
    "progress": (Progress, "progress"),
}
RETAINED_SITE_KINDS = frozenset({"doe", "doe/default", "status", "register"})
RETAINED_DSO_KINDS = frozenset({"status"})


# -- the state: pure, no I/O -----------------------------------------------------------------------


@dataclass
class SiteView:
    """The latest of each retained topic of one site, and its latest telemetry."""

    status: SiteStatus | None = None
    registration: Registration | None = None
    doe: Doe | None = None
    default: Doe | None = None
    telemetry: Telemetry | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, name) is None for _, name in SITE_SLOTS.values())


@dataclass
class CoordinatorView:
    status: DsoStatus | None = None
    progress: Progress | None = None


@dataclass
class MonitorState:
    """Everything the topics say, folded message by message. Malformed messages are counted by reason
    in `dropped` and otherwise ignored."""

    sites: dict[str, SiteView] = field(default_factory=dict)
    coordinator: CoordinatorView = field(default_factory=CoordinatorView)
    dropped: Counter[str] = field(default_factory=Counter)
    market_messages: Counter[str] = field(default_factory=Counter)  # per round
    last_message_at: datetime | None = None  # when the latest message of any kind arrived

    def apply(self, topic: str, payload: bytes, now: datetime) -> None:
        """Fold in one message that arrived at `now`."""
        self.last_message_at = now
        parsed = topics.parse(topic)
        if parsed is None:
            self._drop("unknown_topic", topic, "not a topic of the tree")
        elif parsed.area == "market":
            self._count_market(parsed.round or "")
        elif parsed.area == "dso":
            self._apply_to(self.coordinator, DSO_SLOTS, RETAINED_DSO_KINDS, parsed, topic, payload)
        elif parsed.kind in SITE_SLOTS and parsed.site is not None:
            view = self.sites.setdefault(parsed.site, SiteView())
            self._apply_to(view, SITE_SLOTS, RETAINED_SITE_KINDS, parsed, topic, payload)
            if view.is_empty():
                del self.sites[parsed.site]
        # A site's meter topic has no schema yet (issue 5): nothing to show.

    def _apply_to(
        self,
        view: SiteView | CoordinatorView,
        slots: dict[str, tuple[type[Message], str]],
        retained_kinds: frozenset[str],
        parsed: topics.Topic,
        topic: str,
        payload: bytes,
    ) -> None:
        expected, slot = slots[parsed.kind]
        if not payload:
            if parsed.kind in retained_kinds:  # a retained message was deleted
                setattr(view, slot, None)
            else:
                self._drop("empty", topic, "empty payload")
            return
        message = self._decode(topic, payload)
        if message is None:
            return
        if not isinstance(message, expected):
            self._drop("wrong_kind", topic, f"a {message.kind} message")
        elif parsed.site is not None and getattr(message, "site", None) != parsed.site:
            self._drop("site_mismatch", topic, f"site {getattr(message, 'site', None)!r}")
        else:
            setattr(view, slot, message)

    def _decode(self, topic: str, payload: bytes) -> Runtime | None:
        try:
            return decode_runtime(payload)
        except ValidationError as exc:
            kinds = {error["type"] for error in exc.errors()}
            self._drop("not_finite" if "finite_number" in kinds else "schema", topic, str(exc))
        except WireError as exc:
            self._drop(_wire_reason(exc), topic, str(exc))
        return None

    def _drop(self, reason: str, topic: str, detail: str) -> None:
        self.dropped[reason] += 1
        log.debug("dropped a message on %s (%s): %s", topic, reason, detail)

    def _count_market(self, round_id: str) -> None:
        if round_id not in self.market_messages and len(self.market_messages) >= MARKET_ROUNDS_KEPT:
            del self.market_messages[next(iter(self.market_messages))]  # the oldest round seen
        self.market_messages[round_id] += 1

    def snapshot(self, now: datetime | None = None) -> dict[str, Any]:
        """A JSON-serialisable view; envelope validity and telemetry ages as of `now`."""
        moment = now or datetime.now(UTC)
        return {
            "at": _iso(moment),
            "last_message_at": _iso(self.last_message_at) if self.last_message_at else None,
            "sites": {sid: _site_snapshot(self.sites[sid], moment) for sid in sorted(self.sites)},
            "coordinator": _coordinator_snapshot(self.coordinator),
            "market_messages": dict(self.market_messages),
            "dropped": dict(sorted(self.dropped.items())),
        }


def _wire_reason(exc: WireError) -> str:
    text = str(exc)
    if "repeats the key" in text:
        return "repeated_key"
    if "exceeds the limit" in text:
        return "too_large"
    return "not_json"


def validity(doe: Doe, now: datetime) -> str:
    """At `now`: in_force, expired (past its end: never applied) or pending (not yet started)."""
    if doe.valid_at(now):
        return "in_force"
    return "expired" if now >= doe.end else "pending"


def within_eps(progress: Progress) -> dict[str, bool]:
    """Per coupling, whether both residuals are within its threshold (the coordinator tests the
    dual residual against the same threshold as the primal one); and whether the prices have
    settled, when the coordinator reports it; and, in an iteration that froze sites (bounded
    staleness), that not every site was new. A round converges when every entry is true."""
    within = {
        "trade": max(progress.primal_trade_kw, progress.dual_trade_kw) <= progress.eps_trade_kw,
        "envelope": max(progress.primal_envelope_kw, progress.dual_envelope_kw) <= progress.eps_envelope_kw,
    }
    if progress.prices_settled is not None:
        within["prices"] = progress.prices_settled
    if progress.frozen_sites:
        within["every_site_new"] = False
    return within


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _fields(message: Message, *leave_out: str) -> dict[str, Any]:
    data: dict[str, Any] = message.model_dump(mode="json", exclude={"schema_version", "kind", *leave_out})
    return data


def _doe_snapshot(doe: Doe | None, now: datetime) -> dict[str, Any] | None:
    if doe is None:
        return None
    return {**_fields(doe, "site"), "end": _iso(doe.end), "validity": validity(doe, now)}


def _site_snapshot(view: SiteView, now: datetime) -> dict[str, Any]:
    telemetry = None
    if view.telemetry is not None:
        age_s = round((now - view.telemetry.ts).total_seconds(), 1)
        telemetry = {**_fields(view.telemetry, "site"), "age_s": age_s}
    return {
        "bus": view.registration.bus if view.registration else None,
        "status": _fields(view.status, "site") if view.status else None,
        "doe": _doe_snapshot(view.doe, now),
        "default": _doe_snapshot(view.default, now),
        "telemetry": telemetry,
    }


def _coordinator_snapshot(view: CoordinatorView) -> dict[str, Any]:
    progress = None
    if view.progress is not None:
        progress = {**_fields(view.progress), "within_eps": within_eps(view.progress)}
    return {"status": _fields(view.status) if view.status else None, "progress": progress}
