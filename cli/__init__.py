"""The ``ia2cache`` command line: a thin Typer layer over the ``ia2cache`` library."""
