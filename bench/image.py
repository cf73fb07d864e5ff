"""make bench-image: the image make image builds, installed by its own installer, timed on this machine.

    KUBEBUILDER_ASSETS=... .venv/bin/python -m bench.image [--runs 40]

Sizes: the OCI archive (compressed), its root filesystem, and the bundle the installer copies to a node
(/usr/local). Then, as tests/test_image.py does it, the image's installer runs from the unpacked image
against the real kube-apiserver into a scratch host, and this machine execs the wrapper it wrote
(tests/image_node.py's NodeView: the scratch host's /opt, /etc, /var and /run over this machine's).
Timed inside that view by one driver process, each a p50 over --runs execs:

  bare           /usr/bin/python3 -S -I -c pass (this machine's interpreter, the floor)
  VERSION        the wrapper, CNI VERSION
  agent ADD      the wrapper, ADD answered by the agent started from the installed bundle (each ADD
                 followed by an untimed DEL)
  direct ADD     the wrapper, ADD in direct mode (no agent)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.image_node import NodeView, built_image, read_archive, unpack  # noqa: E402
from tests.kubeapi.real import RealCluster, RealKube, assets_dir, free_port  # noqa: E402
from tests.test_image import Node  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
BUNDLE = "/opt/cni/whereabouts-py/current"
PLUGIN = "/opt/cni/bin/whereabouts-py"
CONF = {
    "cniVersion": "1.0.0",
    "name": "bench",
    "type": "ipvlan",
    "ipam": {"type": "whereabouts-py", "range": "192.0.2.0/24"},
}
# Runs inside the node view: times each exec from fork to exit, in one process.
DRIVER = r"""
import json, statistics, subprocess, sys, time
spec = json.loads(sys.argv[1])
def timed(argv, env, stdin=b""):
    start = time.perf_counter()
    done = subprocess.run(argv, input=stdin, env=env, capture_output=True)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{argv} {env.get('CNI_COMMAND')}: {done.stdout!r} {done.stderr!r}")
    return took
out = {}
for name, case in spec["cases"].items():
    times = []
    for i in range(spec["runs"]):
        env = dict(case["env"], CNI_CONTAINERID=f"c{i}", CNI_ARGS=f"IgnoreUnknown=1;K8S_POD_NAMESPACE=apps;K8S_POD_NAME=p{i}")
        times.append(timed(case["argv"], env, case["stdin"].encode()))
        if case.get("del"):
            timed(case["argv"], dict(env, CNI_COMMAND="DEL"), case["stdin"].encode())
    out[name] = statistics.median(times)
print(json.dumps(out))
"""


def tree_bytes(path: Path) -> int:
    return sum(os.lstat(os.path.join(d, n)).st_size for d, _, files in os.walk(path) for n in files)


def cni_env(command: str, **extra: str) -> dict[str, str]:
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "CNI_COMMAND": command,
        "CNI_NETNS": "/var/run/netns/bench",
        "CNI_IFNAME": "net1",
        "CNI_PATH": "/opt/cni/bin",
        **extra,
    }


def measure(runs: int, work: Path) -> dict[str, float | int | str]:
    assets = assets_dir()
    if assets is None:
        raise SystemExit("bench.image: KUBEBUILDER_ASSETS is not set (the real kube-apiserver)")
    image = built_image(work / "dist")
    _, _, layer = read_archive(image.archive)
    rootfs = unpack(image, work / "root")
    figures: dict[str, float | int | str] = {
        "digest": image.digest,
        "archive_mb": image.archive.stat().st_size / 1e6,
        "rootfs_mb": len(layer) / 1e6,
        "bundle_mb": tree_bytes(rootfs / "usr/local") / 1e6,
    }
    cluster = RealCluster(assets, work / "cluster", fsync=True).start()
    try:
        kube = RealKube(cluster, f"bench-{uuid.uuid4().hex[:8]}", work)
        (work / "node").mkdir()
        node = Node(kube, work / "node")
        node.install_once(rootfs)
        for i in range(runs):
            kube.api.put_pod("apps", f"p{i}")
        view = NodeView(node.host, work)
        port = free_port()
        agent_argv = [
            *("/usr/bin/env", "-i", f"LD_LIBRARY_PATH={BUNDLE}/lib", "NODENAME=node-a"),
            *(f"{BUNDLE}/bin/python3", "-I", f"{BUNDLE}/bin/ipam-agent", "--metrics-port", str(port)),
        ]
        # its log lines would drown the report
        agent = subprocess.Popen(view.argv(*agent_argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(3)  # the agent's warm-up imports; the first timed ADD also waits for its socket
            cases = {
                "bare": {"argv": ["/usr/bin/python3", "-S", "-I", "-c", "pass"], "env": {}, "stdin": ""},
                "version": {"argv": [PLUGIN], "env": cni_env("VERSION"), "stdin": '{"cniVersion": "1.0.0"}'},
                "agent_add": {
                    "argv": [PLUGIN],
                    "env": cni_env("ADD"),
                    "stdin": json.dumps(CONF),
                    "del": True,
                },
            }
            spec = json.dumps({"runs": runs, "cases": cases})
            timed = json.loads(view.run(["/usr/bin/python3", "-c", DRIVER, spec], {}).stdout)
            agent.terminate()
            agent.wait(timeout=30)
            direct = {
                "argv": [PLUGIN],
                "env": cni_env("ADD", WHEREABOUTS_PY_AGENT_WAIT="0"),
                "stdin": json.dumps(CONF),
                "del": True,
            }
            done = view.run(
                [
                    "/usr/bin/python3",
                    "-c",
                    DRIVER,
                    json.dumps({"runs": runs, "cases": {"direct_add": direct}}),
                ],
                {},
            )
            if done.returncode != 0:
                raise SystemExit(done.stderr)
            timed.update(json.loads(done.stdout))
        finally:
            if agent.poll() is None:
                agent.kill()
            view.close()
    finally:
        cluster.stop()
    figures.update(timed)
    return figures


def report(figures: dict[str, float | int | str], runs: int) -> str:
    bare = float(figures["bare"])

    def row(name: str, key: str) -> str:
        value = float(figures[key])
        return f"| {name} | {value * 1000:.1f} | {value / bare:.2f}x |"

    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return "\n".join(
        [
            f"## {stamp} — the image make image builds, installed by its installer (bench.image)",
            "",
            f"Command: `KUBEBUILDER_ASSETS=... .venv/bin/python -m bench.image --runs {runs}`, against the real",
            "kube-apiserver + etcd from `KUBEBUILDER_ASSETS`: the image's installer ran from the unpacked image",
            "(tests/image_node.py) into a scratch host, and the wrapper it wrote was exec'd from this machine",
            f"with that host's directories at their host paths. Image {figures['digest']}.",
            "",
            f"Sizes: OCI archive {float(figures['archive_mb']):.1f} MB (gzip), root filesystem "
            f"{float(figures['rootfs_mb']):.1f} MB, bundle copied to each node (/usr/local) "
            f"{float(figures['bundle_mb']):.1f} MB.",
            "",
            f"| exec ({runs} runs each) | p50 ms | x bare |",
            "|---|---|---|",
            row("bare: /usr/bin/python3 -S -I -c pass", "bare"),
            row("wrapper VERSION (installed bundle)", "version"),
            row("wrapper ADD, agent from the bundle", "agent_add"),
            row("wrapper ADD, direct mode", "direct_add"),
            "",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.image", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--no-write", action="store_true", help="print, do not append to bench/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="whereabouts-py-bench-image.") as work:
        text = report(measure(args.runs, Path(work)), args.runs)
    print(text)
    if not args.no_write:
        with open(RESULTS, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
