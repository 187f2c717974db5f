"""The built wheel carries the configs, so a non-editable install works from any directory."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest
from conftest import REPO


@pytest.mark.slow
def test_wheel_ships_every_config(tmp_path):
    # Offline: the installed hatchling builds it (pip's isolated build would download one).
    pytest.importorskip("hatchling", reason="building the wheel offline needs hatchling")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("mamlrun-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("mamlrun/conf/")}
    expected = {
        f"mamlrun/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")
    }
    assert expected and expected <= shipped
    sources = {p.relative_to(REPO / "src").as_posix() for p in (REPO / "src").rglob("*.py")}
    assert "mamlrun/cli/main.py" in sources and sources <= set(zipfile.ZipFile(wheel).namelist())
