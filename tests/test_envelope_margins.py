"""Envelope margins in rolling rounds: the schedule stays inside its envelope by a share of its
forecast load (and of PV and wind on the import side), softly: a network that pins the envelope
makes the site give the margin up at a price, never makes its problem infeasible."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import osqp
import pytest
import scipy.sparse as sp

from p2pdoe.core.community import MARGIN_SHORTFALL_EUR_PER_KWH, CommunityQP, envelope_margins
from p2pdoe.core.schemas.site import SiteConfig
from p2pdoe.core.site import community_data, site_config, site_qp
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario

SHARES = (0.08, 0.05)


@pytest.fixture(scope="module")
def config() -> SiteConfig:
    return site_config(load_scenario("default"), 0)


def solve(qp: CommunityQP, pin: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, str]:
    """The site's QP alone; `pin` fixes its envelope (lo, up), as a network that allows no other."""
    lower, upper = qp.lower.copy(), qp.upper.copy()
    if pin is not None:
        n_rows = qp.a.shape[0] - qp.layout.size  # the bounds are the identity rows at the end
        for name, values in zip(("lo", "up"), pin, strict=True):
            rows = np.arange(qp.layout.size)[qp.layout.block(name)] + n_rows
            lower[rows] = upper[rows] = values
    solver = osqp.OSQP()
    solver.setup(
        sp.diags(qp.p_diag, format="csc"), qp.q, qp.a, lower, upper,
        eps_abs=1e-7, eps_rel=1e-7, max_iter=200_000, polishing=True, verbose=False,
    )  # fmt: skip
    res = solver.solve()
    return np.asarray(res.x), res.info.status


def net(qp: CommunityQP, z: np.ndarray, config: SiteConfig) -> np.ndarray:
    return np.asarray(qp.injection @ z) - np.array(config.community.fixed_load_kw)


def test_without_margins_the_problem_is_unchanged(config: SiteConfig) -> None:
    plain, none = site_qp(config, Policy.DYNAMIC), site_qp(config, Policy.DYNAMIC, None)
    assert plain.layout == none.layout
    assert not plain.layout.margins
    with_margins = site_qp(config, Policy.DYNAMIC, SHARES)
    assert with_margins.layout.size == plain.layout.size + 2 * plain.layout.horizon


def test_the_margins_are_shares_of_the_forecast_and_capped(config: SiteConfig) -> None:
    c = community_data(config)
    m_up, m_lo = envelope_margins(c, *SHARES)
    assert np.allclose(m_up, 0.08 * c.fixed_load_kw)
    assert np.allclose(m_lo, 0.08 * c.fixed_load_kw + 0.05 * (c.pv_kw + c.wind_kw))
    x_min, x_max = c.technical_range_kw()
    huge = envelope_margins(c, 0.99, 0.99)
    assert np.all(huge[1] <= (x_max - x_min) / 4 + 1e-9)
    with pytest.raises(ValueError, match="margin shares"):
        envelope_margins(c, -0.1, 0.0)
    with pytest.raises(ValueError, match="margin shares"):
        envelope_margins(c, 0.1, 1.0)


def test_a_free_envelope_holds_the_schedule_inside_by_its_margins(config: SiteConfig) -> None:
    qp = site_qp(config, Policy.DYNAMIC, SHARES)
    z, status = solve(qp)
    assert status == "solved"
    x = net(qp, z, config)
    lay = qp.layout
    m_up, m_lo = envelope_margins(community_data(config), *SHARES)
    assert np.all(x - z[lay.block("lo")] >= m_lo - 1e-3)
    assert np.all(z[lay.block("up")] - x >= m_up - 1e-3)
    assert np.abs(z[lay.block("mlo")]).max() < 1e-3  # nothing given up
    assert np.abs(z[lay.block("mup")]).max() < 1e-3


def test_an_envelope_pinned_at_the_schedule_gives_the_margins_up_at_their_price(config: SiteConfig) -> None:
    """The envelope fixed 1 kW either side of the margin-free schedule: still feasible, and the site
    gives up exactly what the box lacks of its margins, each kW at MARGIN_SHORTFALL_EUR_PER_KWH."""
    plain = site_qp(config, Policy.DYNAMIC)
    z0, status = solve(plain)
    assert status == "solved"
    x0 = net(plain, z0, config)
    qp = site_qp(config, Policy.DYNAMIC, SHARES)
    z, status = solve(qp, (x0 - 1.0, x0 + 1.0))
    assert status == "solved"
    lay = qp.layout
    x = net(qp, z, config)
    assert np.all(np.abs(x - x0) <= 1.0 + 1e-3)
    m_up, m_lo = envelope_margins(community_data(config), *SHARES)
    given_up = z[lay.block("mlo")] + z[lay.block("mup")]
    lacking = np.maximum(m_lo + m_up - 2.0, 0.0)
    np.testing.assert_allclose(given_up, lacking, atol=1e-2)
    assert lacking.max() > 1.0  # the box really lacks margin
    price = MARGIN_SHORTFALL_EUR_PER_KWH * config.dt_h
    assert qp.q[lay.block("mlo")] == pytest.approx(np.full(lay.horizon, price))


def test_a_community_without_margins_keeps_none(config: SiteConfig) -> None:
    c = replace(community_data(config), margin_kw=None)
    assert c.margin_kw is None  # an agent without a meter, and the centralized reference
