"""Specification of fetching a dataset archive: streamed with a progress bar into a temporary
name, renamed only once its md5 matches; a web page, a transfer cut short or a wrong md5 is one
line naming the file, what arrived and the way to get it by hand, and leaves nothing behind.

Nothing leaves the machine: files are served from ``file://`` URLs and from a local HTTP server.
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_miniimagenet import one_line_error

from mamlrun.data import download
from mamlrun.data.download import download as fetch
from mamlrun.data.download import ensure_file

BODY = bytes(range(256)) * 400  # 100 KiB of "archive"
MD5 = hashlib.md5(BODY).hexdigest()
PAGE = b"<!DOCTYPE html>\n<html><head><title>Sign in to continue</title></head></html>\n"


@pytest.fixture
def server():
    """``http://127.0.0.1:<port>/<name>``: ``archive`` (whole), ``cut`` (promises the whole
    body, sends a tenth and hangs up), ``page`` (an HTML page)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body, length = {
                "/archive": (BODY, len(BODY)),
                "/cut": (BODY[: len(BODY) // 10], len(BODY)),
                "/page": (PAGE, len(PAGE)),
            }[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)


def served_file(tmp_path: Path, body: bytes) -> str:
    source = tmp_path / "server" / "file.bin"
    source.parent.mkdir(exist_ok=True)
    source.write_bytes(body)
    return source.as_uri()


def test_a_download_with_the_right_md5_appears_under_its_name(tmp_path, server):
    dest = tmp_path / "data" / "archive.tar.gz"
    assert fetch(f"{server}/archive", dest, MD5) == dest
    assert dest.read_bytes() == BODY
    assert [p.name for p in dest.parent.iterdir()] == ["archive.tar.gz"]
    assert dest.stat().st_mode & 0o777 == 0o644


def test_a_file_url_is_fetched_the_same_way(tmp_path):
    dest = tmp_path / "data" / "archive.tar.gz"
    fetch(served_file(tmp_path, BODY), dest, MD5)
    assert dest.read_bytes() == BODY


def test_a_wrong_md5_is_discarded_and_says_what_arrived(tmp_path, server):
    dest = tmp_path / "data" / "archive.tar.gz"
    message = one_line_error(fetch, f"{server}/archive", dest, "0" * 32, "use the mirror")
    assert f"downloaded archive.tar.gz has md5 {MD5}, expected {'0' * 32}" in message
    assert message.endswith("discarded, use the mirror")
    assert not dest.parent.exists(), "nothing left, not even the folder made for it"


def test_an_html_page_in_place_of_the_archive_is_refused(tmp_path, server):
    dest = tmp_path / "data" / "archive.tar.gz"
    message = one_line_error(fetch, f"{server}/page", dest, MD5)
    assert f"{server}/page sent an HTML page instead of archive.tar.gz" in message
    assert f"download {server}/page by hand and put it at {dest}" in message
    assert not dest.parent.exists(), "nothing left, not even the folder made for it"


def test_a_transfer_cut_short_is_a_truncated_archive(tmp_path, server):
    dest = tmp_path / "data" / "archive.tar.gz"
    message = one_line_error(fetch, f"{server}/cut", dest, MD5)
    assert "the transfer of archive.tar.gz stopped after 10,240 of 102,400 bytes" in message
    assert "truncated archive" in message and "nothing was saved" in message
    assert not dest.parent.exists(), "nothing left, not even the folder made for it"


def test_a_file_already_there_is_never_downloaded(tmp_path, monkeypatch):
    dest = tmp_path / "archive.tar.gz"
    dest.write_bytes(b"a copy the user put there")

    def refuse(url):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(download, "_open_url", refuse)
    assert ensure_file(dest, "https://example.org/archive.tar.gz", MD5) == dest
