"""The DSO coordinator: keeps voltages and flows inside limits and publishes dynamic operating envelopes.

Its side of the agreement is `DsoParticipant` (sans-I/O): it grants envelopes from
`p2pdoe.core.envelope.safe_set`, always network-safe, and paces the ADMM iterations. Its reference
optimum is `p2pdoe.reference.centralized`. The MQTT service arrives with the runtime issue. It imports
the core and never the edge agent or the CLI.
"""

from p2pdoe.services.blas import one_blas_thread

one_blas_thread()  # before numpy loads: see p2pdoe.services.blas

from p2pdoe.core.agreement.dso import DsoOutcome, DsoParticipant  # noqa: E402

__all__ = ["DsoOutcome", "DsoParticipant"]
