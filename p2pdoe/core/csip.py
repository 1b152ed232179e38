"""The envelopes as CSIP-AUS (IEEE 2030.5) resources: pure, no I/O (the server: p2pdoe.services.csip_server).

Each site is one EndDevice, identified by its certificate's LFDI, with one FunctionSetAssignments and
one DERProgram. The program's DefaultDERControl is the site's retained default envelope; each agreed
interval (`doe`, round set) is a DERControl. A control that a newer round replaces on an overlapping
interval stays listed as superseded; a control leaves the list once over (its href answers a day
longer). A site sees only its own resources. The XML models are
envoy-schema's (the `csip` extra), loaded only by whoever imports this module.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

from envoy_schema.server.schema.csip_aus.connection_point import ConnectionPointLink, ConnectionPointResponse
from envoy_schema.server.schema.sep2 import der, event, response, types
from envoy_schema.server.schema.sep2.base import nsmap
from envoy_schema.server.schema.sep2.der_control_types import ActivePower
from envoy_schema.server.schema.sep2.device_capability import DeviceCapabilityResponse
from envoy_schema.server.schema.sep2.end_device import (
    EndDeviceListResponse,
    EndDeviceResponse,
    RegistrationResponse,
)
from envoy_schema.server.schema.sep2.function_set_assignments import (
    FunctionSetAssignmentsListResponse,
    FunctionSetAssignmentsResponse,
)
from envoy_schema.server.schema.sep2.identification import Link, ListLink
from envoy_schema.server.schema.sep2.metering_mirror import MirrorUsagePointListResponse
from envoy_schema.server.schema.sep2.primitive_types import HexBinary8
from envoy_schema.server.schema.sep2.time import TimeResponse
from pydantic import ValidationError
from pydantic_xml import BaseXmlModel, element
from pydantic_xml.errors import ParsingError

from p2pdoe.core.csip_ids import sfdi
from p2pdoe.core.schemas.runtime import Doe

CONTENT_TYPE = "application/sep+xml"
PROGRAM = "doe"  # the one DERProgram of a site
FSA = "1"  # its one FunctionSetAssignments
DER_ID = "1"  # its one DER: the site's assets behind the connection point, as one


class ReportedCapability(der.DERCapability, tag="DERCapability"):
    """A DERCapability as devices send it: some (py20305's) leave out CSIP-AUS's doeModesSupported."""

    doeModesSupported: HexBinary8 | None = element(ns="csipaus", default=None)  # type: ignore[assignment]  # noqa: N815


# What a device reports of its DER (PUT), kept as last reported and read back.
REPORTED: dict[str, type[BaseXmlModel]] = {
    "dercap": ReportedCapability,
    "derg": der.DERSettings,
    "ders": der.DERStatus,
    "dera": der.DERAvailability,
}
DEFAULT_LIMIT = 1  # 2030.5: a list read without `l` gets one entry
MAX_PEN = 99_999_999  # the PEN fills the mRID's last 8 digits, in decimal
RESPONSE_REQUIRED = "03"  # message received and specific response (CSIP-AUS)
PRIMACY = 2  # 2030.5 PrimacyType 2, a non-contractual service provider: the DSO, to a site
POLL_RATE_S = 60
KEPT = timedelta(days=1)  # a control's own href answers until a day past its end (Responses name it)
ANSWERS_KEPT = 1000  # per site: a device posting on and on cannot fill the memory
INT16_MAX = 32_767
TIME_QUALITY = types.TimeQualityType.level_3_source  # the host's clock, synchronised (NTP)
# The csipaus namespace per CSIP-AUS version; envoy-schema writes 1.3's, 1.2's XSD wants its own.
CSIPAUS_NAMESPACES = {"1.2": "https://csipaus.org/ns", "1.3": "https://csipaus.org/ns/v1.3"}


# -- identities ---------------------------------------------------------------------------------------


def mrid(pen: int, *parts: str) -> str:
    """A 128-bit mRID, upper-case hex: 96 bits of a hash of `parts`, then the PEN in 8 decimal digits."""
    if not 0 <= pen <= MAX_PEN:
        raise ValueError(f"a PEN has at most 8 decimal digits, not {pen}")
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24].upper()
    return f"{digest}{pen:08d}"


def active_power(watts: float) -> ActivePower:
    """`watts` rounded down (a limit only ever tightens) as an Int16 value times 10^multiplier."""
    multiplier, value = 0, math.floor(watts)
    while abs(value) > INT16_MAX:
        multiplier += 1
        value = math.floor(watts / 10**multiplier)
    return ActivePower(multiplier=multiplier, value=value)


def epoch(moment: datetime) -> int:
    return int(moment.timestamp())


# -- the state: what the envelopes said, folded in --------------------------------------------------


@dataclass
class Control:
    """One agreed interval as a DERControl: when the server heard it; and, once a newer round set an
    overlapping interval, when it is superseded (the newer one's start, 2030.5's rule) and when the
    server learned it."""

    doe: Doe
    mrid: str
    created: datetime
    superseded_at: datetime | None = None
    flagged_at: datetime | None = None

    def overlaps(self, doe: Doe) -> bool:
        return self.doe.start < doe.end and doe.start < self.doe.end

    def superseded(self, now: datetime) -> bool:
        return self.superseded_at is not None and now >= self.superseded_at

    def supersede(self, newer: Doe, now: datetime) -> None:
        """From the newer one's start on (the earliest of the newer ones, if several)."""
        at = max(now, newer.start)
        if self.superseded_at is None or at < self.superseded_at:
            self.superseded_at = at
        self.flagged_at = self.flagged_at or now


@dataclass
class Answer:
    """A device's Response to a control, as posted."""

    subject: str
    status: response.ResponseType | None
    lfdi: str
    created: datetime


@dataclass
class SiteControls:
    """One site's envelopes: its default, its controls (superseded ones kept), the responses."""

    site: str
    pen: int
    default: Doe | None = None
    fail_safe: Doe | None = None  # served while no default is valid (csip-server --fail-safe-*)
    controls: list[Control] = field(default_factory=list)
    heard: int = 0  # envelopes made controls: each control's mRID is its own
    answers: dict[int, Answer] = field(default_factory=dict)  # by number, the latest ANSWERS_KEPT
    answered: int = 0  # how many were ever posted: the next one's number
    reported: dict[str, BaseXmlModel] = field(default_factory=dict)  # REPORTED's kind -> the latest

    def hear(self, doe: Doe, now: datetime, default: bool = False) -> None:
        """Fold in an envelope: the default (`default`: heard on `doe/default`) replaces the default;
        an interval's envelope (agreed, or the site's default for it when a round left it out)
        becomes a control and supersedes the controls it overlaps. As for an edge agent, the last
        heard for an interval wins: only a repeat of the control in force changes nothing."""
        if default:
            self.default = doe
            return
        key = doe.model_dump_json()
        newest = next((c for c in reversed(self.controls) if c.overlaps(doe)), None)
        if newest is not None and newest.doe.model_dump_json() == key:
            return
        for c in self.controls:
            if c.overlaps(doe):
                c.supersede(doe, now)
        self.heard += 1
        self.controls.append(Control(doe, mrid(self.pen, "derc", key, str(self.heard)), now))
        self._forget(now)

    def default_at(self, now: datetime) -> Doe | None:
        """The default in force: the one heard while it is valid, else the fail-safe (a lapsed or
        pending default is not the DSO's: edge agents fall back on their fixed default then)."""
        if self.default is not None and self.default.valid_at(now):
            return self.default
        return self.fail_safe

    def _forget(self, now: datetime) -> None:
        self.controls = [c for c in self.controls if c.doe.end + KEPT > now]

    def ordered(self) -> list[Control]:
        """2030.5's order of events: start ascending, then creation and mRID descending."""
        by_newest = sorted(self.controls, key=lambda c: (c.created, c.mrid), reverse=True)
        return sorted(by_newest, key=lambda c: c.doe.start)

    def listed(self, now: datetime) -> list[Control]:
        """The DERControlList: the controls not yet over, in 2030.5's order. A completed one leaves
        the list at its end (CSIP-AUS S-ALL-41 reads the list empty 20 s after its control completed)
        rather than stay there as active."""
        return [c for c in self.ordered() if now < c.doe.end]

    def keep(self, answer: Answer) -> int:
        """Keep a posted Response (the oldest forgotten beyond ANSWERS_KEPT); its number."""
        number, self.answered = self.answered, self.answered + 1
        self.answers[number] = answer
        self.answers.pop(number - ANSWERS_KEPT, None)
        return number

    def find(self, control_mrid: str) -> Control | None:
        return next((c for c in self.controls if c.mrid == control_mrid), None)


@dataclass(frozen=True)
class Device:
    """A site's client device: the LFDI of its certificate; its registration PIN and time."""

    site: str
    lfdi: str
    pin: int | None = None
    registered: datetime | None = None

    @property
    def sfdi(self) -> int:
        return sfdi(self.lfdi)


# -- the resources --------------------------------------------------------------------------------


def edev(site: str) -> str:
    return f"/edev/{site}"


def der_href(site: str) -> str:
    return f"{edev(site)}/der/{DER_ID}"


def program_href(site: str) -> str:
    return f"{edev(site)}/derp/{PROGRAM}"


def responses_href(site: str) -> str:
    return f"{edev(site)}/rsp"


def device_capability(device: Device) -> DeviceCapabilityResponse:
    return DeviceCapabilityResponse(
        href="/dcap",
        pollRate=POLL_RATE_S,
        EndDeviceListLink=ListLink(href="/edev", all_=1),
        MirrorUsagePointListLink=ListLink(href="/mup", all_=0),
        TimeLink=Link(href="/tm"),
    )


def time_now(now: datetime) -> TimeResponse:
    """The server's time in UTC (no daylight saving)."""
    t = epoch(now)
    return TimeResponse(
        href="/tm", currentTime=t, dstEndTime=0, dstOffset=0, dstStartTime=0, localTime=t,
        quality=TIME_QUALITY, tzOffset=0,
    )  # fmt: skip


def end_device(device: Device, now: datetime) -> EndDeviceResponse:
    base = edev(device.site)
    registered = device.pin is not None and device.registered is not None
    return EndDeviceResponse(
        href=base,
        DERListLink=ListLink(href=f"{base}/der", all_=1),
        lFDI=device.lfdi,
        sFDI=device.sfdi,
        changedTime=epoch(now),
        enabled=True,
        FunctionSetAssignmentsListLink=ListLink(href=f"{base}/fsa", all_=1),
        RegistrationLink=Link(href=f"{base}/rg") if registered else None,
        ConnectionPointLink=ConnectionPointLink(href=f"{base}/cp"),
    )


def registration(device: Device) -> RegistrationResponse | None:
    if device.pin is None or device.registered is None:
        return None
    return RegistrationResponse(
        href=f"{edev(device.site)}/rg", dateTimeRegistered=epoch(device.registered), pIN=device.pin
    )


def connection_point(device: Device) -> ConnectionPointResponse:
    """The connection point, named by the site's id (p2pdoe knows no NMI)."""
    return ConnectionPointResponse(href=f"{edev(device.site)}/cp", id=device.site)


def der_of(device: Device) -> der.DER:
    """The site's one DER: links to what its device reports, and to the site's program."""
    href = der_href(device.site)
    return der.DER(
        href=href,
        AssociatedDERProgramListLink=ListLink(href=f"{edev(device.site)}/derp", all_=1),
        CurrentDERProgramLink=Link(href=program_href(device.site)),
        DERAvailabilityLink=Link(href=f"{href}/dera"),
        DERCapabilityLink=Link(href=f"{href}/dercap"),
        DERSettingsLink=Link(href=f"{href}/derg"),
        DERStatusLink=Link(href=f"{href}/ders"),
    )


def function_set_assignments(device: Device, pen: int) -> FunctionSetAssignmentsResponse:
    return FunctionSetAssignmentsResponse(
        href=f"{edev(device.site)}/fsa/{FSA}",
        mRID=mrid(pen, "fsa", device.site),
        description=f"p2pdoe envelopes of {device.site}",
        DERProgramListLink=ListLink(href=f"{edev(device.site)}/derp", all_=1),
        TimeLink=Link(href="/tm"),
    )


def program(site: SiteControls, now: datetime) -> der.DERProgramResponse:
    href = program_href(site.site)
    return der.DERProgramResponse(
        href=href,
        mRID=mrid(site.pen, "derp", site.site),
        description="dynamic operating envelopes",
        primacy=PRIMACY,
        DefaultDERControlLink=None if site.default_at(now) is None else Link(href=f"{href}/dderc"),
        DERControlListLink=ListLink(href=f"{href}/derc", all_=len(site.listed(now))),
        ActiveDERControlListLink=ListLink(href=f"{href}/actderc", all_=len(active(site, now))),
    )


def limits(doe: Doe) -> der.DERControlBase:
    """The CSIP-AUS site limits at the connection point, never looser than the signed box (its
    CSIP-AUS fields may exceed it by a rounding watt); opModGenLimW and opModLoadLimW limit single
    DERs, which an envelope does not name: left out."""
    imp = min(doe.opModImpLimW, max(0.0, -doe.lo_kw) * 1e3)
    exp = min(doe.opModExpLimW, max(0.0, doe.up_kw) * 1e3)
    return der.DERControlBase(opModImpLimW=active_power(imp), opModExpLimW=active_power(exp))


def default_control(site: SiteControls, now: datetime) -> der.DefaultDERControl | None:
    default = site.default_at(now)
    if default is None:
        return None
    return der.DefaultDERControl(
        href=f"{program_href(site.site)}/dderc",
        mRID=mrid(site.pen, "dderc", default.model_dump_json()),
        description="default envelope"
        if default is site.default
        else "fail-safe default (no valid default heard)",
        DERControlBase_=limits(default),
    )


def event_status(control: Control, now: datetime) -> event.EventStatus:
    """Scheduled, active, or superseded from the newer control's start on; until then flagged as
    potentially superseded (since the server learned it)."""
    if control.superseded(now) and control.superseded_at is not None:
        status, since = event.EventStatusType.Superseded, control.superseded_at
    elif now < control.doe.start:
        status, since = event.EventStatusType.Scheduled, control.created
    else:
        status, since = event.EventStatusType.Active, max(control.created, control.doe.start)
    pending = control.flagged_at if not control.superseded(now) else None
    return event.EventStatus(
        currentStatus=int(status),
        dateTime=epoch(since),
        potentiallySuperseded=pending is not None,
        potentiallySupersededTime=None if pending is None else epoch(pending),
    )


def control(site: SiteControls, c: Control, now: datetime) -> der.DERControlResponse:
    return der.DERControlResponse(
        href=f"{program_href(site.site)}/derc/{c.mrid}",
        replyTo=responses_href(site.site),
        responseRequired=RESPONSE_REQUIRED,
        mRID=c.mrid,
        description="the default for the interval" if c.doe.round is None else f"round {c.doe.round}",
        creationTime=epoch(c.created),
        EventStatus_=event_status(c, now),
        interval=types.DateTimeIntervalType(start=epoch(c.doe.start), duration=c.doe.duration_s),
        DERControlBase_=limits(c.doe),
    )


def active(site: SiteControls, now: datetime) -> list[Control]:
    """The controls in force at `now` (not superseded)."""
    return [c for c in site.ordered() if not c.superseded(now) and c.doe.valid_at(now)]


# -- reading a resource: path and query to an answer ----------------------------------------------


@dataclass(frozen=True)
class Page:
    start: int = 0
    limit: int = DEFAULT_LIMIT


class QueryError(ValueError):
    """A malformed `s` or `l`."""


def page_of(query: Mapping[str, str]) -> Page:
    try:
        start, limit = int(query.get("s", "0")), int(query.get("l", str(DEFAULT_LIMIT)))
    except ValueError:
        raise QueryError("s and l are whole numbers") from None
    if start < 0 or limit < 0:
        raise QueryError("s and l are not negative")
    return Page(start, limit)


T = TypeVar("T")


def paged(items: Sequence[T], page: Page) -> list[T]:
    return list(items[page.start : page.start + page.limit])


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    location: str | None = None
    detail: str | None = None  # why a request was refused, for the client and the log


def refused(status: int, why: object) -> Reply:
    return Reply(status, detail=" ".join(str(why).split())[:500])


NOT_FOUND = Reply(404)


def in_csipaus(body: bytes, version: str) -> bytes:
    """`body` (as envoy-schema writes it) with its csipaus prefix bound to `version`'s namespace."""
    written = f'xmlns:csipaus="{nsmap["csipaus"]}"'.encode()
    return body.replace(written, f'xmlns:csipaus="{CSIPAUS_NAMESPACES[version]}"'.encode(), 1)


def as_envoy_reads(body: bytes) -> bytes:
    """A client's `body` with CSIP-AUS 1.2's namespace taken as the one envoy-schema reads."""
    for quote in (b'"', b"'"):
        old = quote + CSIPAUS_NAMESPACES["1.2"].encode() + quote
        body = body.replace(old, quote + nsmap["csipaus"].encode() + quote)
    return body


def xml(model: BaseXmlModel, status: int = 200, location: str | None = None) -> Reply:
    return Reply(status, model.to_xml(skip_empty=True, exclude_none=True), location)  # type: ignore[arg-type]


def read(site: SiteControls, device: Device, path: str, query: Mapping[str, str], now: datetime) -> Reply:
    """The answer to a GET of `path` by `device` (whose site's state is `site`)."""
    page = page_of(query)
    if path == "/dcap":
        return xml(device_capability(device))
    if path == "/tm":
        return xml(time_now(now))
    if path == "/mup":  # no mirror usage points (yet): an empty list
        return xml(MirrorUsagePointListResponse(href="/mup", all_=0, results=0, pollRate=POLL_RATE_S))
    if path == "/edev":
        devices = paged([end_device(device, now)], page)
        return xml(EndDeviceListResponse(href="/edev", all_=1, results=len(devices), EndDevice=devices))
    own = edev(device.site)
    if path != own and not path.startswith(own + "/"):
        return NOT_FOUND  # another site's resources are not there for this device
    return _read_own(site, device, path[len(own) :], page, now)


def _read_own(site: SiteControls, device: Device, rest: str, page: Page, now: datetime) -> Reply:
    base = edev(device.site)
    if rest == "":
        return xml(end_device(device, now))
    if rest == "/fsa":
        fsas = paged([function_set_assignments(device, site.pen)], page)
        return xml(FunctionSetAssignmentsListResponse(
            href=f"{base}/fsa", all_=1, results=len(fsas), FunctionSetAssignments=fsas, pollRate=POLL_RATE_S
        ))  # fmt: skip
    if rest == f"/fsa/{FSA}":
        return xml(function_set_assignments(device, site.pen))
    if rest == "/rg":
        found = registration(device)
        return NOT_FOUND if found is None else xml(found)
    if rest == "/cp":
        return xml(connection_point(device))
    if rest == "/der":
        ders = paged([der_of(device)], page)
        return xml(der.DERListResponse(href=f"{base}/der", all_=1, results=len(ders), DER_=ders))
    if rest == f"/der/{DER_ID}":
        return xml(der_of(device))
    if rest.startswith(f"/der/{DER_ID}/"):
        kept = site.reported.get(rest[len(f"/der/{DER_ID}/") :])
        return NOT_FOUND if kept is None else xml(kept)
    if rest in ("/derp", f"/fsa/{FSA}/derp"):
        programs = paged([program(site, now)], page)
        return xml(der.DERProgramListResponse(
            href=f"{base}{rest}", all_=1, results=len(programs), DERProgram=programs, pollRate=POLL_RATE_S
        ))  # fmt: skip
    if rest.startswith(f"/derp/{PROGRAM}"):
        return _read_program(site, rest[len(f"/derp/{PROGRAM}") :], page, now)
    if rest.startswith("/rsp/"):
        return _read_answer(site, rest[len("/rsp/") :])
    return NOT_FOUND


def _read_program(site: SiteControls, rest: str, page: Page, now: datetime) -> Reply:
    if rest == "":
        return xml(program(site, now))
    if rest == "/dderc":
        default = default_control(site, now)
        return NOT_FOUND if default is None else xml(default)
    if rest in ("/derc", "/actderc"):
        listed = site.listed(now) if rest == "/derc" else active(site, now)
        shown = [control(site, c, now) for c in paged(listed, page)]
        return xml(der.DERControlListResponse(
            href=f"{program_href(site.site)}{rest}", all_=len(listed), results=len(shown), DERControl=shown
        ))  # fmt: skip
    if rest.startswith("/derc/"):
        found = site.find(rest[len("/derc/") :])
        return NOT_FOUND if found is None else xml(control(site, found, now))
    return NOT_FOUND


def _read_answer(site: SiteControls, index: str) -> Reply:
    a = site.answers.get(int(index)) if re.fullmatch(r"[0-9]{1,9}", index) else None
    if a is None:
        return NOT_FOUND
    return xml(response.DERControlResponse(
        href=f"{responses_href(site.site)}/{index}", createdDateTime=epoch(a.created), endDeviceLFDI=a.lfdi,
        status=a.status, subject=a.subject,
    ))  # fmt: skip


# Malformed XML (lxml's errors are SyntaxErrors), another root element, invalid content.
UNREADABLE = (ValidationError, ValueError, SyntaxError, ParsingError)


# -- writing: a device's Response to a control ------------------------------------------------------


def answer(site: SiteControls, device: Device, path: str, body: bytes, now: datetime) -> Reply:
    """A POSTed Response (to a control's replyTo): 201 with its Location, 400 if malformed or not the
    device's own, 404 anywhere else."""
    if path != responses_href(device.site):
        return Reply(405) if path.startswith(edev(device.site)) else NOT_FOUND
    posted = _parse_response(body)
    if posted is None or posted.endDeviceLFDI.upper() != device.lfdi:
        return Reply(400)
    number = site.keep(Answer(posted.subject.upper(), posted.status, device.lfdi, now))
    return Reply(201, location=f"{responses_href(device.site)}/{number}")


def report(site: SiteControls, device: Device, path: str, body: bytes) -> Reply:
    """A device's PUT of what its DER is (DERCapability, DERSettings, DERStatus, DERAvailability):
    kept, 204; 400 if malformed, 405 for anything else of the device's, 404 elsewhere."""
    kind = path.removeprefix(der_href(device.site) + "/")
    if kind not in REPORTED or path == kind:
        return Reply(405) if path.startswith(edev(device.site)) else NOT_FOUND
    try:
        model = REPORTED[kind].from_xml(as_envoy_reads(body))
    except UNREADABLE as exc:
        return refused(400, exc)
    site.reported[kind] = model.model_copy(update={"href": path})
    return Reply(204)


def _parse_response(body: bytes) -> response.Response | None:
    for model in (response.DERControlResponse, response.Response):
        try:
            return model.from_xml(body)
        except UNREADABLE:
            continue
    return None
