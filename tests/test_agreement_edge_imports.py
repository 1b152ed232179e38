"""An edge agent (one community's gateway) takes part in a round without cvxpy or Clarabel: checked
in a fresh interpreter, where nothing else has imported them yet."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What pyproject.toml's import contract keeps away from edge agents, plus the centralized solver.
FORBIDDEN = ("cvxpy", "clarabel", "matplotlib", "dso_coordinator", "p2pdoe.reference", "p2pdoe.cli")

EDGE = textwrap.dedent(
    """
    import json
    import sys

    import edge_agent
    from p2pdoe.core.agreement.community import CommunityParticipant
    from p2pdoe.core.agreement.local_solver import LocalSolver
    from p2pdoe.core.agreement.protocol import Publish, Received
    from p2pdoe.core.market import community_qps
    from p2pdoe.core.schemas.messages import AdmmParameters, Proposal, RoundOpen, decode, encode
    from p2pdoe.core.solution import Policy
    from p2pdoe.io.scenarios import load_scenario

    assert edge_agent.CommunityParticipant is CommunityParticipant
    assert LocalSolver is not None
    s = load_scenario("default")
    qps = community_qps(s, Policy.DYNAMIC)
    me = CommunityParticipant(s.ids[0], tuple(s.ids[m] for m in s.market.peers[0]), qps[0], s.dt_h)
    a = s.admm
    opening = RoundOpen(
        round="edge-check",
        policy="dynamic",
        start="2026-06-21T00:00:00Z",
        dt_h=s.dt_h,
        intervals=s.horizon,
        sites=s.ids,
        admm=AdmmParameters(
            rho_trade_eur_per_kw2h=a.rho_trade,
            rho_envelope_eur_per_kw2h=a.rho_envelope,
            over_relaxation=a.over_relaxation,
            max_iterations=a.max_iterations,
        ),
        initial_trade_price_eur_per_kwh=[float(v) for v in 0.5 * (s.price_import + s.price_export)],
    )
    out = me.handle(Received(decode(encode(opening))))
    assert len(out) == 1 and isinstance(out[0], Publish), out
    proposal = decode(encode(out[0].message))
    assert isinstance(proposal, Proposal) and proposal.sender == s.ids[0] and proposal.iteration == 0
    assert proposal.envelope is not None and len(proposal.envelope.lo_kw) == s.horizon
    print(json.dumps(sorted(sys.modules)))
    """
)


def modules_after(script: str) -> list[str]:
    """The modules a fresh interpreter holds after `script`, which prints them last."""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    modules: list[str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return modules


def among(modules: list[str], packages: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == f or m.startswith(f + ".") for f in packages)]


def test_an_edge_participant_runs_without_cvxpy_or_clarabel() -> None:
    modules = modules_after(EDGE)
    assert "p2pdoe.core.agreement.community" in modules  # the check ran where it should
    assert among(modules, FORBIDDEN) == []


# What an unsigned edge agent never needs: the DSO's solvers and grid checks, the coordinator's
# results, cryptography (only with a signing key), YAML (only with --config), prometheus-client (only
# with --metrics-port), pymodbus and pysunspec2 (only with --meter-modbus). Each costs resident memory
# on a gateway (benchmarks/edge_memory.py).
EDGE_NEVER = (
    "p2pdoe.core.agreement.dso",
    "p2pdoe.core.agreement.grid_solver",
    "p2pdoe.core.agreement.coordination",
    "p2pdoe.core.allocation",
    "p2pdoe.core.envelope",
    "p2pdoe.analysis.results",
    "p2pdoe.analysis.network_check",
    "p2pdoe.services.signing",
    "cryptography",
    "yaml",
    "prometheus_client",
    "pymodbus",
    "sunspec2",
    "p2pdoe.services.metrics",
    "p2pdoe.services.sunspec",
)

AGENT = textwrap.dedent(
    """
    import json
    import sys

    import edge_agent.__main__

    print(json.dumps(sorted(sys.modules)))
    """
)


def test_an_edge_agent_imports_nothing_of_the_dso_or_of_signing_it_does_not_use() -> None:
    modules = modules_after(AGENT)
    assert "edge_agent.service" in modules  # the check ran where it should
    assert "p2pdoe.analysis.accounts" in modules
    assert among(modules, EDGE_NEVER) == []
