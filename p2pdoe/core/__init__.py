"""The pure core: no I/O, no clocks, no globals. Arrays are numpy, shapes documented where defined."""
