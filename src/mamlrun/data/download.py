"""Where datasets live on disk, and how a missing archive gets there.

Nothing here knows about a particular dataset: callers pass the URL and the checksum they
trust, so the same code serves every dataset that ships as a few archive files.

A download is written to a temporary file beside its destination and renamed into place only
after its checksum matched, so an interrupted or corrupted transfer never leaves a file that a
later run would take for the real one.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from mamlrun.errors import MamlrunError

ENV_VAR = "MAMLRUN_DATA"
_CHUNK = 1 << 20
_TIMEOUT_S = 60
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError)


def user_cache_dir() -> Path:
    """The per-user cache (XDG), used when nothing names a data root and as the fallback for
    derived files that cannot be written next to read-only data."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "mamlrun"


def resolve_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data root: the explicit value, else ``$MAMLRUN_DATA``, else the user cache.

    The environment variable lets a lab keep one shared copy of the data without editing every
    config; the cache default makes a first run work without any setup.
    """
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return user_cache_dir()


def md5sum(path: Path) -> str:
    """Hex md5 of a file, read in chunks so large archives do not need to fit in memory."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def is_writable_dir(directory: Path) -> bool:
    """Whether derived files may be written into ``directory``.

    Root passes every permission check, so a directory without any write bit is treated as
    read-only as well: a shared, deliberately read-only copy of a dataset is then never
    modified, not even by a job that happens to run as root.
    """
    try:
        mode = directory.stat().st_mode
    except OSError:
        return False
    return directory.is_dir() and os.access(directory, os.W_OK) and bool(mode & 0o222)


def _open_url(url: str) -> tuple[BinaryIO, int | None]:
    """Open ``url`` for reading and return the stream and its length if the server sent one.

    This is the only function that touches the network, so tests replace just this one.
    """
    response = urllib.request.urlopen(url, timeout=_TIMEOUT_S)
    length = response.headers.get("Content-Length")
    return response, int(length) if length and length.isdigit() else None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


class _HtmlPage(Exception):
    """The server answered with a web page (a login, quota or error page) instead of the file."""


class _Truncated(Exception):
    def __init__(self, got: int, length: int) -> None:
        super().__init__(f"{got} of {length} bytes")
        self.got, self.length = got, length


def looks_like_html(head: bytes) -> bool:
    """Whether the first bytes of a file are a web page rather than the archive or pickle
    expected: what a file-sharing site or a captive portal sends in its place."""
    start = head.lstrip()[:64].lower()
    return start.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")) or (
        start.startswith(b"<") and b"<html" in head[:2048].lower()
    )


def _stream(url: str, out: BinaryIO, label: str) -> str:
    """Copy ``url`` into ``out`` with a progress bar; return the md5 of what was written."""
    digest = hashlib.md5()
    stream, length = _open_url(url)
    got = 0
    try:
        with tqdm(total=length, unit="B", unit_scale=True, unit_divisor=1024, desc=label) as bar:
            while chunk := stream.read(_CHUNK):
                if got == 0 and looks_like_html(chunk):
                    raise _HtmlPage()
                out.write(chunk)
                digest.update(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    except http.client.IncompleteRead as e:
        raise _Truncated(got + len(e.partial), got + len(e.partial) + (e.expected or 0)) from e
    finally:
        stream.close()
    if length is not None and got < length:
        raise _Truncated(got, length)
    return digest.hexdigest()


#: Inside ``offline()``, the list of files a download would have fetched; None outside, where
#: downloads are allowed. ``mamlrun data check`` verifies what is there and fetches nothing.
_NOT_FETCHED: ContextVar[list[Path] | None] = ContextVar("not_fetched", default=None)


@contextmanager
def offline() -> Iterator[list[Path]]:
    """Within this block a missing file is an error instead of a download; the list it
    yields names every file that was missing, so the caller can say what a download would
    fetch."""
    missing: list[Path] = []
    token = _NOT_FETCHED.set(missing)
    try:
        yield missing
    finally:
        _NOT_FETCHED.reset(token)


def download(url: str, dest: Path, md5: str | None = None, manual: str | None = None) -> Path:
    """Download ``url`` to ``dest``, checking ``md5`` before the file appears under its name.

    ``manual`` is the way to get the file by hand, said in every error (default: download
    ``url`` by hand and put it at ``dest``). A web page served in the file's place, a transfer
    that stopped early and a wrong md5 each leave nothing behind and say what was received.
    """
    dest = Path(dest)
    manual = manual or f"download {url} by hand and put it at {dest}"
    not_fetched = _NOT_FETCHED.get()
    if not_fetched is not None:
        not_fetched.append(dest)
        raise MamlrunError(f"{dest} is missing (not downloaded by a check); {manual}")
    with _folders_kept_only_if_filled(dest.parent):
        if not is_writable_dir(dest.parent):
            raise MamlrunError(
                f"{dest} is missing and {dest.parent} is not writable; {manual}, "
                f"or choose another data root (${ENV_VAR})"
            )
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                got = _fetch(url, out, dest, manual)
            if md5 is not None and got != md5:
                raise MamlrunError(
                    f"{url}: downloaded {dest.name} has md5 {got}, expected {md5}; discarded, "
                    f"{manual}"
                )
            tmp.chmod(0o644)  # mkstemp's 0600 would hide a shared dataset from other users
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return dest


@contextmanager
def _folders_kept_only_if_filled(directory: Path) -> Iterator[None]:
    """Create ``directory`` (and its missing parents) for the block; if the block fails, remove
    the ones it created that are still empty: a failed download leaves no empty
    ``~/.cache/mamlrun/omniglot`` or ``<root>/cifar100`` that looks like a dataset is there."""
    created = [p for p in (directory, *directory.parents) if not p.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MamlrunError(f"{directory} cannot be created ({_one_line(e)})") from e
    try:
        yield
    except BaseException:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (something else was put there) or not ours to remove
        raise


def _fetch(url: str, out: BinaryIO, dest: Path, manual: str) -> str:
    """``_stream``, its failures as one line naming the file, what came and the manual route."""
    try:
        return _stream(url, out, dest.name)
    except _HtmlPage as e:
        raise MamlrunError(
            f"{url} sent an HTML page instead of {dest.name} (a login, quota or error page?); "
            f"nothing was saved; {manual}"
        ) from e
    except _Truncated as e:
        raise MamlrunError(
            f"{url}: the transfer of {dest.name} stopped after {e.got:,} of {e.length:,} bytes "
            f"(a truncated archive); nothing was saved; {manual}"
        ) from e
    except _NETWORK_ERRORS as e:
        raise MamlrunError(f"could not download {url} ({_one_line(e)}); {manual}") from e


def ensure_file(dest: Path, url: str, md5: str | None = None, manual: str | None = None) -> Path:
    """``dest`` if it exists (its content is the caller's to judge), else download it."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    return download(url, dest, md5, manual)


def tar_gz_files(path: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """The files of a ``.tar.gz`` in one forward pass, as (name, read) pairs, never extracted.

    The gzip stream is read to its end and its checksum checked: tarfile alone takes a
    truncated archive for a shorter one. Raises ``tarfile.TarError``, ``EOFError``,
    ``zlib.error`` or ``OSError`` for a truncated or corrupt file.
    """
    with gzip.open(path, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if member.isfile():
                yield member.name, lambda member=member: tar.extractfile(member).read()
        while stream.read(_CHUNK):
            pass
