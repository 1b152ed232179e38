"""The project's error hierarchy: every error a user can cause is one of these, with one clear line."""


class P2PDoeError(Exception):
    """Base of every error p2pdoe raises on purpose."""


class FeederError(P2PDoeError):
    """A feeder is unusable: not radial, islanded, no slack bus, bad numbers."""


class MatpowerFormatError(FeederError):
    """A MATPOWER case file cannot be read."""


class ScenarioError(P2PDoeError):
    """A scenario file is invalid or inconsistent with its feeder."""


class InfeasibleError(P2PDoeError):
    """A problem has no feasible point (for example, background load alone violates the limits)."""
