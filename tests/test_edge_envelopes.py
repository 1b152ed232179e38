"""Which envelope an edge agent applies as time passes: the dynamic one while valid, then the default
while valid, then its fixed default (never none); every switch on its retained status, with the
reason. A recording transport stands in for the
broker (the broker paths are in test_services.py)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

from edge_agent.service import EdgeAgent, fixed_default
from p2pdoe.core import topics
from p2pdoe.core.realtime.enforcement import Box
from p2pdoe.core.schemas.runtime import Doe
from p2pdoe.core.site import site_config
from p2pdoe.io.scenarios import load_scenario

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, expiry_s: int | None = None
    ) -> None:
        self.sent.append((topic, payload))

    async def publish_state(self, topic: str, payload: bytes, expiry_s: int | None = None) -> None:
        self.sent.append((topic, payload))

    async def unsubscribe(self, topic_filter: str) -> None:
        pass

    def statuses(self) -> list[str]:
        return [json.loads(p)["envelope"] for t, p in self.sent if t.endswith("/status")]


def test_the_dynamic_envelope_then_the_default_then_none() -> None:
    s = load_scenario("default")
    site = s.ids[0]
    now = [T0]
    agent = EdgeAgent(site_config(s, 0), clock=lambda: now[0])
    rec = Recorder()
    dynamic = Doe.from_box(site, "day-ahead", T0, 3600, -100.0, 200.0)
    default = Doe.from_box(site, None, T0, 2 * 3600, -10.0, 20.0)

    async def main() -> None:
        await agent._on_envelope(rec, "doe/default", default.model_dump_json().encode())  # type: ignore[arg-type]
        await agent._on_envelope(rec, "doe", dynamic.model_dump_json().encode())  # type: ignore[arg-type]
        assert (agent.envelope_in_force().kind, agent.envelope_in_force().box) == ("dynamic", Box(-100, 200))
        now[0] = T0 + timedelta(minutes=61)  # the dynamic one expired: never applied again
        await agent._report_state(rec)  # type: ignore[arg-type]
        assert (agent.envelope_in_force().kind, agent.envelope_in_force().box) == ("default", Box(-10, 20))
        now[0] = T0 + timedelta(hours=3)
        await agent._report_state(rec)  # type: ignore[arg-type]
        assert agent.envelope_in_force().kind == "fixed_default"
        assert agent.envelope_in_force().box == fixed_default(agent.config)

    asyncio.run(main())
    assert rec.statuses() == ["default", "dynamic", "default", "fixed_default"]
    reasons = [json.loads(p)["reason"] for t, p in rec.sent]
    assert "expired" in reasons[2]
    assert "expired" in reasons[3]
    assert all(t == topics.site(site, "status") for t, _ in rec.sent)


def test_an_envelope_for_another_site_or_on_the_wrong_topic_is_dropped() -> None:
    s = load_scenario("default")
    agent = EdgeAgent(site_config(s, 0), clock=lambda: T0)
    rec = Recorder()
    foreign = Doe.from_box(s.ids[1], "day-ahead", T0, 3600, -1.0, 1.0)
    dynamic_on_default = Doe.from_box(s.ids[0], "day-ahead", T0, 3600, -1.0, 1.0)

    async def main() -> None:
        await agent._on_envelope(rec, "doe", foreign.model_dump_json().encode())  # type: ignore[arg-type]
        await agent._on_envelope(rec, "doe/default", dynamic_on_default.model_dump_json().encode())  # type: ignore[arg-type]
        await agent._on_envelope(rec, "doe", b'{"kind": "doe", "lo_kw": NaN}')  # type: ignore[arg-type]

    asyncio.run(main())
    assert agent.envelope_in_force().kind == "fixed_default"
    assert dict(agent.reader.dropped) == {"sender_not_topic": 2, "malformed": 1}
