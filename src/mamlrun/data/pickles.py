"""Reading the pickles few-shot datasets are published as, safely and in bounded memory.

Several benchmarks ship only as pickles passed around on file-sharing links (miniImageNet and
tieredImageNet from Ren et al., CIFAR-FS and FC100 from MetaOptNet). A pickle can run any code
it names, so every loader here builds dicts, lists, tuples, strings, numbers and numpy arrays
and nothing else. Python 2 pickles (tieredImageNet's) are read with ``encoding="latin1"``,
the only encoding under which numpy arrays written by Python 2 load.

``stream_list`` reads a pickled list item by item, handing the items on in batches and keeping
none of them: tieredImageNet's training images are one pickled list of 448,695 PNGs (several
GB) that would otherwise have to fit in memory at once.
"""

from __future__ import annotations

import importlib.util
import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from mamlrun.errors import MamlrunError

AGAIN = "download it again and replace it"

#: Objects a dataset pickle may name: numpy arrays and what they are rebuilt from.
ALLOWED = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how protocol 2 writes bytes
        ("collections", "OrderedDict"),
    }
)

#: A string, bytes or array in a streamed list longer than this is dropped from the unpickler's
#: memo once its batch has been handed on (the memo would otherwise keep every image alive).
_LARGE = 256


class _Refused(pickle.UnpicklingError):
    """The pickle names something other than what arrays are made of."""


def _find_allowed(unpickler, module: str, name: str, parent: type):
    legacy = module.replace("numpy._core", "numpy.core")
    if (legacy, name) not in ALLOWED:
        raise _Refused(f"{module}.{name}")
    if legacy.startswith("numpy.core") and importlib.util.find_spec("numpy._core"):
        module = legacy.replace("numpy.core", "numpy._core")  # numpy 2 renamed it
    return parent.find_class(unpickler, module, name)


class ArrayUnpickler(pickle.Unpickler):
    """Builds dicts, lists and numpy arrays and nothing else, so a file from a sharing link
    cannot run code when it is loaded."""

    def find_class(self, module: str, name: str):
        return _find_allowed(self, module, name, pickle.Unpickler)


def _guarded(path: Path, load: Callable[[BinaryIO], object], what: str = "a pickle") -> object:
    """``load(file)``, with every way the file can be wrong turned into one line."""
    try:
        with open(path, "rb") as f:
            if f.read(256).lstrip().startswith(b"<"):
                raise MamlrunError(
                    f"{path} is an HTML page, not {what} (Google Drive's download warning "
                    f"saved in its place?); {AGAIN}, e.g. with gdown"
                )
            f.seek(0)
            return load(f)
    except MamlrunError:
        raise
    except _Refused as e:
        raise MamlrunError(
            f"{path} holds objects other than arrays ({e}), which mamlrun does not load (a "
            f"pickle can run code); use the published file"
        ) from e
    except OSError as e:
        raise MamlrunError(f"{path}: cannot read it ({' '.join(str(e).split())})") from e
    except Exception as e:  # any failure to unpickle means the bytes are not the dataset's
        detail = " ".join(str(e).split()) or type(e).__name__
        raise MamlrunError(f"{path} is truncated or corrupt ({detail}); {AGAIN}") from e


def read_pickle(path: Path) -> object:
    """The object in ``path``, or one line saying what is wrong with the file and what to do."""
    return _guarded(path, lambda f: ArrayUnpickler(f, encoding="latin1").load())


def unpickle(blob: bytes, where: str, again: str = AGAIN) -> object:
    """The object pickled in ``blob`` (a member of an archive, say), arrays only; ``where``
    names it in the one-line error, ``again`` says how to get a good copy."""
    try:
        return ArrayUnpickler(io.BytesIO(blob), encoding="latin1").load()
    except _Refused as e:
        raise MamlrunError(f"{where} holds objects other than arrays ({e}); {again}") from e
    except Exception as e:  # any failure to unpickle means the bytes are not the dataset's
        detail = " ".join(str(e).split()) or type(e).__name__
        raise MamlrunError(f"{where} is truncated or corrupt ({detail}); {again}") from e


# ---------------------------------------------------------------------------------------------
# Streaming a pickled list


class _FromReceiver(Exception):
    """Carries an error of the receiver through the unpickler, to be raised as it is."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _Sink:
    """Stands in for the pickle's outermost list: receives its items in the batches the
    pickler wrote (``APPENDS``, up to 1000 items each) and passes them on."""

    def __init__(self, receive: Callable[[int, list], None]) -> None:
        self.receive, self.count = receive, 0
        self.handed_on: Callable[[], None] = lambda: None

    def extend(self, items: list) -> None:
        items = list(items)
        if items:
            try:
                self.receive(self.count, items)
            except BaseException as e:  # the receiver's own error, not the file's
                raise _FromReceiver(e) from e
            self.count += len(items)
            self.handed_on()

    def append(self, item: object) -> None:
        self.extend([item])


def _is_large(value: object) -> bool:
    if isinstance(value, str | bytes | bytearray):
        return len(value) > _LARGE
    return type(value).__name__ == "ndarray"  # filled after it is memoised: never keep one


_GONE = object()  # a memo entry whose item was handed on and freed


class _StreamingUnpickler(pickle._Unpickler):  # the Python one: its opcodes can be replaced
    """The pure-Python unpickler with two changes: the outermost list is a ``_Sink``, and the
    memo forgets large items once their batch has been handed on, so that they can be freed.
    (A later reference to such an item, which no published file has, is an error.)"""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: BinaryIO, sink: _Sink) -> None:
        super().__init__(file, encoding="latin1")
        self.sink, self._large = sink, []
        sink.handed_on = self._forget

    def find_class(self, module: str, name: str):
        return _find_allowed(self, module, name, pickle._Unpickler)

    def _forget(self) -> None:
        for index in self._large:
            self.memo[index] = _GONE
        self._large.clear()

    def _empty_list(self) -> None:
        outermost = not self.stack and not self.metastack and not self.sink.count
        self.append(self.sink if outermost else [])

    def _memo_at(self, index: int) -> None:
        self.memo[index] = self.stack[-1]
        if _is_large(self.stack[-1]):
            self._large.append(index)

    def _recall(self, index: int) -> None:
        if self.memo[index] is _GONE:
            raise pickle.UnpicklingError(f"an item refers back to item memo {index}, handed on")
        self.append(self.memo[index])

    dispatch[pickle.EMPTY_LIST[0]] = _empty_list
    dispatch[pickle.BINPUT[0]] = lambda self: self._memo_at(self.read(1)[0])
    dispatch[pickle.LONG_BINPUT[0]] = lambda self: self._memo_at(
        int.from_bytes(self.read(4), "little")
    )
    dispatch[pickle.MEMOIZE[0]] = lambda self: self._memo_at(len(self.memo))
    dispatch[pickle.BINGET[0]] = lambda self: self._recall(self.read(1)[0])
    dispatch[pickle.LONG_BINGET[0]] = lambda self: self._recall(
        int.from_bytes(self.read(4), "little")
    )


def stream_list(path: Path, receive: Callable[[int, list], None]) -> int:
    """Read the list pickled in ``path``, calling ``receive(start, items)`` for consecutive
    batches of its items; returns how many there were. Only the items of the batch being
    handed on are in memory, whatever the file's size (a list pickled with protocol 0, which
    builds it whole, arrives as one batch)."""
    sink = _Sink(receive)

    def load(f: BinaryIO) -> int | _FromReceiver:
        try:
            result = _StreamingUnpickler(f, sink).load()
            if isinstance(result, list):  # protocol 0: built whole, without EMPTY_LIST
                sink.extend(result)
        except _FromReceiver as e:
            return e  # past the file checks of _guarded, untouched
        if not isinstance(result, list) and result is not sink:
            raise MamlrunError(f"{path} holds a {type(result).__name__}, not a list")
        return sink.count

    outcome = _guarded(path, load)
    if isinstance(outcome, _FromReceiver):
        raise outcome.error
    return outcome
