"""The edge agent's decisions as pure machines: its part in the rounds (market) and its real-time
control of the site (envelope choice, enforcement, settlement)."""
