"""The edge agent: one per energy community, on a Raspberry-Pi-class gateway.

Its side of the agreement is `CommunityParticipant` (sans-I/O, OSQP only): it solves the community's
local ADMM subproblem and speaks the wire messages of `p2pdoe.core.schemas.messages`. The MQTT service
and envelope enforcement against the meter arrive with the runtime issues. It imports the core and
never cvxpy, the coordinator or the CLI (import-linter contract in pyproject.toml).
"""

from p2pdoe.services.blas import one_blas_thread

one_blas_thread()  # before numpy loads: see p2pdoe.services.blas

from p2pdoe.core.agreement.community import CommunityOutcome, CommunityParticipant  # noqa: E402

__all__ = ["CommunityOutcome", "CommunityParticipant"]
