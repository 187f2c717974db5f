"""The one exception type that the CLI turns into a one-line message and a non-zero exit.

Raise it for anything the user can fix (a wrong path, a corrupt file, an impossible task
shape); let real bugs raise their own exceptions so that their tracebacks stay visible.
"""


class MamlrunError(Exception):
    """A problem with the user's input, reported as ``mamlrun: error: <message>``."""


class SweepConfigError(MamlrunError):
    """A problem that every job of a sweep would hit: it stops the whole sweep instead of
    being recorded as one failed job."""
