"""The agreement over a real broker: one transport per participant, the same answer as in-process."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from p2pdoe.core.agreement.outcome import solution
from p2pdoe.core.agreement.setup import participants
from p2pdoe.core.envelope import safe_set
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.schemas.messages import Proposal, encode
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.services.agreement_mqtt import run_community, run_coordinator, sender_matches_topic
from p2pdoe.services.broker import Broker
from p2pdoe.services.inprocess import run_admm
from p2pdoe.services.transport import MqttTransport

pytestmark = pytest.mark.timeout(240)


async def _agree_over(
    broker: Broker, s: Scenario, policy: Policy, hear_peers: bool = True
) -> tuple[object, tuple[object, ...]]:
    p = participants(s, policy, "day-ahead")
    transports = [MqttTransport(broker.url, f"edge-{c.site}") for c in p.communities]
    coordinator = MqttTransport(broker.url, "coordinator")
    for t in [*transports, coordinator]:
        await t.start()
    try:
        edges = [
            asyncio.create_task(run_community(t, c, hear_peers))
            for t, c in zip(transports, p.communities, strict=True)
        ]
        dso = await asyncio.wait_for(run_coordinator(coordinator, p.dso), 180)
        outs = tuple(await asyncio.wait_for(asyncio.gather(*edges), 60))
    finally:
        for t in [*transports, coordinator]:
            await t.close()
    return dso, outs


def test_the_distributed_answer_equals_the_in_process_one(mqtt_broker: Broker) -> None:
    _assert_same_as_in_process(mqtt_broker)


def test_the_embedded_broker_carries_the_agreement_too(embedded_broker: Broker) -> None:
    """MQTT 3.1.1 only: the protocol needs no v5 feature."""
    _assert_same_as_in_process(embedded_broker)


def test_anderson_weights_travel_in_the_grants_and_keep_the_answer(mqtt_broker: Broker) -> None:
    """With acceleration on, every site mixes its couplings with the weights its grants carry: the
    same iterations and answer as in process."""
    _assert_same_as_in_process(mqtt_broker, {"admm": {"anderson": {"memory": 10}}})


def test_a_relayed_round_needs_no_site_to_subscribe_to_a_peer(mqtt_broker: Broker) -> None:
    """The grants relay the peers' entries (docs/agreement.md, "Relayed trades"): were any peer's
    proposal still needed, a site that never subscribed to one would wait for ever."""
    _assert_same_as_in_process(mqtt_broker, {"admm": {"relay_trades": True}}, hear_peers=False)


def test_a_certified_polish_travels_over_the_broker(mqtt_broker: Broker) -> None:
    """Responses in parts, prices, corrections and verdicts on their own topics: the round ends
    certified after as many iterations as in process, at the same answer."""
    with threadpool_limits(limits=1, user_api="blas"):
        _assert_same_as_in_process(mqtt_broker, {"admm": {"polish": {"first": 20}}}, iterations=20)


def _assert_same_as_in_process(
    broker: Broker,
    overrides: dict[str, object] | None = None,
    hear_peers: bool = True,
    iterations: int | None = None,
) -> None:
    s = load_scenario("default", overrides)
    dso, outs = asyncio.run(_agree_over(broker, s, Policy.DYNAMIC, hear_peers))
    reference = run_admm(s, Policy.DYNAMIC)
    qps = participants(s, Policy.DYNAMIC, "x").qps
    over_mqtt = solution(Policy.DYNAMIC, qps, outs, dso, safe_set(s), 0.0)  # type: ignore[arg-type]
    assert over_mqtt.solver.status == "converged"
    assert over_mqtt.solver.iterations == reference.solution.solver.iterations
    assert iterations is None or over_mqtt.solver.iterations == iterations
    assert over_mqtt.objective_eur == pytest.approx(reference.solution.objective_eur, rel=1e-9, abs=1e-9)
    for a, b in zip(over_mqtt.schedules, reference.solution.schedules, strict=True):
        for name in ("pv", "ch", "imp", "exp", "lo", "up"):
            assert np.allclose(a[name], b[name], rtol=0, atol=1e-9)


def test_a_proposal_only_counts_on_its_senders_topic() -> None:
    p = Proposal(round="r1", iteration=0, sender="solar-18", trades=[], envelope=None)
    assert sender_matches_topic("p2pdoe/v1/market/r1/proposal/solar-18", p)
    assert not sender_matches_topic("p2pdoe/v1/market/r1/proposal/wind-25", p)
    assert not sender_matches_topic("p2pdoe/v1/market/r2/proposal/solar-18", p)
    assert not sender_matches_topic("p2pdoe/v1/market/r1/grant/solar-18", p)
    assert encode(p)
