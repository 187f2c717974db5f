"""mamlrun: a command-line experiment runner for MAML and its family."""

__version__ = "0.1.0"
