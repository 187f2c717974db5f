"""The one exception type that the CLI turns into a one-line message and a non-zero exit.

Raise it for anything the user can fix (a wrong path, a corrupt file, an impossible task
shape); let real bugs raise their own exceptions so that their tracebacks stay visible.

A message is for a person: a Python object's repr (``<_io.BytesIO object at 0x7f8d…>``, which
libraries put into their own messages) says nothing to them, so ``plain`` replaces it by the
object's type, and under ``$MAMLRUN_STRICT_MESSAGES`` (set by the tests) such a message is a
bug that fails loudly, so that every message a test provokes is checked.
"""

from __future__ import annotations

import os
import re

_OBJECT_REPR = re.compile(r"<(?:[\w.]+\.)?(?P<type>\w+) object at 0x[0-9a-fA-F]+>")
STRICT = "MAMLRUN_STRICT_MESSAGES"


def plain(text: str) -> str:
    """``text`` with every ``<module.Type object at 0x…>`` replaced by ``a Type``."""
    if _OBJECT_REPR.search(text) and os.environ.get(STRICT):
        raise AssertionError(f"a Python object's repr in a user-facing message: {text}")
    return _OBJECT_REPR.sub(lambda m: f"a {m['type']}", text)


class MamlrunError(Exception):
    """A problem with the user's input, reported as ``mamlrun: error: <message>``."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(plain(str(message)), *args)


class SweepConfigError(MamlrunError):
    """A problem that every job of a sweep would hit: it stops the whole sweep instead of
    being recorded as one failed job."""
