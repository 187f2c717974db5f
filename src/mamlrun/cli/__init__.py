"""The ``mamlrun`` command: what the command line means, and the one-line errors.

The top layer: it may import every other package; none of them imports it.
"""

from mamlrun.cli.main import main

__all__ = ["main"]
