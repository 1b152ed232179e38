"""The DSO's safe set depends only on its GridView (network, background, each site's bus and
declared reactive range), and sites sharing a bus add up."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from p2pdoe.core.envelope import grid_view, safe_set
from p2pdoe.io.scenarios import load_scenario


def test_the_safe_set_of_a_scenario_is_that_of_its_grid_view() -> None:
    s = load_scenario("default")
    a, b = safe_set(s), safe_set(grid_view(s))
    for x, y in ((a.upper, b.upper), (a.lower, b.lower)):
        assert np.array_equal(x.g, y.g)
        assert np.array_equal(x.h, y.h)


def test_two_sites_on_one_bus_count_their_reactive_power_twice() -> None:
    """Splitting one site's declared reactive range over two sites on its bus changes no row."""
    g = grid_view(load_scenario("default"))
    one = replace(g, site_bus=g.site_bus[:1], q_min_kvar=g.q_min_kvar[:1], q_max_kvar=g.q_max_kvar[:1])
    two = replace(
        g,
        site_bus=np.repeat(g.site_bus[:1], 2),
        q_min_kvar=np.repeat(g.q_min_kvar[:1] / 2, 2, axis=0),
        q_max_kvar=np.repeat(g.q_max_kvar[:1] / 2, 2, axis=0),
    )
    a, b = safe_set(one), safe_set(two)
    for x, y in ((a.upper, b.upper), (a.lower, b.lower)):
        assert np.allclose(x.h, y.h, rtol=0, atol=1e-9)
        assert np.allclose(x.g[:, 0], y.g[:, 0])
        assert np.allclose(y.g[:, 0], y.g[:, 1])
