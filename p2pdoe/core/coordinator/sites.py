"""Who the coordinator can count on: each connected site's registration, whether it is online, and
why a site was left out of a round (kept once it is back, for the results)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from p2pdoe.core.agreement.coordination import registration_problem
from p2pdoe.core.day_configs import registration_on
from p2pdoe.core.schemas.coordinator import CoordinatorConfig
from p2pdoe.core.schemas.runtime import Registration, SiteStatus

log = logging.getLogger("dso_coordinator")
NOT_READY = "not registered and online by the registration deadline"


@dataclass
class SiteRegistry:
    cfg: CoordinatorConfig
    registrations: dict[str, Registration] = field(default_factory=dict)
    online: set[str] = field(default_factory=set)
    excluded: dict[str, str] = field(default_factory=dict)  # left out of the next opening, and why
    reasons: dict[str, str] = field(default_factory=dict)  # why each site was last left out
    refused: int = 0

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.cfg.sites]

    def ready(self) -> set[str]:
        return {s for s in self.ids if s in self.registrations and s in self.online}

    def all_ready(self) -> bool:
        return len(self.ready()) == len(self.ids)

    def registered(self, msg: Registration) -> bool:
        """Keep a registration that matches the coordinator's records (read on its day, p2pdoe.core.
        day_configs.registration_on); False if refused."""
        msg = registration_on(msg, self.cfg)
        problem = registration_problem(self.cfg, msg)
        if problem is not None:
            log.warning("refused the registration of %s: %s", msg.site, problem)
            self.refused += 1
            return False
        self.registrations[msg.site] = msg
        return True

    def status(self, msg: SiteStatus, retained: bool) -> None:
        """A live `online` from a site left out means it restarted: it rejoins at the next opening."""
        if msg.state != "online":
            self.online.discard(msg.site)
            return
        self.online.add(msg.site)
        if not retained and self.excluded.pop(msg.site, None) is not None:
            log.info("%s is back online; it rejoins at the next opening", msg.site)

    def exclude(self, site: str, why: str) -> None:
        self.excluded[site] = self.reasons[site] = why

    def exclude_unready(self) -> None:
        for site in self.ids:
            if site not in self.ready():
                self.exclude(site, NOT_READY)
                log.warning("%s: not registered and online in time; on its default envelope", site)

    def left_out(self) -> set[str]:
        return set(self.excluded) | (set(self.ids) - self.ready())

    def why_left_out(self, site: str) -> str:
        return self.excluded.get(site) or self.reasons.get(site, "not online when the round was opened")
