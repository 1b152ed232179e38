"""Golden figures of the IEEE 33-bus feeder against the published base case.

Source: M. E. Baran and F. F. Wu, "Network reconfiguration in distribution systems for loss reduction and
load balancing", IEEE Trans. Power Delivery 4(2):1401-1407, 1989, doi:10.1109/61.25627, with the data as
in MATPOWER's case33bw.m (12.66 kV, 10 MVA base, substation at 1.0 p.u.). Published base case: load
3715 kW / 2300 kvar, losses 202.68 kW / 135.14 kvar, minimum voltage 0.9131 p.u. at bus 18, bus 33 at
0.9166 p.u. LinDistFlow (lossless) gives about 0.9159 p.u. at bus 18, i.e. it is optimistic by about
0.003 p.u. there (/work/shared/FORMULATION.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from p2pdoe.core.network import Feeder, LinDistFlow, electrical_distance_ohm
from p2pdoe.core.powerflow import PowerFlowResult, run_power_flow
from p2pdoe.io.scenarios import data_path, load_feeder

IEEE33_FILE = data_path("feeders", "ieee33bw.m")
Z_BASE_OHM = 12.66**2 / 10.0

# Branch data of Baran & Wu (1989), Table 1, in ohm: (from, to, r, x). A sample across the feeder.
BARAN_WU_OHM = [
    (1, 2, 0.0922, 0.0470),
    (2, 3, 0.4930, 0.2511),
    (6, 7, 0.1872, 0.6188),
    (17, 18, 0.7320, 0.5740),
    (2, 19, 0.1640, 0.1565),
    (3, 23, 0.4512, 0.3083),
    (6, 26, 0.2030, 0.1034),
    (32, 33, 0.3410, 0.5302),
]
TIE_SWITCHES = [(21, 8), (9, 15), (12, 22), (18, 33), (25, 29)]


@pytest.fixture(scope="module")
def feeder() -> Feeder:
    return load_feeder("ieee33")


@pytest.fixture(scope="module")
def ac(feeder: Feeder) -> PowerFlowResult:
    return run_power_flow(feeder, -feeder.load_kw, -feeder.load_kvar, v0_pu=1.0)


@pytest.fixture(scope="module")
def ldf_v(feeder: Feeder) -> np.ndarray:
    return LinDistFlow(feeder).voltages(1.0, -feeder.load_kw, -feeder.load_kvar)


def _v(feeder: Feeder, values: np.ndarray, bus_id: int) -> float:
    return float(values[feeder.index_of(bus_id)])


def _path_to_root(feeder: Feeder, j: int) -> list[int]:
    """Branches (by the bus they feed) from bus index j up to the root, walking parent pointers."""
    path = []
    while j != feeder.root:
        path.append(j)
        j = int(feeder.parent[j])
    return path


# --- data ---------------------------------------------------------------------------------------------


def test_bases_and_total_load(feeder: Feeder) -> None:
    assert feeder.n_bus == 33
    assert feeder.base_mva == 10.0
    assert feeder.base_kv == 12.66
    assert feeder.z_base_ohm == pytest.approx(Z_BASE_OHM, rel=1e-12)
    assert feeder.load_kw.sum() == pytest.approx(3715.0, abs=1e-6)
    assert feeder.load_kvar.sum() == pytest.approx(2300.0, abs=1e-6)
    assert list(feeder.bus_ids) == list(range(1, 34))
    assert int(feeder.bus_ids[feeder.root]) == 1


@pytest.mark.parametrize(("f", "t", "r_ohm", "x_ohm"), BARAN_WU_OHM)
def test_branch_impedances_match_the_paper_in_ohm(
    feeder: Feeder, f: int, t: int, r_ohm: float, x_ohm: float
) -> None:
    k = feeder.index_of(t)
    assert int(feeder.bus_ids[feeder.parent[k]]) == f
    assert feeder.r_pu[k] * feeder.z_base_ohm == pytest.approx(r_ohm, abs=1e-4)
    assert feeder.x_pu[k] * feeder.z_base_ohm == pytest.approx(x_ohm, abs=1e-4)


def test_tie_switches_are_not_in_the_topology(feeder: Feeder) -> None:
    assert len(feeder.branches) == 32
    assert feeder.root not in set(feeder.branches.tolist())
    assert sorted(feeder.order.tolist()) == list(range(33))  # every bus reached exactly once
    assert int(feeder.parent[feeder.root]) == feeder.root
    # Every other bus has exactly one parent, and every parent-child pair is an in-service branch.
    edges = {
        frozenset((int(feeder.bus_ids[feeder.parent[k]]), int(feeder.bus_ids[k]))) for k in feeder.branches
    }
    assert len(edges) == 32
    for a, b in TIE_SWITCHES:
        assert frozenset((a, b)) not in edges
    in_service = _in_service_branches(IEEE33_FILE.read_text(encoding="utf-8"))
    assert edges == in_service


def _in_service_branches(text: str) -> set[frozenset[int]]:
    block = text.split("mpc.branch = [", 1)[1].split("];", 1)[0]
    out = set()
    for line in block.splitlines():
        tokens = line.replace(";", " ").split()
        if len(tokens) >= 11 and float(tokens[10]) != 0:
            out.add(frozenset((int(float(tokens[0])), int(float(tokens[1])))))
    return out


# --- AC power flow ------------------------------------------------------------------------------------


def test_ac_sweep_converges(ac: PowerFlowResult) -> None:
    assert ac.converged
    assert ac.max_mismatch_pu < 1e-10
    assert 1 < ac.iterations < 100


def test_ac_losses_match_published(ac: PowerFlowResult) -> None:
    assert float(ac.losses_kw) == pytest.approx(202.68, abs=0.01)
    assert float(ac.losses_kvar) == pytest.approx(135.14, abs=0.01)


def test_ac_power_balance_at_the_substation(feeder: Feeder, ac: PowerFlowResult) -> None:
    out_of_root = [k for k in feeder.branches if feeder.parent[k] == feeder.root]
    assert float(ac.branch_p_kw[out_of_root].sum()) == pytest.approx(3715.0 + float(ac.losses_kw), abs=1e-6)
    assert float(ac.branch_q_kvar[out_of_root].sum()) == pytest.approx(
        2300.0 + float(ac.losses_kvar), abs=1e-6
    )


def test_ac_voltages_match_published(feeder: Feeder, ac: PowerFlowResult) -> None:
    j = int(np.argmin(ac.v_pu))
    assert int(feeder.bus_ids[j]) == 18
    assert float(ac.v_pu[j]) == pytest.approx(0.9131, abs=5e-5)
    assert _v(feeder, ac.v_pu, 33) == pytest.approx(0.9166, abs=5e-5)
    assert _v(feeder, ac.v_pu, 1) == pytest.approx(1.0, abs=1e-12)
    # Every bus below the substation, and 21 buses below 0.95 p.u. (FORMULATION.md's pitfall).
    assert np.all(np.delete(ac.v_pu, feeder.root) < 1.0)
    assert int(np.count_nonzero(ac.v_pu < 0.95)) == 21


# --- LinDistFlow --------------------------------------------------------------------------------------


def test_lindistflow_min_voltage(feeder: Feeder, ldf_v: np.ndarray) -> None:
    j = int(np.argmin(ldf_v))
    assert int(feeder.bus_ids[j]) == 18
    assert float(ldf_v[j]) == pytest.approx(0.9159, abs=5e-5)


def test_lindistflow_is_optimistic_against_ac(feeder: Feeder, ac: PowerFlowResult, ldf_v: np.ndarray) -> None:
    gap = _v(feeder, ldf_v, 18) - _v(feeder, ac.v_pu, 18)
    assert 0.002 < gap < 0.004
    # Lossless flows under-state the drop at every bus (loads only).
    assert np.all(ldf_v >= ac.v_pu - 1e-12)


def test_lindistflow_matrices(feeder: Feeder) -> None:
    model = LinDistFlow(feeder)
    r, x = model.r_matrix, model.x_matrix
    assert r.shape == x.shape == (33, 33)
    np.testing.assert_allclose(r, r.T, atol=0, rtol=0)
    np.testing.assert_allclose(x, x.T, atol=0, rtol=0)
    assert np.all(r >= 0)
    assert np.all(x >= 0)
    assert np.all(r[feeder.root] == 0)
    for j in range(33):
        path = _path_to_root(feeder, j)
        assert r[j, j] == pytest.approx(float(feeder.r_pu[path].sum()), rel=1e-12, abs=1e-15)
        assert x[j, j] == pytest.approx(float(feeder.x_pu[path].sum()), rel=1e-12, abs=1e-15)
    j18 = feeder.index_of(18)
    assert r[j18, j18] == pytest.approx(11.0628 / Z_BASE_OHM, abs=1e-4 / Z_BASE_OHM)


def test_lindistflow_off_diagonal_is_the_shared_path(feeder: Feeder) -> None:
    r = LinDistFlow(feeder).r_matrix
    j18, j33, j22 = feeder.index_of(18), feeder.index_of(33), feeder.index_of(22)
    # 18 and 33 share 1-2-3-4-5-6; 18 and 22 share only 1-2.
    shared_18_33 = feeder.r_pu[[feeder.index_of(b) for b in (2, 3, 4, 5, 6)]].sum()
    assert r[j18, j33] == pytest.approx(shared_18_33, rel=1e-12)
    assert r[j18, j22] == pytest.approx(feeder.r_pu[feeder.index_of(2)], rel=1e-12)


def test_electrical_distance(feeder: Feeder) -> None:
    j1, j18, j33 = feeder.index_of(1), feeder.index_of(18), feeder.index_of(33)
    assert electrical_distance_ohm(feeder, j1, j18) == pytest.approx(11.0628, abs=1e-3)
    assert electrical_distance_ohm(feeder, j18, j18) == 0.0
    r = LinDistFlow(feeder).r_matrix
    expected = (r[j18, j18] + r[j33, j33] - 2 * r[j18, j33]) * feeder.z_base_ohm
    assert electrical_distance_ohm(feeder, j18, j33) == pytest.approx(expected, rel=1e-12)
    assert electrical_distance_ohm(feeder, j33, j18) == pytest.approx(expected, rel=1e-12)


# --- CLI ----------------------------------------------------------------------------------------------


def _powerflow_json(feeder_arg: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "p2pdoe.cli.main", "powerflow", "--feeder", feeder_arg, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def cli_named() -> dict:
    return _powerflow_json("ieee33")


def test_cli_powerflow_json(cli_named: dict) -> None:
    report = cli_named
    assert report["converged"] is True
    assert report["losses_kw"] == pytest.approx(202.68, abs=0.01)
    assert report["losses_kvar"] == pytest.approx(135.14, abs=0.01)
    assert report["vmin_pu"] == pytest.approx(0.9131, abs=5e-5)
    assert report["vmin_bus"] == 18
    assert report["load_kw"] == pytest.approx(3715.0)
    assert report["lindistflow_vmin_bus"] == 18
    assert report["lindistflow_vmin_pu"] == pytest.approx(0.9159, abs=5e-5)
    assert len(report["buses"]) == 33
    assert [row["bus"] for row in report["buses"]] == list(range(1, 34))
    bus33 = report["buses"][32]
    assert bus33["v_pu"] == pytest.approx(0.9166, abs=5e-5)


def test_cli_powerflow_from_file_path_gives_the_same_numbers(cli_named: dict) -> None:
    assert Path(IEEE33_FILE).is_file()
    report = _powerflow_json(str(IEEE33_FILE))
    for key in (
        "converged",
        "losses_kw",
        "losses_kvar",
        "vmin_pu",
        "vmin_bus",
        "load_kw",
        "lindistflow_vmin_pu",
    ):
        assert report[key] == cli_named[key], key
    assert report["buses"] == cli_named["buses"]
