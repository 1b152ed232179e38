"""p2pdoe: P2P energy trading between energy communities under dynamic operating envelopes.

Packages, lowest first (dependencies point one way):
- `p2pdoe.core`: the model, free of I/O (feeder, LinDistFlow, AC power flow, communities, envelopes, market).
- `p2pdoe.io`: files (MATPOWER cases, scenario files, results).
- `p2pdoe.reference`: the centralized reference solve (cvxpy).
- `p2pdoe.analysis`: AC checks and result assembly; `p2pdoe.report`: tables and plots.
- `edge_agent`, `dso_coordinator`: the services; `p2pdoe.cli`: the command line.
"""

__version__ = "0.1.0"
