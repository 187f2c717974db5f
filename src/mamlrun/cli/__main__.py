"""``python -m mamlrun.cli`` (torchrun launches it this way)."""

from mamlrun.cli.main import main

main()
