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
    """Write one run's data beside its charts (rounded to 0.1 ms: the charts need no more)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return path


def _caption(docs: list[dict[str, Any]]) -> str:
    return "; ".join(f"{d.get('date', '?')}, {d.get('server', '?')}" for d in docs)


def latency_chart(plt: Any, docs: list[dict[str, Any]], out: Path) -> Path | None:
    """Each case's ADD latencies as a cumulative distribution, the same run's references dashed."""
    series = [
        (name, values, name in d.get("references", ()))
        for d in docs
        for name, values in d.get("latency_ms", {}).items()
    ]
    series = [s for s in series if s[1]]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name, values, reference in series:
        ordered = sorted(values)
        share = [(i + 1) / len(ordered) for i in range(len(ordered))]
        ax.step(ordered, share, where="post", linestyle="--" if reference else "-", linewidth=1.6,
                label=f"{name} (p50 {ordered[len(ordered) // 2]:.0f} ms, n={len(ordered)})")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("ADD latency, ms (log scale): one exec of the CNI executable")
    ax.set_ylabel("share of ADDs at most this long")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("ADD latency distributions; dashed: references measured in the same run")
    ax.legend(fontsize=8, loc="lower right")
    fig.text(0.01, 0.01, _caption(docs), fontsize=7, alpha=0.7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = out / "latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def burst_chart(plt: Any, docs: list[dict[str, Any]], out: Path) -> Path | None:
    """ADDs completed against seconds since the burst started, one curve per burst."""
    bursts = [(label, b) for d in docs for label, b in d.get("bursts", {}).items() if b.get("completions_s")]
    if not bursts:
        return None
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, burst in bursts:
        times = sorted(burst["completions_s"])
        failed = burst.get("failures", 0)
        ax.step([0.0, *times], range(len(times) + 1), where="post", linewidth=1.6,
                label=f"{label}: {len(times)} ADDs in {times[-1]:.1f} s" + (f", {failed} failed" if failed else ""))  # fmt: skip
    ax.set_xlabel("seconds since the burst started")
    ax.set_ylabel("ADDs completed")
    ax.grid(True, alpha=0.3)
    ax.set_title("Burst completion over time")
    ax.legend(fontsize=8, loc="lower right")
    fig.text(0.01, 0.01, _caption(docs), fontsize=7, alpha=0.7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = out / "burst.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
