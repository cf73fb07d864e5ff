"""`make demo` is the README's first set-up command: it must keep working as the config rules change."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_adds_three_deletes_one_and_reuses_its_address(tmp_path: Path) -> None:
    bin_dir = os.path.dirname(sys.executable)  # the venv's whereabouts-py, as make demo puts it on PATH
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "TMPDIR": str(tmp_path)}
    env.pop("WHEREABOUTS_PY_FLAT_FILE", None)  # the demo names its own node flat file
    done = subprocess.run(
        [str(ROOT / "bin" / "whereabouts-demo")], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    adds = [line.split("->")[1].strip() for line in done.stdout.splitlines() if line.startswith("ADD")]
    assert [a.split('"address": "')[1].split('"')[0] for a in adds] == [
        "192.168.2.225/28",
        "192.168.2.226/28",
        "192.168.2.227/28",
        "192.168.2.226/28",  # osd-1's address, released by its DEL, goes to osd-3
    ]
    assert "rook-ceph/osd-3 ctr-d" in done.stdout


def test_building_the_package_prints_no_deprecation(tmp_path: Path) -> None:
    """`make demo`'s first run builds this package: setuptools' warnings there (the table form of
    `project.license` is an error from 2027-02-18) would fill a newcomer's screen and later break it."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    output = done.stdout + done.stderr
    assert "BuildBackendWarning" not in output and "deprecated" not in output.lower(), output
    assert list(tmp_path.glob("whereabouts_py-*.whl"))
