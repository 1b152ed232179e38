"""Plausibility at the coordinator's door (p2pdoe.core.coordinator.plausible): what an honest site
sends passes; a report, settlement or reading scaled by 1000 (valid-looking numbers no assets could
produce) is caught with a reason; and on the virtual day the coordinator drops and counts it, so no
absurd figure reaches results.json."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from agreement_helpers import scaled
from virtual_helpers import S, day_of

from p2pdoe.cli import virtual_day
from p2pdoe.core import topics
from p2pdoe.core.coordinator.plausible import reading_problem, report_problem, settlement_problem
from p2pdoe.core.edge.market import EdgeMarket
from p2pdoe.core.effects import Send
from p2pdoe.core.schemas.messages import Proposal, decode, encode
from p2pdoe.core.schemas.runtime import MeterReading, SettlementRecord, SiteReport
from p2pdoe.core.signing import edge_identity
from p2pdoe.core.site import coordinator_config, registration, site_config

SITE = 1
REG = registration(site_config(S, SITE))
CFG = coordinator_config(S)
T0 = "2026-06-21T00:00:00Z"


def _settlement(kwh: float) -> SettlementRecord:
    return SettlementRecord.model_validate({
        "site": S.ids[SITE], "interval_start": T0, "duration_s": 900, "round": None, "measured_kwh": kwh,
        "scheduled_kwh": kwh, "deviation_kwh": 0.0, "p2p_paid_eur": 0.0, "p2p_received_eur": 0.0,
        "grid_kwh": kwh, "grid_eur": 0.1, "net_eur": 0.1, "readings": 30, "covered_s": 900.0,
        "envelope": "dynamic", "lo_kw": -1.0, "up_kw": 1.0,
    })  # fmt: skip


def test_honest_readings_and_settlements_pass_and_scaled_ones_do_not() -> None:
    top = max(abs(v) for v in REG.technical_max_kw + REG.technical_min_kw)
    honest = MeterReading(site=S.ids[SITE], ts=T0, p_kw=0.9 * top)
    assert reading_problem(honest, REG) is None
    assert settlement_problem(_settlement(0.9 * top / 4), REG) is None
    why = reading_problem(honest.model_copy(update={"p_kw": 1000 * top}), REG)
    assert why is not None
    assert "registered range" in why
    assert settlement_problem(_settlement(1000 * top / 4), REG) is not None


@pytest.fixture(scope="module")
def honest_day(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SiteReport]]:
    root = tmp_path_factory.mktemp("honest")
    reports: list[SiteReport] = []
    day, tape = day_of(root, 0.5)

    def keep(topic: str, payload: bytes) -> None:
        parsed = topics.parse(topic)
        if payload and parsed is not None and parsed.area == "market" and parsed.kind == "report":
            reports.append(SiteReport.model_validate_json(payload))

    tape.then = keep
    day.run()
    return root, reports


def test_every_honest_report_of_a_day_passes(honest_day: tuple[Path, list[SiteReport]]) -> None:
    _, reports = honest_day
    assert len(reports) >= len(S.ids)
    for r in reports:
        reg = registration(site_config(S, S.ids.index(r.site)))
        assert report_problem(r, reg, CFG) is None, r.site


def test_a_report_scaled_by_1000_is_caught(honest_day: tuple[Path, list[SiteReport]]) -> None:
    _, reports = honest_day
    r = next(x for x in reports if x.site == S.ids[SITE])
    c = r.community
    liar = r.model_copy(
        update={
            "community": c.model_copy(update={"cost_eur": c.cost_eur * 1000 - 1e6}),
            "objective_eur": -1.9e23,
        }
    )
    why = report_problem(liar, REG, CFG)
    assert why is not None
    assert "EUR" in why


def test_the_coordinator_drops_an_implausible_settlement_and_counts_it(tmp_path: Path) -> None:
    """A forged settlement of 1000 times what the site could measure: the coordinator keeps the
    site's own, counts the forgery as implausible, and results.json holds no absurd figure."""
    day, _ = day_of(tmp_path, 1.0)
    top = max(abs(v) for v in REG.technical_max_kw + REG.technical_min_kw)

    async def forge() -> None:
        async with day.client("misbehaving-site", edge_identity(S.ids[SITE])) as c:
            record = _settlement(1000 * top / 4).model_copy(
                update={"interval_start": day.start + timedelta(minutes=15)}
            )
            await c.publish(topics.site(S.ids[SITE], "settlement"), record.model_dump_json().encode())

    day.at(timedelta(minutes=40), forge)
    results = day.run()
    rt = results.realtime
    assert rt is not None
    worst = max(abs(x.measured_kwh) for x in rt.settlements)
    assert worst < top
    assert rt.dropped_messages.get("implausible", 0) == 1, rt.dropped_messages


class _Lying:
    """A site's market whose every proposal is scaled by `factor` (valid-looking, not from assets)."""

    def __init__(self, inner: EdgeMarket, factor: float):
        self.inner, self.factor = inner, factor

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def handle(self, msg: Any, site: Any = None) -> list[Any]:
        out = []
        for cmd in self.inner.handle(msg, site):
            if isinstance(cmd, Send) and "/proposal/" in cmd.topic:
                p = decode(cmd.payload)
                assert isinstance(p, Proposal)
                cmd = Send(cmd.topic, encode(scaled(p, self.factor)))
            out.append(cmd)
        return out


def test_a_site_whose_proposals_keep_failing_the_checks_is_excluded_with_that_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A site proposing 1000 times what it registered: the day-ahead round goes on without it at the
    deadline, its exclusion names the checks it failed, and the others agree."""
    liar = S.ids[SITE]
    honest = virtual_day.market_machine

    def machine(config: Any, margins: Any) -> Any:
        inner = honest(config, margins)
        return _Lying(inner, 1000.0) if config.community.id == liar else inner

    monkeypatch.setattr(virtual_day, "market_machine", machine)
    day, _ = day_of(tmp_path, 0.5, dso_options={"iteration_timeout_s": 5.0})
    results = day.run()

    assert results.runtime is not None
    sites = {s.id: s for s in results.runtime.sites}
    assert sites[liar].state == "excluded"
    assert sites[liar].reason is not None
    assert "implausible" in sites[liar].reason
    assert "beyond its registered range" in sites[liar].reason or "outside its range" in sites[liar].reason
    assert all(s.state == "agreed" for site, s in sites.items() if site != liar)
    assert results.runtime.attempts[0].missed_deadline == [liar]
