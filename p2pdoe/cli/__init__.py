"""The `p2pdoe` command line."""

from p2pdoe.services.blas import one_blas_thread

one_blas_thread()  # before numpy loads: see p2pdoe.services.blas
