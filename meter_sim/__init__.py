"""The meter simulator: one per site, it stands in for the site's meter and plant in hardware-in-the-
loop tests. It imports the core and the transport, never the edge agent, the coordinator or the CLI."""

from p2pdoe.services.blas import one_blas_thread

one_blas_thread()  # before numpy loads: see p2pdoe.services.blas
