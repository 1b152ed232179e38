"""Real-time operation, pure core: the simulated clock, the plant, forecast errors, envelope
enforcement and fallback."""
