"""docs/migrate-from-whereabouts.md, run: its Whereabouts objects on the real kube-apiserver, each `ipamctl`
and `kubectl apply` command of its console blocks with the output printed there, and step 4's ADD by
the real plugin with the guide's flat file and switched NAD. The pools' namespace (`kube-system` in the
guide) and the NADs' (`default`) are the test's own."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from ipam.ctl import main as ctl_main
from tests import whereabouts_format as wf
from tests.cni_exec import FLAT_FILE_ENV, cni_env, run
from tests.kubeapi.real import ApiError, RealKube

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "migrate-from-whereabouts.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
NEW_POD = ("web-2", "5b7a9c2e4d1f")  # step 4's pod and its container
EXIT = '; echo "exit $?"'


def blocks(kind: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(GUIDE.read_text()) if lang == kind]


def files() -> dict[str, list[dict[str, Any]]]:
    """The guide's YAML blocks by the `# file: NAME` line they start with."""
    out = {}
    for body in blocks("yaml"):
        first = body.splitlines()[0]
        if first.startswith("# file: "):
            out[first.removeprefix("# file: ")] = [d for d in yaml.safe_load_all(body) if d]
    return out


def steps() -> list[tuple[str, list[str]]]:
    """(command, output lines) of every console block, in order."""
    out: list[tuple[str, list[str]]] = []
    for body in blocks("console"):
        for line in body.splitlines():
            if line.startswith("$ "):
                out.append((line[2:], []))
            else:
                out[-1][1].append(line)
    return out


class Namespaces:
    """The guide's namespaces mapped to the test's, both ways."""

    def __init__(self, kube: RealKube) -> None:
        self.pools, self.nads = kube.namespace, kube.namespace + "-default"
        self.pairs = [("kube-system", self.pools), ("default", self.nads)]

    def to_test(self, text: str) -> str:
        for guide, test in self.pairs:
            text = re.sub(rf"(?<![\w.-]){guide}(?![\w.-])", test, text)
        return text

    def to_guide(self, text: str) -> str:
        for guide, test in reversed(self.pairs):  # the NADs' name extends the pools'
            text = text.replace(test, guide)
        return text


def apply(kube: RealKube, docs: list[dict[str, Any]], ns: Namespaces) -> None:
    """kubectl apply: create, or replace what exists."""
    for doc in docs:
        obj = json.loads(ns.to_test(json.dumps(doc)))
        meta = obj["metadata"]
        try:
            wf.create(kube, [obj])
        except ApiError as exc:
            if exc.status != 409:
                raise
            path = kube.cluster.path_for(obj, meta["namespace"]) + "/" + meta["name"]
            old = kube.request("GET", path)
            kube.request(
                "PUT",
                path,
                {**obj, "metadata": {**meta, "resourceVersion": old["metadata"]["resourceVersion"]}},
            )


def ipamctl(kube: RealKube, command: str, ns: Namespaces) -> list[str]:
    """An `ipamctl` command of the guide, run here; --whereabouts-compat reads the test's NADs only."""
    echo = command.endswith(EXIT)
    argv = shlex.split(ns.to_test(command.removesuffix(EXIT)))
    assert argv[0] == "ipamctl", command
    args = argv[1:]
    if "--whereabouts-compat" in args:
        args += ["--nad-namespace", ns.nads]
    out, err = io.StringIO(), io.StringIO()
    code = ctl_main(["--kubeconfig", kube.kubeconfig_path, *args], out=out, err=err)
    assert not err.getvalue(), err.getvalue()
    lines = ns.to_guide(out.getvalue()).splitlines()
    return [*lines, f"exit {code}"] if echo else lines


def add_new_pod(kube: RealKube, tmp: Path, ns: Namespaces) -> None:
    """Step 4: the ADD of the next pod, the plugin reading the guide's flat file and switched NAD."""
    [flat_text] = blocks("json")
    flat = json.loads(flat_text)
    flat["kubernetes"]["kubeconfig"] = kube.plugin_kubeconfig()
    flat.update(log_file=str(tmp / "whereabouts-py.log"), data_dir=str(tmp / "node"))
    path = tmp / "whereabouts.conf"
    path.write_text(json.dumps(flat))
    os.chmod(path, 0o644)
    [nad] = files()["macvlan-conf-py.yaml"]
    conf = json.loads(nad["spec"]["config"])
    pod, ctr = NEW_POD
    env = cni_env("ADD", ctr, pod=pod, namespace=ns.nads, **{FLAT_FILE_ENV: str(path)})
    call = run(conf, env)
    assert call.code == 0, call.stdout + call.stderr
    assert [ip["address"] for ip in call.result["ips"]] == ["192.168.2.228/28"]


def test_the_migration_guide_runs_as_written(real_kube: RealKube, tmp_path: Path) -> None:
    ns = Namespaces(real_kube)
    real_kube.cluster.ensure_namespace(ns.nads)
    wf.install_nad_crd(real_kube)
    docs = files()
    apply(real_kube, docs["whereabouts-state.yaml"] + docs["macvlan-conf.yaml"], ns)
    ran = steps()
    assert [c.split()[0] for c, _ in ran] == ["ipamctl", "kubectl", "ipamctl", "ipamctl"]
    for i, (command, shown) in enumerate(ran):
        if command.startswith("kubectl apply -f "):
            apply(real_kube, docs[command.removeprefix("kubectl apply -f ")], ns)
            got: list[str] = []
        else:
            if command.split()[-1] == "show":
                add_new_pod(real_kube, tmp_path, ns)
            got = ipamctl(real_kube, command, ns)
        assert got == shown, f"step {i}: {command}\n" + "\n".join(got)

    # rolling back: every lease, Whereabouts' and ours, is one Go Whereabouts reads
    [pool] = [
        p for p in real_kube.api.objects("ippools", ns.pools) if p["metadata"]["name"] == "192.168.2.224-28"
    ]
    allocations = pool["spec"]["allocations"]
    assert sorted(allocations, key=int) == ["2", "3", "4"]
    for lease in allocations.values():
        assert all(isinstance(lease.get(k), str) and lease[k] for k in ("id", "podref", "ifname")), lease
