"""Real-time operation, pure core: the simulated clock, plant, forecast errors, envelope enforcement and fallback."""
