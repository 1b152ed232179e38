"""The meter simulator: one per site, it stands in for the site's meter and plant in hardware-in-the-
loop tests. It imports the core and the transport, never the edge agent, the coordinator or the CLI."""
