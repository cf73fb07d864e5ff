"""bench/charts.py draws the benchmarks' PNG charts from saved data (no bench runs here), and the
benches refuse to start without matplotlib instead of silently leaving the charts out."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from bench import charts

ROOT = Path(__file__).resolve().parents[1]


def sample(path: Path) -> Path:
    """A small data file in the format `make bench` saves (two cases, one reference, two bursts)."""
    doc = {
        "date": "2026-01-01 00:00 UTC",
        "command": "python -m bench --runs 5",
        "server": "sample",
        "latency_ms": {
            "bare interpreter start (reference)": [11.0, 12.5, 11.8, 13.1, 12.0],
            "kubernetes, agent (shim)": [31.0, 35.5, 29.8, 41.2, 33.3],
            "kubernetes, direct": [610.0, 702.4, 655.1, 690.0, 640.2],
        },
        "references": ["bare interpreter start (reference)", "host-local (reference floor)"],
        "bursts": {
            "one pool, 2 nodes with agents": {
                "completions_s": [0.2, 0.3, 0.35, 0.9, 1.4],
                "failures": 0,
                "pods": 5,
            },
            "node_slice_size /26, 2 nodes with agents": {
                "completions_s": [0.1, 0.15, 0.2],
                "failures": 2,
                "pods": 5,
            },
        },
    }
    path.write_text(json.dumps(doc))
    return path


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def test_charts_render_from_saved_data(tmp_path: Path) -> None:
    data = sample(tmp_path / "bench.json")
    made = charts.render([data], tmp_path / "out")
    assert [p.name for p in made] == ["latency.png", "burst.png"]
    for path in made:
        assert path.stat().st_size > 10_000, path  # a drawn chart, not an empty canvas
        assert png_size(path) == (1100, 715)  # 10 x 6.5 inches at 110 dpi


def test_a_file_with_only_bursts_draws_only_the_burst_chart(tmp_path: Path) -> None:
    doc = json.loads(sample(tmp_path / "x.json").read_text())
    del doc["latency_ms"]
    (tmp_path / "slices.json").write_text(json.dumps(doc))
    made = charts.render([tmp_path / "slices.json"], tmp_path)
    assert [p.name for p in made] == ["burst.png"]


def test_charts_cli_renders_the_default_data_files(tmp_path: Path) -> None:
    sample(tmp_path / "bench.json")
    assert charts.main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / "latency.png").stat().st_size > 10_000
    assert charts.main(["--out", str(tmp_path / "empty")]) == 1


def test_the_committed_charts_are_drawn_from_the_committed_data(tmp_path: Path) -> None:
    """docs/figures holds real data and the charts drawn from it; they render again from it."""
    data = charts.default_data()
    assert [p.name for p in data] == list(charts.DATA_FILES)
    made = charts.render(data, tmp_path)
    assert [p.name for p in made] == ["latency.png", "burst.png"]
    for path in made:
        committed = charts.FIGURES / path.name
        assert png_size(committed) == png_size(path)
        assert committed.stat().st_size > 10_000


def hidden_matplotlib(tmp_path: Path) -> dict[str, str]:
    """An environment in which `import matplotlib` fails, as in a venv without the bench extra."""
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('matplotlib hidden by the test')\n")
    return {**os.environ, "PYTHONPATH": str(fake.parent)}


@pytest.mark.parametrize("module", ["bench", "bench.slices", "bench.charts"])
def test_benches_fail_clearly_without_matplotlib(tmp_path: Path, module: str) -> None:
    sample(tmp_path / "bench.json")
    argv = [sys.executable, "-m", module, *(["--out", str(tmp_path)] if module == "bench.charts" else [])]
    proc = subprocess.run(
        argv, cwd=ROOT, env=hidden_matplotlib(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "matplotlib is missing" in proc.stderr and "pip install -e '.[bench]'" in proc.stderr
    assert not (tmp_path / "latency.png").exists()


def test_make_bench_fails_clearly_without_matplotlib(tmp_path: Path) -> None:
    """The make target itself (its venv taken as up to date: nothing is installed here)."""
    venv = sys.prefix  # this suite's venv, as make's VENV
    proc = subprocess.run(
        ["make", "-s", f"VENV={venv}", "-o", f"{venv}/.installed-stamp", "bench"],
        cwd=ROOT,
        env=hidden_matplotlib(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "bench: matplotlib is missing" in proc.stderr
