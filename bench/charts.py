"""The benchmarks' figures as PNG charts, drawn from the data a run saved (never by running a bench).

    python -m bench.charts [DATA.json ...] [--out docs/figures]

Data files (written by `make bench` and `make bench-slices` into docs/figures/):
- `latency_ms`: {case: [one ADD's wall time, ms, ...]}, `references`: the cases that are references
  (a bare interpreter start, host-local's ADD) measured in the same run;
- `bursts`: {label: {"completions_s": [seconds from the burst's start at which each ADD returned],
  "failures": n}}.
Charts: `latency.png` (the distribution of each case's ADD latency, references dashed) and
`burst.png` (ADDs completed over time, one curve per burst). matplotlib is the `bench` extra:
`pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
DATA_FILES = ("bench.json", "slices.json")
MISSING = "matplotlib is missing: the bench draws its charts with it; install the bench extra: .venv/bin/pip install -e '.[bench]'"


class MissingMatplotlib(RuntimeError):
    pass


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend; MissingMatplotlib when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise MissingMatplotlib(MISSING) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_data(path: Path, doc: dict[str, Any]) -> Path:
    """Write one run's data beside its charts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


SIZE = (10, 6.5)  # inches; at DPI, 1100 x 715 pixels
DPI = 110


def _caption(docs: list[dict[str, Any]]) -> str:
    """Which runs drew the chart: date, server (its first words), load average, command."""
    return "\n".join(
        f"{d.get('date', '?')}: {str(d.get('server', '?')).split(' from ')[0]}, "
        f"load average {d.get('load_average', '?')}; {d.get('command', '?')}"
        for d in docs
    )


def _run(doc: dict[str, Any]) -> str:
    """Which bench made the data (`bench`, `bench.slices`): curves of one run compare, across runs
    the machine's load differs."""
    words = str(doc.get("command", "")).split()
    return words[2] if len(words) > 2 and words[:2] == ["python", "-m"] else "?"


def _finish(plt: Any, fig: Any, ax: Any, docs: list[dict[str, Any]], path: Path) -> Path:
    """The legend under the axes (it never hides a curve), the runs at the foot; saved."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="upper center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, 0.22), frameon=False
    )
    fig.text(0.01, 0.01, _caption(docs), fontsize=6.5, alpha=0.75)
    fig.subplots_adjust(left=0.08, right=0.97, top=0.93, bottom=0.32)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def latency_chart(plt: Any, docs: list[dict[str, Any]], out: Path) -> Path | None:
    """Each case's ADD latencies as a cumulative distribution, the same run's references dashed."""
    series = [
        (name, sorted(values), name in d.get("references", ()))
        for d in docs
        for name, values in d.get("latency_ms", {}).items()
        if values
    ]
    if not series:
        return None
    series.sort(key=lambda s: (not s[2], statistics.median(s[1])))  # references first, then the fastest
    fig, ax = plt.subplots(figsize=SIZE)
    for name, ordered, reference in series:
        share = [(i + 1) / len(ordered) for i in range(len(ordered))]
        ax.step(ordered, share, where="post", linestyle="--" if reference else "-", linewidth=1.6,
                label=f"{name}: p50 {statistics.median(ordered):.1f} ms, n={len(ordered)}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("ADD latency, ms (log scale): one exec of the CNI executable")
    ax.set_ylabel("share of ADDs at most this long")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("ADD latency distributions; dashed: references measured in the same run")
    return _finish(plt, fig, ax, docs, out / "latency.png")


def burst_chart(plt: Any, docs: list[dict[str, Any]], out: Path) -> Path | None:
    """ADDs completed against seconds since the burst started, one curve per burst."""
    bursts = [
        (f"{_run(d)}: {label}", b)
        for d in docs
        for label, b in d.get("bursts", {}).items()
        if b.get("completions_s")
    ]
    if not bursts:
        return None
    fig, ax = plt.subplots(figsize=SIZE)
    for label, burst in bursts:
        times = sorted(burst["completions_s"])
        failed = burst.get("failures", 0)
        ax.step([0.0, *times], range(len(times) + 1), where="post", linewidth=1.6,
                label=f"{label}: {len(times)} ADDs in {times[-1]:.1f} s" + (f", {failed} failed" if failed else ""))  # fmt: skip
    ax.set_xlabel("seconds since the burst started")
    ax.set_ylabel("ADDs completed")
    ax.grid(True, alpha=0.3)
    ax.set_title("Burst completion over time")
    return _finish(plt, fig, ax, docs, out / "burst.png")


def render(data: list[Path], out: Path) -> list[Path]:
    """The charts of the data files, written to `out`; MissingMatplotlib without matplotlib."""
    plt = pyplot()
    docs = [json.loads(p.read_text()) for p in data]
    out.mkdir(parents=True, exist_ok=True)
    made = [latency_chart(plt, docs, out), burst_chart(plt, docs, out)]
    return [p for p in made if p is not None]


def default_data(directory: Path = FIGURES) -> list[Path]:
    return [directory / name for name in DATA_FILES if (directory / name).exists()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.charts", description=__doc__)
    parser.add_argument(
        "data", nargs="*", type=Path, help=f"data files (default: {', '.join(DATA_FILES)} in --out)"
    )
    parser.add_argument("--out", type=Path, default=FIGURES, help="where the PNGs go (default: docs/figures)")
    args = parser.parse_args(argv)
    data = args.data or default_data(args.out)
    if not data:
        print(f"bench.charts: no data files in {args.out} (make bench writes them)", file=sys.stderr)
        return 1
    try:
        for path in render(data, args.out):
            print(path)
    except MissingMatplotlib as exc:
        print(f"bench.charts: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
