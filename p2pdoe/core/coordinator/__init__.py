"""The coordinator's decisions as pure machines: rounds, the rolling horizon, the day."""
