"""Which envelope an edge agent applies as time passes: the dynamic one while valid, then the default
while valid, then its fixed default (never none); every switch on its retained status, with the
reason. The real-time machine is fed events with the time and its commands are read: no broker, no
event loop (the broker paths are in test_services.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from edge_agent.service import fixed_default
from p2pdoe.core import topics
from p2pdoe.core.edge.commands import SaveEnvelope
from p2pdoe.core.edge.realtime import EdgeRealtime
from p2pdoe.core.effects import Heard, Send, Woke
from p2pdoe.core.realtime.controller import Controller
from p2pdoe.core.realtime.enforcement import Box
from p2pdoe.core.realtime.fallback import FallbackConfig
from p2pdoe.core.realtime.plant import plant_spec
from p2pdoe.core.schemas.runtime import Doe
from p2pdoe.core.schemas.site import SiteConfig
from p2pdoe.core.site import site_config
from p2pdoe.io.scenarios import load_scenario

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def machine(config: SiteConfig) -> EdgeRealtime:
    controller = Controller(config, plant_spec(config), FallbackConfig(fixed_default(config)), T0, 5.0)
    return EdgeRealtime(controller)


def heard(site: str, kind: str, doe: Doe | bytes) -> Heard:
    payload = doe if isinstance(doe, bytes) else doe.model_dump_json().encode()
    return Heard(topics.site(site, kind), payload)


def statuses(commands: list[object]) -> list[dict[str, object]]:
    return [json.loads(c.payload) for c in commands if isinstance(c, Send) and c.topic.endswith("/status")]


def test_the_dynamic_envelope_then_the_default_then_none() -> None:
    s = load_scenario("default")
    site = s.ids[0]
    m = machine(site_config(s, 0))
    dynamic = Doe.from_box(site, "day-ahead", T0, 3600, -100.0, 200.0)
    default = Doe.from_box(site, None, T0, 2 * 3600, -10.0, 20.0)
    sent: list[object] = []
    sent += m.handle(heard(site, "doe/default", default), T0)
    sent += m.handle(heard(site, "doe", dynamic), T0)
    in_force = m.controller.choose_at(T0)
    assert (in_force.kind, in_force.box) == ("dynamic", Box(-100, 200))
    sent += m.handle(Woke(), T0 + timedelta(minutes=61))  # the dynamic one expired: never applied again
    assert m.controller.choose_at(T0 + timedelta(minutes=61)).box == Box(-10, 20)
    sent += m.handle(Woke(), T0 + timedelta(hours=3))
    assert m.controller.choose_at(T0 + timedelta(hours=3)).box == fixed_default(m.config)
    states = statuses(sent)
    assert [st["envelope"] for st in states] == ["default", "dynamic", "default", "fixed_default"]
    assert "expired" in str(states[2]["reason"])
    assert "expired" in str(states[3]["reason"])
    assert states[1]["envelope_lead_s"] == 0.0  # heard at its start


def test_each_envelope_heard_is_journaled_and_the_stale_ones_forgotten() -> None:
    s = load_scenario("default")
    site = s.ids[0]
    m = machine(site_config(s, 0))
    first = Doe.from_box(site, "day-ahead", T0, 3600, -1.0, 1.0)
    later = Doe.from_box(site, "day-ahead", T0 + timedelta(hours=1), 3600, -2.0, 2.0)
    saves = [c for c in m.handle(heard(site, "doe", first), T0) if isinstance(c, SaveEnvelope)]
    saves += [c for c in m.handle(heard(site, "doe", later), T0) if isinstance(c, SaveEnvelope)]
    assert [c.key for c in saves] == [f"doe@{first.start.isoformat()}", f"doe@{later.start.isoformat()}"]
    assert saves[-1].keep == {f"doe@{first.start.isoformat()}", f"doe@{later.start.isoformat()}"}


def test_an_envelope_for_another_site_or_on_the_wrong_topic_is_dropped() -> None:
    s = load_scenario("default")
    m = machine(site_config(s, 0))
    foreign = Doe.from_box(s.ids[1], "day-ahead", T0, 3600, -1.0, 1.0)
    dynamic_on_default = Doe.from_box(s.ids[0], "day-ahead", T0, 3600, -1.0, 1.0)
    m.handle(heard(s.ids[0], "doe", foreign), T0)
    m.handle(heard(s.ids[0], "doe/default", dynamic_on_default), T0)
    m.handle(heard(s.ids[0], "doe", b'{"kind": "doe", "lo_kw": NaN}'), T0)
    assert m.controller.choose_at(T0).kind == "fixed_default"
    assert dict(m.reader.dropped) == {"sender_not_topic": 2, "malformed": 1}


def test_the_coordinators_default_for_a_site_left_out_of_a_round_is_taken_and_named_default() -> None:
    """A round that leaves a site out publishes the site's default box on `doe` without a round: it
    replaces what stood for that interval (the round counted the site at its default)."""
    s = load_scenario("default")
    site = s.ids[0]
    m = machine(site_config(s, 0))
    m.handle(heard(site, "doe", Doe.from_box(site, "rt002", T0, 900, -50.0, 150.0)), T0)
    out = m.handle(heard(site, "doe", Doe.from_box(site, None, T0, 900, -118.0, 429.0)), T0)
    choice = m.controller.choose_at(T0)
    assert (choice.kind, choice.box) == ("default", Box(-118.0, 429.0))
    assert [st["envelope"] for st in statuses(out)] == ["default"]
    assert not m.reader.dropped


def test_a_reading_stamped_before_the_clock_never_switches_the_envelope_back() -> None:
    """At an interval's boundary the clock may be past it while a reading stamped just before it is
    still being handled: the reading's older view must not flip the envelope in force back and forth
    (seen as five switches within a second in an agent's log)."""
    from p2pdoe.core.edge.commands import MeterRead
    from p2pdoe.core.schemas.runtime import MeterReading

    s = load_scenario("default")
    site = s.ids[0]
    m = machine(site_config(s, 0))
    boundary = T0 + timedelta(hours=1)
    sent: list[object] = []
    sent += m.handle(heard(site, "doe/default", Doe.from_box(site, None, T0, 4 * 3600, -10.0, 20.0)), T0)
    sent += m.handle(heard(site, "doe", Doe.from_box(site, "day-ahead", T0, 3600, -100.0, 200.0)), T0)
    for k in range(3):  # the clock past the boundary, readings stamped just before it, in turn
        sent += m.handle(Woke(), boundary + timedelta(milliseconds=100 * k + 50))
        late = MeterReading(site=site, ts=boundary - timedelta(milliseconds=300 - 100 * k), p_kw=0.0)
        sent += m.handle(
            MeterRead(late),
            boundary + timedelta(milliseconds=100 * k + 60),
        )
    assert [st["envelope"] for st in statuses(sent)] == ["default", "dynamic", "default"]
