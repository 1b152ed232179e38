"""The agreement whose envelopes stand, and the coordinator's checkpoint of it.

After every round the rolling horizon keeps (and, with `--checkpoint`, saves) what it needs of the
agreement: the granted boxes from its first interval on, and its final agreed values, prices and
penalties as a warm start. A coordinator restarted mid-day loads it, publishes the envelope in force
at once (the grants were safe together when agreed, and still are: safety depends on the boxes, not
on the sites' state), and warm-starts its next round from it, moved on by the intervals that passed.
A checkpoint of another day, interval length or horizon is ignored with a warning.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from p2pdoe.core.agreement.coordination import RoundSetup
from p2pdoe.core.agreement.dso import DsoOutcome
from p2pdoe.core.agreement.warm import shifted, warm_start_from
from p2pdoe.core.schemas.messages import WarmStart

log = logging.getLogger("dso_coordinator.checkpoint")


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


def save(path: Path, standing: Standing) -> None:
    """Write atomically: a crash leaves the old checkpoint or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(standing.model_dump_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path, day_start: datetime, interval_s: int, intervals: int) -> Standing | None:
    """The checkpoint at `path` if it belongs to this day, else None (with a warning why)."""
    if not path.exists():
        return None
    try:
        standing = Standing.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        log.warning("ignored the checkpoint %s: unreadable (%s)", path, str(exc).splitlines()[0])
        return None
    mine = (day_start, interval_s, intervals)
    theirs = (standing.day_start, standing.interval_s, standing.intervals)
    if theirs != mine:
        log.warning("ignored the checkpoint %s: it is of another day (%s, not %s)", path, theirs, mine)
        return None
    return standing
