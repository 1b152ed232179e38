"""The default envelopes under each sharing rule, side by side (`p2pdoe compare`).

Per site: the usable width (the mean over the day of the part of its default box its assets can
reach) and the hours on which the box does not hold its need to stay whole; per rule, Jain's fairness
index of the usable widths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from p2pdoe.core.agreement.coordination import Defaults, default_envelopes
from p2pdoe.core.allocation import SHARINGS, TOL_KW, jain_index
from p2pdoe.core.feeder_config import feeder_of
from p2pdoe.core.scenario import Scenario
from p2pdoe.core.schemas.coordinator import CoordinatorConfig
from p2pdoe.core.site import coordinator_config


@dataclass(frozen=True)
class SiteDefault:
    site: str
    lo_kw: float  # the box inside its default all day
    up_kw: float
    usable_kw: float  # mean over the day of |[lo, up] intersected with the technical range|
    short_h: float  # hours whose need to stay whole lies outside the box


@dataclass(frozen=True)
class RuleDefaults:
    sharing: str
    sites: tuple[SiteDefault, ...]
    jain: float  # of the usable widths


def compare_sharing(s: Scenario, profile: bool = True) -> tuple[RuleDefaults, ...]:
    """Every sharing rule on the same day; `profile`: a default box per interval, else one a day."""
    cfg = coordinator_config(s)
    feeder = feeder_of(cfg.feeder)
    out = []
    for sharing in SHARINGS:
        update = {"default_sharing": sharing, "default_profile": profile}
        d = default_envelopes(cfg.model_copy(update=update), feeder)
        sites = tuple(_site(s, d, c) for c in range(len(s.communities)))
        out.append(RuleDefaults(sharing, sites, jain_index(np.array([x.usable_kw for x in sites]))))
    return tuple(out)


def _site(s: Scenario, d: Defaults, c: int) -> SiteDefault:
    data = s.communities[c]
    lo, up = d.lo_kw[c], d.up_kw[c]
    x_min, x_max = data.technical_range_kw()
    usable = np.clip(np.minimum(up, x_max) - np.maximum(lo, x_min), 0.0, None)
    short = lo > -data.stay_whole_import_kw() + TOL_KW
    return SiteDefault(
        data.id, float(lo.max()), float(up.min()), float(usable.mean()), float(short.sum() * s.dt_h)
    )


def default_fairness(cfg: CoordinatorConfig, d: Defaults) -> float:
    """Jain's index of the sites' mean default widths, each within its connection capacity (the
    coordinator's view: it knows the capacities, not the sites' assets)."""
    by_id = {site.id: site for site in cfg.sites}
    widths = []
    for c, site_id in enumerate(d.sites):
        site = by_id[site_id]
        up = np.minimum(d.up_kw[c], site.export_capacity_kw)
        lo = np.maximum(d.lo_kw[c], -site.import_capacity_kw)
        widths.append(float(np.clip(up - lo, 0.0, None).mean()))
    return jain_index(np.array(widths))
