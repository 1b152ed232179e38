"""`p2pdoe site-config`: each edge gets its own community's data only, and builds the same QP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_p2pdoe

from p2pdoe.core.agreement.setup import participants
from p2pdoe.core.community import CommunityQP
from p2pdoe.core.scenario import admm_settings
from p2pdoe.core.site import coordinator_config, site_qp
from p2pdoe.core.solution import Policy
from p2pdoe.io.scenarios import load_scenario
from p2pdoe.io.site_configs import read_site_config


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    run = run_p2pdoe("site-config", "--out", str(out))
    assert run.returncode == 0, run.stderr
    return out


def _same(a: CommunityQP, b: CommunityQP) -> bool:
    return bool(
        np.array_equal(a.p_diag, b.p_diag)
        and np.array_equal(a.q, b.q)
        and (a.a != b.a).nnz == 0
        and np.array_equal(a.lower, b.lower)
        and np.array_equal(a.upper, b.upper)
        and a.constant == b.constant
    )


@pytest.mark.parametrize("policy", list(Policy))
def test_each_site_builds_the_scenarios_qp_from_its_file_alone(written: Path, policy: Policy) -> None:
    s = load_scenario("default")
    reference = participants(s, policy, "r").qps
    for c, site_id in enumerate(s.ids):
        config = read_site_config(written / "sites" / f"{site_id}.json")
        assert [p.id for p in config.peers] == [s.ids[m] for m in s.market.peers[c]]
        assert _same(site_qp(config, policy), reference[c])


def test_a_site_file_holds_no_other_communitys_data(written: Path) -> None:
    s = load_scenario("default")
    for site_id in s.ids:
        doc = json.loads((written / "sites" / f"{site_id}.json").read_text())
        assert doc["community"]["id"] == site_id
        assert set(doc) == {
            "schema_version", "kind", "scenario", "start", "timezone", "dt_h", "price_import_eur_per_kwh",
            "price_export_eur_per_kwh", "community", "peers", "market",
        }  # fmt: skip
        assert all(set(p) == {"id", "fee_eur_per_kwh"} for p in doc["peers"])
        others = [o for o in s.communities if o.id != site_id]
        text = json.dumps(doc)
        for other in others:
            if other.fixed_load_kw.any():
                assert json.dumps(other.fixed_load_kw.tolist())[1:-1] not in text


def test_site_config_of_a_missing_scenario_fails_with_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run_p2pdoe("site-config", "--scenario", "nope.yaml", "--out", str(tmp_path)))


def test_the_coordinators_file_carries_every_admm_setting_of_the_scenario() -> None:
    admm = {
        "anderson": {"memory": 7, "safeguard_factor": 0.9},
        "eps_price_eur_per_kwh": 2e-5,
        "eps_rel": 1e-4,
    }
    s = load_scenario("default", {"admm": admm})
    assert admm_settings(coordinator_config(s).admm) == s.admm
    assert s.admm.anderson.memory == 7
    assert s.admm.eps_price == 2e-5
