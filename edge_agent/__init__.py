"""The edge agent: one per energy community, on a Raspberry-Pi-class gateway.

It will solve its community's local ADMM subproblem with OSQP (`p2pdoe.core.community` builds the QP),
exchange messages with the DSO coordinator over MQTT and enforce the dynamic operating envelope
against its meter. It imports the core and never cvxpy, the coordinator or the CLI (import-linter
contract in pyproject.toml). The services arrive with the ADMM and runtime work (issues 3 and 4).
"""
