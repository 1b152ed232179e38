"""The runtime's topic tree and messages: names parse back, envelopes are strict and consistent."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from cli_helpers import assert_one_line_error, run_p2pdoe
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from p2pdoe.core import topics
from p2pdoe.core.schemas.runtime import ALL_MESSAGES, Doe, Registration, decode_runtime
from p2pdoe.core.schemas.wire import WireError

IDS = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,31}", fullmatch=True)
ROUNDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", fullmatch=True)
NOON = datetime(2026, 6, 21, 12, tzinfo=UTC)


@given(site=IDS, kind=st.sampled_from(topics.SITE_KINDS))
def test_site_topics_parse_back(site: str, kind: str) -> None:
    parsed = topics.parse(topics.site(site, kind))
    assert parsed == topics.Topic("site", kind, site=site)


@given(round_id=ROUNDS, site=IDS)
def test_market_topics_parse_back(round_id: str, site: str) -> None:
    assert topics.parse(topics.round_open(round_id)) == topics.Topic("market", "open", round=round_id)
    assert topics.parse(topics.grant(round_id, site)) == topics.Topic(
        "market", "grant", site=site, round=round_id
    )
    assert topics.parse(f"{topics.ROOT}/market/{round_id}/grant") is None  # a grant is always to a site
    assert topics.parse(topics.proposal(round_id, site)) == topics.Topic(
        "market", "proposal", site=site, round=round_id
    )
    for kind, topic in (("polish", topics.polish), ("prices", topics.polish_prices)):
        assert topics.parse(topic(round_id, site)) == topics.Topic("market", kind, site=site, round=round_id)


def test_the_documented_names_hold() -> None:
    assert topics.site("solar-18", "doe") == "p2pdoe/v1/site/solar-18/doe"
    assert topics.site("solar-18", "doe/default") == "p2pdoe/v1/site/solar-18/doe/default"
    assert topics.site("solar-18", "status") == "p2pdoe/v1/site/solar-18/status"
    assert topics.DSO_STATUS == "p2pdoe/v1/dso/status"
    assert topics.DSO_PROGRESS == "p2pdoe/v1/dso/progress"
    assert topics.every_site("status") == "p2pdoe/v1/site/+/status"
    assert topics.parse("p2pdoe/v1/dso/progress") == topics.Topic("dso", "progress")


@pytest.mark.parametrize("topic", ["other/v1/dso/status", "p2pdoe/v1/site/x/unknown", "p2pdoe/v1/market/r"])
def test_foreign_topics_do_not_parse(topic: str) -> None:
    assert topics.parse(topic) is None


def test_an_unknown_site_topic_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="no site topic"):
        topics.site("solar-18", "doe/latest")


def test_doe_carries_the_csip_limits_in_watts() -> None:
    d = Doe.from_box("solar-18", "day-ahead", NOON, 900, -300.5, 812.25)
    assert (d.opModImpLimW, d.opModExpLimW) == (300500.0, 812250.0)
    assert decode_runtime(d.model_dump_json().encode()) == d
    load_only = Doe.from_box("campus-30", None, NOON, 900, -500.0, -120.0)  # cannot reach zero
    assert (load_only.opModImpLimW, load_only.opModExpLimW) == (500000.0, 0.0)


def test_doe_is_in_force_only_inside_its_window() -> None:
    d = Doe.from_box("solar-18", "r1", NOON, 900, -1.0, 1.0)
    assert d.valid_at(NOON)
    assert d.valid_at(NOON + timedelta(seconds=899))
    assert not d.valid_at(NOON + timedelta(seconds=900))
    assert not d.valid_at(NOON - timedelta(seconds=1))


def _doe_doc() -> dict[str, object]:
    return json.loads(Doe.from_box("solar-18", "r1", NOON, 900, -300.0, 800.0).model_dump_json())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("start", "2026-06-21T12:00:00"),  # naive
        ("start", "2026-06-21T12:00:00+02:00"),  # not UTC
        ("lo_kw", "-300"),  # a number as a string
        ("opModExpLimW", 700000.0),  # disagrees with up_kw
        ("opModImpLimW", -1.0),  # negative
        ("lo_kw", 900.0),  # above up_kw
        ("duration_s", 0),
        ("colour", "red"),  # unknown key
    ],
)
def test_a_bad_doe_is_refused(field: str, value: object) -> None:
    doc = _doe_doc()
    doc[field] = value
    with pytest.raises(ValidationError):
        decode_runtime(json.dumps(doc).encode())


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_limit_is_refused(token: str) -> None:
    """Lax pydantic takes NaN, and a NaN limit silently disables a clamp."""
    text = json.dumps(_doe_doc()).replace("800000.0", token)
    with pytest.raises(ValidationError):
        decode_runtime(text.encode())


def test_a_doe_with_a_repeated_key_is_refused() -> None:
    text = json.dumps(_doe_doc()).replace('"up_kw": 800.0', '"up_kw": 800.0, "up_kw": 5000.0')
    with pytest.raises(WireError):
        decode_runtime(text.encode())


def _registration(**change: object) -> Registration:
    doc: dict[str, object] = {
        "site": "a",
        "bus": 18,
        "peers": ["b"],
        "technical_min_kw": [-5.0],
        "technical_max_kw": [3.0],
        "reactive_min_kvar": [-1.0],
        "reactive_max_kvar": [-0.5],
    }
    return Registration.model_validate(doc | change)


def test_registration_checks_its_ranges() -> None:
    ok = _registration()
    assert decode_runtime(ok.model_dump_json().encode()) == ok
    with pytest.raises(ValidationError, match="technical minimum"):
        _registration(technical_min_kw=[5.0])
    with pytest.raises(ValidationError, match="reactive minimum"):
        _registration(reactive_min_kvar=[0.0])
    with pytest.raises(ValidationError, match="one value per interval"):
        _registration(reactive_max_kvar=[0.0, 0.0])


def test_schema_command_prints_every_message() -> None:
    run = run_p2pdoe("schema")
    assert run.returncode == 0, run.stderr
    schemas = json.loads(run.stdout)
    assert set(schemas) == {m.model_fields["kind"].default for m in ALL_MESSAGES}
    assert schemas["doe"]["additionalProperties"] is False
    assert {"opModImpLimW", "opModExpLimW", "lo_kw", "up_kw", "start", "duration_s", "round"} <= set(
        schemas["doe"]["properties"]
    )
    one = run_p2pdoe("schema", "--kind", "grant")
    assert list(json.loads(one.stdout)) == ["grant"]
    assert_one_line_error(run_p2pdoe("schema", "--kind", "nope"), "no message kind")


def test_meter_readings_and_set_points_are_strict() -> None:
    from datetime import UTC, datetime

    from p2pdoe.core.schemas.runtime import MeterReading, SetPointMessage

    ts = datetime(2026, 6, 21, 12, tzinfo=UTC)
    reading = MeterReading(site="a", ts=ts, p_kw=-12.5, soc_kwh=40.0, battery_kw=5.0)
    assert decode_runtime(reading.model_dump_json().encode()) == reading
    points = SetPointMessage(site="a", ts=ts, battery_kw=-20.0, pv_cap_kw=None, wind_cap_kw=3.0, flex_kw=10.0)
    assert decode_runtime(points.model_dump_json().encode()) == points
    doc = json.loads(reading.model_dump_json())
    for change in ({"p_kw": "1.0"}, {"soc_kwh": -1.0}, {"ts": "2026-06-21T12:00:00"}, {"extra": 1}):
        with pytest.raises(ValidationError):
            decode_runtime(json.dumps(doc | change).encode())
    with pytest.raises(ValidationError):
        decode_runtime(reading.model_dump_json().replace("-12.5", "NaN").encode())
    with pytest.raises(ValidationError):
        SetPointMessage(site="a", ts=ts, battery_kw=0.0, pv_cap_kw=-1.0, wind_cap_kw=None, flex_kw=0.0)


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        ("doe", "start"),
        ("meter", "ts"),
        ("dso_status", "ts"),
        ("site_status", "ts"),
        ("settlement", "interval_start"),
    ],
)
@pytest.mark.parametrize("value", [12, "12", 1.5e9, "1750000000", "June 21"])
def test_a_time_is_iso_text_never_a_number(kind: str, field: str, value: object) -> None:
    """pydantic alone reads 12 and "12" as 1970-01-01T00:00:12Z: a forged message could move a time
    stamp to 1970 without a malformed field."""
    payload = next(m for m in ALL_MESSAGES if m.model_fields["kind"].default == kind)
    payload.model_validate_json(_sample(kind))  # as it is, it passes
    sample = json.loads(_sample(kind))
    sample[field] = value
    with pytest.raises(ValidationError, match="ISO 8601"):
        payload.model_validate_json(json.dumps(sample))


def _sample(kind: str) -> str:
    t0 = "2026-06-21T00:00:00Z"
    samples = {
        "doe": {
            "site": "a",
            "round": None,
            "start": t0,
            "opModImpLimW": 1000,
            "opModExpLimW": 1000,
            "duration_s": 900,
            "lo_kw": -1,
            "up_kw": 1,
        },
        "meter": {"site": "a", "ts": t0, "p_kw": 1.0},
        "dso_status": {"state": "online", "round": None, "ts": t0},
        "site_status": {"site": "a", "state": "online", "envelope": "none", "ts": t0},
    }
    if kind == "settlement":
        return json.dumps({
            "site": "a", "interval_start": t0, "duration_s": 900, "round": None, "measured_kwh": 1.0,
            "scheduled_kwh": 1.0, "deviation_kwh": 0.0, "p2p_paid_eur": 0.0, "p2p_received_eur": 0.0,
            "grid_kwh": 1.0, "grid_eur": 0.1, "net_eur": 0.1, "readings": 30, "covered_s": 900.0,
            "envelope": "dynamic", "lo_kw": -1.0, "up_kw": 1.0,
        })  # fmt: skip
    return json.dumps(samples[kind])
