"""The DSO coordinator: keeps voltages and flows inside limits and publishes dynamic operating envelopes.

Its constraints are `p2pdoe.core.envelope.safe_set`; its reference optimum is
`p2pdoe.reference.centralized`. It imports the core and never the edge agent or the CLI.
The service arrives with the ADMM and runtime work (issues 3 and 4).
"""
