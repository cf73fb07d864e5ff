"""Benchmarks for whereabouts-py (`make bench`); results are appended to bench/RESULTS.md."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.kubeapi.real import RealCluster

ROOT = Path(__file__).resolve().parents[1]


def publish(results: str, title: str, target: str, intro: str, rows: list[tuple[str, str, str, str]]) -> str:
    """A section of bench/RESULTS.md: a heading with the time, `make` target and commit, `intro`, and
    a table of figures, each beside its same-run reference; printed, and appended to `results`."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    text = [
        f"\n## {stamp} — {title} (`make {target}`, {commit})\n",
        intro + "\n",
        "| figure | value | x reference | same-run reference |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
    ]
    report = "\n".join(text)
    print(report)
    with open(results, "a", encoding="utf-8") as fh:
        fh.write(report)
    return report


def cpu_seconds(pid: int) -> float:
    """User + system CPU a live process has used so far (/proc/PID/stat)."""
    import os

    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_cluster(prog: str) -> RealCluster:
    """etcd (with fsync) + kube-apiserver from $KUBEBUILDER_ASSETS in a directory of their own,
    started (stop it)."""
    import sys
    import tempfile

    from tests.kubeapi.real import RealCluster, assets_dir

    assets = assets_dir()
    if assets is None:
        sys.exit(f"{prog}: KUBEBUILDER_ASSETS is unset")
    work = Path(tempfile.mkdtemp(prefix=f"{prog.replace('.', '-')}-"))
    return RealCluster(assets, work, fsync=True).start()  # etcd as in production: a figure, not a test


def stop_cluster(cluster: RealCluster) -> None:
    """Stop what start_cluster started and remove etcd's data (200+ MB a run at 10,000 pods); the
    logs stay in the directory for a look after the run."""
    import shutil

    cluster.stop()
    shutil.rmtree(cluster.work / "etcd", ignore_errors=True)
