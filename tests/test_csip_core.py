"""The CSIP-AUS (IEEE 2030.5) resources of the envelopes, pure (p2pdoe.core.csip): identities, mRIDs,
limits in Int16 watts, paging, supersession, and a site seeing only its own resources."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

pytest.importorskip("envoy_schema", reason="the csip extra is not installed (pip install 'p2pdoe[csip]')")

from envoy_schema.server.schema.sep2.der import DefaultDERControl, DERControlListResponse, DERProgramResponse

from p2pdoe.core import csip
from p2pdoe.core.csip_ids import lfdi, sfdi
from p2pdoe.core.schemas.runtime import Doe

T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
PEN = 12345
DEVICE = csip.Device("a", "3E4F45AB31EDFE5B67E343E5E4562E31984E23E5")
CONTROLS = "/edev/a/derp/doe/derc"


def _site() -> csip.SiteControls:
    return csip.SiteControls("a", PEN)


def _controls(site: csip.SiteControls, query: dict[str, str], now: datetime) -> DERControlListResponse:
    reply = csip.read(site, DEVICE, CONTROLS, query, now)
    assert reply.status == 200
    return DERControlListResponse.from_xml(reply.body)


def test_sfdi_is_the_standards_example() -> None:
    """IEEE 2030.5's worked example (6.3.3): the LFDI above has the SFDI 167261211391."""
    assert sfdi(DEVICE.lfdi) == 167261211391
    assert DEVICE.sfdi == 167261211391


def test_lfdi_is_the_first_160_bits_of_the_certificates_sha256() -> None:
    value = lfdi(b"certificate")
    assert len(value) == 40
    assert value == value.upper()
    assert value == hashlib.sha256(b"certificate").hexdigest()[:40].upper()


def test_an_mrid_is_upper_hex_ending_in_the_pen() -> None:
    m = csip.mrid(PEN, "derc", "x")
    assert len(m) == 32
    assert m == m.upper()
    assert m.endswith("00012345")
    int(m, 16)
    assert csip.mrid(PEN, "derc", "x") == m
    assert csip.mrid(PEN, "derc", "y") != m
    with pytest.raises(ValueError, match="8 decimal digits"):
        csip.mrid(100_000_000, "x")


@pytest.mark.parametrize(
    ("watts", "multiplier", "value"),
    [(0.0, 0, 0), (4999.9, 0, 4999), (32767, 0, 32767), (150_000.5, 1, 15000)],
)
def test_a_limit_is_int16_watts_rounded_down(watts: float, multiplier: int, value: int) -> None:
    power = csip.active_power(watts)
    assert (power.multiplier, power.value) == (multiplier, value)
    assert power.value * 10**power.multiplier <= watts


def test_a_newer_round_supersedes_the_interval_it_replaces() -> None:
    site = _site()
    site.hear(Doe.from_box("a", "r1", T0, 900, -5.0, 3.0), T0 - timedelta(minutes=10))
    site.hear(Doe.from_box("a", "r1", T0 + timedelta(minutes=15), 900, -5.0, 3.0), T0 - timedelta(minutes=10))
    site.hear(Doe.from_box("a", "r2", T0, 900, -5.0, 2.0), T0 - timedelta(minutes=5))
    site.hear(Doe.from_box("a", "r2", T0, 900, -5.0, 2.0), T0 - timedelta(minutes=4))  # a repeat: nothing new
    listed = _controls(site, {"l": "10"}, T0 + timedelta(minutes=1))
    assert (listed.all_, listed.results) == (3, 3)
    controls = listed.DERControl or []
    assert [c.interval.start for c in controls] == [int(T0.timestamp())] * 2 + [int(T0.timestamp()) + 900]
    newest, replaced, later = controls
    assert newest.DERControlBase_.opModExpLimW is not None
    assert newest.DERControlBase_.opModExpLimW.value == 2000
    assert newest.EventStatus_.currentStatus == 1  # active
    assert replaced.EventStatus_.currentStatus == 4  # superseded
    assert replaced.EventStatus_.dateTime == int(T0.timestamp())  # from the newer one's start on
    assert later.EventStatus_.currentStatus == 0  # scheduled
    assert all(c.responseRequired == "03" and c.replyTo == "/edev/a/rsp" for c in controls)
    before = _controls(site, {"l": "10"}, T0 - timedelta(minutes=1)).DERControl or []
    assert [c.EventStatus_.currentStatus for c in before] == [0, 0, 0]  # all scheduled yet
    assert [c.EventStatus_.potentiallySuperseded for c in before] == [False, True, False]
    assert before[1].EventStatus_.potentiallySupersededTime == int((T0 - timedelta(minutes=5)).timestamp())
    active = csip.read(site, DEVICE, "/edev/a/derp/doe/actderc", {"l": "10"}, T0 + timedelta(minutes=1))
    assert DERControlListResponse.from_xml(active.body).all_ == 1


def test_a_short_control_goes_scheduled_active_and_leaves_the_list_at_its_end() -> None:
    site = _site()
    site.hear(Doe.from_box("a", "r1", T0 + timedelta(seconds=60), 60, -5.0, 3.0), T0)
    moments = [T0, T0 + timedelta(seconds=60), T0 + timedelta(seconds=119), T0 + timedelta(seconds=120)]
    statuses = [
        [c.EventStatus_.currentStatus for c in _controls(site, {"l": "10"}, t).DERControl or []]
        for t in moments
    ]
    assert statuses == [[0], [1], [1], []]  # scheduled, active for its minute, then over: not listed
    program = DERProgramResponse.from_xml(csip.read(site, DEVICE, "/edev/a/derp/doe", {}, moments[-1]).body)
    assert program.DERControlListLink is not None
    assert program.DERControlListLink.all_ == 0
    href = f"{CONTROLS}/{site.controls[0].mrid}"
    assert csip.read(site, DEVICE, href, {}, moments[-1]).status == 200  # a Response may still name it


def test_lists_page_with_s_and_l_and_default_to_one() -> None:
    site = _site()
    for k in range(5):
        site.hear(Doe.from_box("a", "r1", T0 + timedelta(minutes=15 * k), 900, -1.0, float(k)), T0)
    assert _controls(site, {}, T0).results == 1  # 2030.5: one entry without `l`
    page = _controls(site, {"s": "3", "l": "5"}, T0)
    assert (page.all_, page.results) == (5, 2)
    assert [c.DERControlBase_.opModExpLimW.value for c in page.DERControl or []] == [3000, 4000]  # type: ignore[union-attr]
    assert _controls(site, {"s": "9", "l": "5"}, T0).results == 0
    with pytest.raises(csip.QueryError):
        csip.read(site, DEVICE, CONTROLS, {"l": "-1"}, T0)


def test_the_default_envelope_is_the_default_control() -> None:
    site = _site()
    assert csip.read(site, DEVICE, "/edev/a/derp/doe/dderc", {}, T0).status == 404
    site.hear(Doe.from_box("a", None, T0, 86400, -4.5, 6.25), T0, default=True)
    default = DefaultDERControl.from_xml(csip.read(site, DEVICE, "/edev/a/derp/doe/dderc", {}, T0).body)
    limits = default.DERControlBase_
    assert limits.opModImpLimW is not None
    assert limits.opModImpLimW.value == 4500
    assert limits.opModExpLimW is not None
    assert limits.opModExpLimW.value == 6250
    assert default.mRID.endswith("00012345")


def test_a_device_sees_only_its_own_site() -> None:
    site = _site()
    for path in ("/edev/b", "/edev/b/derp/doe/derc", "/edev/ab/derp", "/derp", "/edev/a/nothing"):
        assert csip.read(site, DEVICE, path, {}, T0).status == 404, path
    body = csip.read(site, DEVICE, "/edev", {"l": "10"}, T0).body.decode()
    assert body.count("<EndDevice ") == 1
    assert DEVICE.lfdi in body


def test_a_response_is_stored_with_its_location_and_only_from_its_device() -> None:
    site = _site()
    body = (
        '<DERControlResponse xmlns="urn:ieee:std:2030.5:ns"><createdDateTime>1</createdDateTime>'
        f"<endDeviceLFDI>{DEVICE.lfdi}</endDeviceLFDI><status>1</status>"
        "<subject>0A0B0C0D0E0F00000000000000012345</subject></DERControlResponse>"
    )
    reply = csip.answer(site, DEVICE, "/edev/a/rsp", body.encode(), T0)
    assert (reply.status, reply.location) == (201, "/edev/a/rsp/0")
    assert csip.read(site, DEVICE, "/edev/a/rsp/0", {}, T0).status == 200
    for _ in range(csip.ANSWERS_KEPT):
        csip.answer(site, DEVICE, "/edev/a/rsp", body.encode(), T0)
    assert len(site.answers) == csip.ANSWERS_KEPT  # the oldest forgotten
    assert csip.read(site, DEVICE, "/edev/a/rsp/0", {}, T0).status == 404
    assert csip.read(site, DEVICE, f"/edev/a/rsp/{csip.ANSWERS_KEPT}", {}, T0).status == 200
    forged = body.replace(DEVICE.lfdi, "0" * 40)
    assert csip.answer(site, DEVICE, "/edev/a/rsp", forged.encode(), T0).status == 400
    assert csip.answer(site, DEVICE, "/edev/a/rsp", b"<not xml", T0).status == 400
    assert csip.answer(site, DEVICE, "/edev/b/rsp", body.encode(), T0).status == 404


def test_the_device_finds_its_der_registration_and_connection_point() -> None:
    site = _site()
    device = csip.Device("a", DEVICE.lfdi, 123458, T0)
    body = csip.read(site, device, "/edev/a", {}, T0).body.decode()
    for link in ('DERListLink href="/edev/a/der"', 'RegistrationLink href="/edev/a/rg"', 'href="/edev/a/cp"'):
        assert link in body
    assert "<pIN>123458</pIN>" in csip.read(site, device, "/edev/a/rg", {}, T0).body.decode()
    assert "RegistrationLink" not in csip.read(site, DEVICE, "/edev/a", {}, T0).body.decode()  # no PIN
    assert csip.read(site, DEVICE, "/edev/a/rg", {}, T0).status == 404
    assert b"<csipaus:connectionPointId>a<" in csip.read(site, device, "/edev/a/cp", {}, T0).body
    assert b'results="0"' in csip.read(site, device, "/mup", {}, T0).body


def test_a_device_reports_its_der_and_reads_it_back() -> None:
    site = _site()
    capability = (
        b'<DERCapability xmlns="urn:ieee:std:2030.5:ns"><modesSupported>00000001</modesSupported>'
        b"<rtgMaxW><multiplier>0</multiplier><value>5000</value></rtgMaxW><type>4</type>"
        b'<doeModesSupported xmlns="https://csipaus.org/ns">03</doeModesSupported></DERCapability>'
    )
    assert csip.read(site, DEVICE, "/edev/a/der/1/dercap", {}, T0).status == 404
    assert csip.report(site, DEVICE, "/edev/a/der/1/dercap", capability).status == 204
    kept = csip.read(site, DEVICE, "/edev/a/der/1/dercap", {}, T0).body
    assert b"<value>5000</value>" in kept
    assert b"doeModesSupported>03<" in kept
    without_doe_modes = capability.replace(
        b'<doeModesSupported xmlns="https://csipaus.org/ns">03</doeModesSupported>', b""
    )
    assert csip.report(site, DEVICE, "/edev/a/der/1/dercap", without_doe_modes).status == 204  # as py20305's
    refused = csip.report(site, DEVICE, "/edev/a/der/1/dercap", b"<DERStatus/>")
    assert refused.status == 400
    assert refused.detail is not None
    assert csip.report(site, DEVICE, "/edev/a/der/1", capability).status == 405
    assert csip.report(site, DEVICE, "/edev/b/der/1/dercap", capability).status == 404


ACTIVE = "/edev/a/derp/doe/actderc"
DEFAULT = "/edev/a/derp/doe/dderc"


def _active_export_w(site: csip.SiteControls, now: datetime) -> list[int]:
    listed = DERControlListResponse.from_xml(csip.read(site, DEVICE, ACTIVE, {"l": "10"}, now).body)
    out = []
    for c in listed.DERControl or []:
        assert c.DERControlBase_.opModExpLimW is not None
        limit = c.DERControlBase_.opModExpLimW
        out.append(limit.value * 10 ** (limit.multiplier or 0))
    return out


def test_the_last_envelope_heard_for_an_interval_is_the_one_in_force_as_for_an_edge_agent() -> None:
    """A round that leaves the site out republishes the interval as its default (round null, on
    `doe`): a 2030.5 device must get that limit, not the earlier round's looser one; and an envelope
    heard again after a newer one is in force again."""
    site = _site()
    agreed = Doe.from_box("a", "r1", T0, 900, -5.0, 6.0)
    left_out = Doe.from_box("a", None, T0, 900, -5.0, 1.0)
    site.hear(agreed, T0 - timedelta(minutes=10))
    site.hear(left_out, T0 - timedelta(minutes=5))
    assert _active_export_w(site, T0 + timedelta(minutes=1)) == [1000]
    site.hear(agreed, T0 - timedelta(minutes=2))
    assert _active_export_w(site, T0 + timedelta(minutes=1)) == [6000]
    site.hear(agreed, T0 - timedelta(minutes=1))  # a repeat of the one in force: nothing new
    assert len(site.controls) == 3


def test_a_lapsed_or_pending_default_is_not_served_but_the_fail_safe_is() -> None:
    site = _site()
    site.hear(Doe.from_box("a", None, T0, 3600, -4.5, 6.25), T0, default=True)
    assert csip.read(site, DEVICE, DEFAULT, {}, T0 + timedelta(minutes=30)).status == 200
    assert csip.read(site, DEVICE, DEFAULT, {}, T0 + timedelta(hours=2)).status == 404  # lapsed
    assert csip.read(site, DEVICE, DEFAULT, {}, T0 - timedelta(hours=1)).status == 404  # not yet
    site.fail_safe = Doe.from_box("a", None, datetime(1970, 1, 1, tzinfo=UTC), 2**31 - 1, -2.0, 0.5)
    served = DefaultDERControl.from_xml(csip.read(site, DEVICE, DEFAULT, {}, T0 + timedelta(hours=2)).body)
    assert served.DERControlBase_.opModExpLimW is not None
    assert served.DERControlBase_.opModExpLimW.value == 500
    assert served.description is not None
    assert "fail-safe" in served.description


def test_a_limit_is_never_looser_than_the_signed_box() -> None:
    """Doe's CSIP-AUS fields may exceed its box by a rounding watt; the box is what was agreed."""
    doe = Doe.from_box("a", "r1", T0, 900, -5.0, 3.0).model_copy(update={"opModExpLimW": 3000.9})
    limit = csip.limits(doe).opModExpLimW
    assert limit is not None
    assert limit.value * 10 ** (limit.multiplier or 0) == 3000


@pytest.mark.parametrize("index", ["\u00b2", "9" * 5000, "-1", "x"])
def test_a_response_index_that_is_no_small_number_is_not_found(index: str) -> None:
    assert csip.read(_site(), DEVICE, f"/edev/a/rsp/{index}", {}, T0).status == 404
