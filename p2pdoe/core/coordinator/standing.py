"""The agreement whose envelopes stand: what the rolling horizon keeps of the last agreement (the
granted boxes from its first interval on, and its final agreed values, prices and penalties as a
warm start), and what the coordinator's checkpoint holds (dso_coordinator.checkpoint saves it)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict

from p2pdoe.core.agreement.coordination import RoundSetup
from p2pdoe.core.agreement.dso import DsoOutcome
from p2pdoe.core.agreement.warm import shifted, warm_start_from
from p2pdoe.core.schemas.messages import WarmStart


class Standing(BaseModel):
    """An agreement over intervals offset..offset+len-1 of the day."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    kind: Literal["coordinator_checkpoint"] = "coordinator_checkpoint"
    day_start: AwareDatetime
    interval_s: int
    intervals: int  # of the day
    offset: int  # the agreement's first interval of the day
    round: str
    sites: list[str]
    lo_kw: list[list[float]]  # per site of `sites`, per interval from `offset`; empty: no grants
    up_kw: list[list[float]]
    warm: WarmStart
    rho_trade: float
    rho_envelope: float

    def box(self, site: str, t: int) -> tuple[float, float] | None:
        """The granted box of `site` for interval t of the day, or None (not granted)."""
        k = t - self.offset
        if site not in self.sites or not self.lo_kw or not 0 <= k < len(self.lo_kw[0]):
            return None
        c = self.sites.index(site)
        return self.lo_kw[c][k], self.up_kw[c][k]

    def warm_for(self, t: int, sites: tuple[str, ...]) -> WarmStart | None:
        """The warm start of a round over intervals t..end of the day among `sites`."""
        if not set(sites) & set(self.sites) or t < self.offset:
            return None
        return shifted(self.warm, t - self.offset, self.intervals - t, sites)

    @property
    def rho(self) -> tuple[float, float]:
        return self.rho_trade, self.rho_envelope


def standing_from(
    setup: RoundSetup, outcome: DsoOutcome, offset: int, day_start: datetime, interval_s: int, intervals: int
) -> Standing:
    plan = setup.dso.plan
    horizon = outcome.trades.y.shape[1]
    granted = outcome.granted_lo_kw is not None and outcome.granted_up_kw is not None
    return Standing(
        day_start=day_start,
        interval_s=interval_s,
        intervals=intervals,
        offset=offset,
        round=outcome.round,
        sites=list(setup.sites),
        lo_kw=outcome.granted_lo_kw.tolist() if granted else [],  # type: ignore[union-attr]
        up_kw=outcome.granted_up_kw.tolist() if granted else [],  # type: ignore[union-attr]
        warm=warm_start_from(plan, outcome, 0, horizon, tuple(plan.sites)),
        rho_trade=outcome.rho_trade,
        rho_envelope=outcome.rho_envelope,
    )
