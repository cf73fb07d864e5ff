"""deploy/: manifests validated against the Kubernetes OpenAPI schema, their semantics, the Dockerfile's
paths, and deploy/install.py run against a temp directory standing in for the node's root."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.fake_tokenrequest import FakeTokenAPI, serve

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
INSTALL_PY = DEPLOY / "install.py"
BASE = DEPLOY / "base"
MANIFESTS = sorted(p for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
#: kustomize overlays, each a distribution's host paths on top of deploy/base
OVERLAYS = sorted(p.parent for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))
LAYOUTS = [BASE, *OVERLAYS]
GROUP = "whereabouts.cni.cncf.io"


def _load_installer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("whereabouts_py_install", INSTALL_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


inst = _load_installer()


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_objects() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in load_docs(path)]


def kustomize(layout: Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k layout` would apply (kubectl's built-in kustomize)."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render deploy/overlays"
    out = subprocess.run(
        [kubectl, "kustomize", str(layout)], capture_output=True, text=True, check=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(kind: str, name: str, objects: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    objects = all_objects() if objects is None else objects
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected exactly one {kind} {name}, found {len(matches)}"
    return matches[0]


def pod_spec(kind: str, name: str, objects: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    obj = find(kind, name, objects)
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return obj["spec"]["template"]["spec"]  # type: ignore[no-any-return]


# -- (a) schema validation -----------------------------------------------------------------------------


def test_manifests_exist() -> None:
    assert {p.name for p in MANIFESTS} >= {"rbac.yaml", "daemonset.yaml", "cronjob.yaml"}
    # the base kustomization applies exactly these files
    assert sorted(load_docs(BASE / "kustomization.yaml")[0]["resources"]) == sorted(p.name for p in MANIFESTS)


def _validate(obj: dict[str, Any]) -> str:
    from kubernetes_validate import utils

    # Newest Kubernetes version whose schemas this kubernetes-validate ships; strict: unknown fields fail.
    # Any exception (no schema for the kind, unsupported version, invalid object) fails the test.
    return str(utils.validate(obj, utils.latest_version(), strict=True))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_objects_validate_against_kubernetes_schema(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path.name} holds no objects"
    for obj in docs:
        _validate(obj)


def test_strict_validation_rejects_an_unknown_field() -> None:
    """Guards the test above: a misspelt field must not pass."""
    from kubernetes_validate import utils

    broken = find("DaemonSet", "whereabouts-py")
    broken["spec"]["template"]["spec"]["containers"][0]["imagee"] = "x"
    with pytest.raises(utils.ValidationError):
        _validate(broken)


# -- (b) semantics -------------------------------------------------------------------------------------


def test_cronjob_runs_one_reconcile_pass_every_five_minutes_never_overlapping() -> None:
    cron = find("CronJob", "ipam-reconcile")
    assert cron["metadata"]["namespace"] == "kube-system"
    spec = cron["spec"]
    assert spec["schedule"] == "*/5 * * * *"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] > 0
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    assert spec["jobTemplate"]["spec"]["backoffLimit"] <= 3
    pod = pod_spec("CronJob", "ipam-reconcile")
    assert pod["serviceAccountName"] == "whereabouts-py-reconciler"
    assert pod["restartPolicy"] == "OnFailure"
    (container,) = pod["containers"]
    command = container["command"] + container.get("args", [])
    assert command[0] == "ipam-reconcile"
    assert command[command.index("--grace") + 1] == "300"
    assert "--interval" not in command and "--dry-run" not in command and "--kubeconfig" not in command


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda p: p.name)
def test_daemonset_runs_the_installer_with_the_host_paths_it_writes_mounted(layout: Path) -> None:
    """In the base and every overlay: the installer's own argument parser reads the DaemonSet's args,
    and every host directory it will write is mounted at --host-root + that path, and nothing else."""
    objects = kustomize(layout)
    ds = find("DaemonSet", "whereabouts-py", objects)
    assert ds["metadata"]["namespace"] == "kube-system"
    pod = pod_spec("DaemonSet", "whereabouts-py", objects)
    assert pod["serviceAccountName"] == "whereabouts-py-installer"
    assert pod["automountServiceAccountToken"] is False  # the installer's token: install container only
    assert pod["hostNetwork"] is True
    assert {"operator": "Exists"} in pod["tolerations"]  # every taint
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"install", "agent"}
    container = containers["install"]
    assert container["command"] == ["python3", "/opt/whereabouts-py/deploy/install.py"]
    args = inst.parse_args(container["args"])
    assert args.watch and args.token_lifetime == inst.DEFAULT_TOKEN_LIFETIME
    assert args.plugin_service_account == "whereabouts-py"
    host_root = args.host_root
    paths = inst.paths_of(args)
    env = {e["name"]: e for e in container["env"]}
    assert env["NODENAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted = {}  # host path -> container path
    loader = "/lib64/ld-linux-x86-64.so.2"  # read for the glibc check only (make image records it)
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "hostPath" in volume and volume["hostPath"]["path"] == loader:
            assert mount["readOnly"] is True and mount["mountPath"] == host_root + loader
            assert volume["hostPath"]["type"] == "File"
        elif "hostPath" in volume:
            mounted[volume["hostPath"]["path"]] = mount["mountPath"]
            assert not mount.get("readOnly", False)
    for host_dir in paths.host_dirs:
        assert mounted.get(host_dir) == host_root + host_dir, (
            f"{host_dir} is not mounted at {host_root}{host_dir}"
        )
    assert set(mounted) == set(paths.host_dirs), "hostPath mounts the installer does not need"
    # the agent reads the kubeconfig the flat file names, at its host path
    [agent] = [c for c in pod["containers"] if c["name"] == "agent"]
    agent_mounts = {
        volumes[m["name"]]["hostPath"]["path"]: m["mountPath"]
        for m in agent["volumeMounts"]
        if "hostPath" in volumes[m["name"]]
    }
    assert agent_mounts[paths.conf_dir] == paths.conf_dir == os.path.dirname(paths.kubeconfig)
    # and appends to the log file the flat file names (a read-only root would swallow its file logs)
    assert agent_mounts[inst.LOG_FILE] == inst.LOG_FILE
    [log_volume] = [v for v in pod["volumes"] if v.get("hostPath", {}).get("path") == inst.LOG_FILE]
    assert log_volume["hostPath"]["type"] == "FileOrCreate"

    # the installer's identity: its projected token, the cluster CA and namespace, in this container only
    identity = {m["mountPath"]: m for m in container["volumeMounts"]}[inst.SA_DIR]
    sources = volumes[identity["name"]]["projected"]["sources"]
    assert {"path": "token", "expirationSeconds": 3607} in [x.get("serviceAccountToken") for x in sources]
    assert all(
        inst.SA_DIR not in [m["mountPath"] for m in c["volumeMounts"]]
        for c in pod["containers"]
        if c is not container
    )

    probe = container["readinessProbe"]["exec"]["command"]
    assert inst.DEFAULT_READY_FILE in probe
    mount_points = [m["mountPath"] for m in container["volumeMounts"]]
    assert os.path.dirname(inst.DEFAULT_READY_FILE) in mount_points  # writable with a read-only root
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert limits["memory"] and requests["memory"] and requests["cpu"]
    security = container["securityContext"]
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "add" not in security["capabilities"]


@pytest.mark.parametrize("layout", OVERLAYS, ids=lambda p: p.name)
def test_overlays_validate_against_kubernetes_schema(layout: Path) -> None:
    for obj in kustomize(layout):
        _validate(obj)


def test_overlays_set_each_distributions_documented_paths() -> None:
    expected = {
        "k3s": ("/var/lib/rancher/k3s/data/cni", "/etc/cni/net.d"),
        "openshift": ("/var/lib/cni/bin", "/etc/kubernetes/cni/net.d"),
    }
    assert {p.name for p in OVERLAYS} == set(expected)
    for layout in OVERLAYS:
        [install] = [
            c
            for c in pod_spec("DaemonSet", "whereabouts-py", kustomize(layout))["containers"]
            if c["name"] == "install"
        ]
        args = inst.parse_args(install["args"])
        assert (args.cni_bin_dir, args.cni_conf_dir) == expected[layout.name]


def test_both_workloads_run_the_same_image() -> None:
    images = {
        pod_spec(kind, name)["containers"][0]["image"]
        for kind, name in (("DaemonSet", "whereabouts-py"), ("CronJob", "ipam-reconcile"))
    }
    assert len(images) == 1


PLUGIN_RULES = {
    (GROUP, "ippools"): {"get", "list", "create", "update"},
    (GROUP, "overlappingrangeipreservations"): {"get", "create", "update", "delete"},
    (GROUP, "nodeslicepools"): {"get", "list", "create", "update"},
    (GROUP, "nodeslicepools/status"): {"update"},  # a NodeSlicePool CRD with a status subresource
    (GROUP, "writerturns"): {"get", "create", "delete"},  # writer turns (ipam.turns)
}
RECONCILER_RULES = {
    # create + delete: node slices, fence a slice pool before returning its slice, remove it after;
    # patch: release leases (a JSON patch testing each), get + update when one changed
    (GROUP, "ippools"): {"get", "list", "update", "patch", "create", "delete"},
    (GROUP, "overlappingrangeipreservations"): {"get", "list", "create", "delete"},
    (GROUP, "nodeslicepools"): {"get", "list", "update"},
    (GROUP, "nodeslicepools/status"): {"update"},
    (GROUP, "writerturns"): {"list", "delete"},  # abandoned writer turns
}
RECONCILER_CLUSTER_RULES = {
    ("", "pods"): {"list"},
    ("", "nodes"): {"list"},
    ("apps", "statefulsets"): {"list", "get"},  # sticky addresses: the StatefulSet ends a retention
}
CONTROLLER_CLUSTER_RULES = {
    ("", "pods"): {"get", "list", "watch"},
    ("", "nodes"): {"list", "watch"},
    ("events.k8s.io", "events"): {"create"},
}


def granted(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def assert_bound(kind: str, name: str, account: str) -> None:
    binding = find(kind + "Binding", name)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "kube-system"}]
    if kind == "Role":
        assert (
            binding["metadata"]["namespace"] == find("Role", name)["metadata"]["namespace"] == "kube-system"
        )


@pytest.mark.parametrize(
    ("account", "rules"),
    [("whereabouts-py", PLUGIN_RULES), ("whereabouts-py-reconciler", RECONCILER_RULES)],
)
def test_roles_grant_exactly_the_verbs_each_component_uses_in_the_pools_namespace(
    account: str, rules: dict[tuple[str, str], set[str]]
) -> None:
    assert granted(find("Role", account)) == rules
    assert find("ServiceAccount", account)["metadata"]["namespace"] == "kube-system"
    assert_bound("Role", account, account)


#: the controller's get + update of its own ValidatingWebhookConfiguration, by name (tests/test_webhook.py)
WEBHOOK_ROLE = "whereabouts-py-controller-webhook"


def test_only_the_reconciler_and_controller_have_cluster_wide_rights_reading_pods_and_nodes() -> None:
    cluster_roles = {
        o["metadata"]["name"]: o
        for o in all_objects()
        if o["kind"] == "ClusterRole" and o["metadata"]["name"] != WEBHOOK_ROLE
    }
    assert sorted(cluster_roles) == ["whereabouts-py-controller", "whereabouts-py-reconciler"]
    assert granted(cluster_roles["whereabouts-py-reconciler"]) == RECONCILER_CLUSTER_RULES
    assert granted(cluster_roles["whereabouts-py-controller"]) == CONTROLLER_CLUSTER_RULES
    assert_bound("ClusterRole", "whereabouts-py-reconciler", "whereabouts-py-reconciler")
    assert_bound("ClusterRole", "whereabouts-py-controller", "whereabouts-py-controller")
    assert sorted(o["metadata"]["name"] for o in all_objects() if o["kind"] == "ClusterRoleBinding") == [
        "whereabouts-py-controller",
        WEBHOOK_ROLE,
        "whereabouts-py-reconciler",
    ]


def test_the_controller_may_read_and_renew_its_own_lease_only() -> None:
    role = find("Role", "whereabouts-py-controller")
    leases = [r for r in role["rules"] if "coordination.k8s.io" in r["apiGroups"]]
    assert leases == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["whereabouts-py-controller"],
            "verbs": ["get", "update"],
        }
    ]
    assert find("Lease", "whereabouts-py-controller")["metadata"]["namespace"] == "kube-system"
    deployment = find("Deployment", "whereabouts-py-controller")
    assert deployment["spec"]["replicas"] == 2
    assert "--leader-elect" in deployment["spec"]["template"]["spec"]["containers"][0]["command"]


def test_the_controller_serves_the_webhook_its_configuration_calls() -> None:
    """webhook.yaml's clientConfig reaches the Deployment's webhook port through a Service; the cert
    directory is a writable volume; the webhook's RBAC is bound to the Deployment's account."""
    from ipam.controller.main import build_parser

    spec = pod_spec("Deployment", "whereabouts-py-controller")
    (container,) = spec["containers"]
    args = build_parser().parse_args(container["command"][1:])
    port = args.webhook_bind_address.rpartition(":")[2]
    assert not args.webhook_allow_node_only_keys
    (webhook_port,) = [p for p in container["ports"] if p["containerPort"] == int(port)]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in {v["name"]: v for v in spec["volumes"]}[mounts[args.webhook_cert_dir]]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    labels = find("Deployment", "whereabouts-py-controller")["spec"]["template"]["metadata"]["labels"]
    config = find("ValidatingWebhookConfiguration", "whereabouts-py")
    for hook in config["webhooks"]:
        ref = hook["clientConfig"]["service"]
        assert ref["name"] == args.webhook_service
        service = find("Service", ref["name"])
        assert service["metadata"]["namespace"] == ref["namespace"] == "kube-system"
        assert service["spec"]["selector"].items() <= labels.items()
        (sp,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]]
        assert sp["targetPort"] == webhook_port["name"]
    account = spec["serviceAccountName"]
    assert_bound("Role", WEBHOOK_ROLE, account)
    assert_bound("ClusterRole", WEBHOOK_ROLE, account)
    assert {
        r["resources"][0]: (r["resourceNames"], r["verbs"]) for r in find("Role", WEBHOOK_ROLE)["rules"]
    } == {"secrets": (["whereabouts-py-webhook-cert"], ["get", "update"])}
    assert {
        r["resources"][0]: (r["resourceNames"], r["verbs"])
        for r in find("ClusterRole", WEBHOOK_ROLE)["rules"]
    } == {"validatingwebhookconfigurations": ([args.webhook_config], ["get", "update"])}


def test_the_installer_may_mint_tokens_for_the_plugins_account_only() -> None:
    role = find("Role", "whereabouts-py-installer")
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["serviceaccounts/token"],
            "resourceNames": ["whereabouts-py"],
            "verbs": ["create"],
        }
    ]
    assert_bound("Role", "whereabouts-py-installer", "whereabouts-py-installer")
    assert inst.DEFAULT_PLUGIN_SERVICE_ACCOUNT == "whereabouts-py"


def test_dockerfile_names_only_paths_that_exist() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=python:3\.11-slim-bookworm$", text, re.M)
    assert re.search(r"^FROM \$\{BASE\}$", text, re.M)
    assert re.search(r"^WORKDIR /opt/whereabouts-py$", text, re.M)
    copies = re.findall(r"^COPY (.+)$", text, re.M)
    assert copies
    sources: list[str] = []
    for line in copies:
        *srcs, dest = line.split()
        sources += srcs
        assert not dest.startswith("/") or dest.startswith("/opt/whereabouts-py")
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    assert {"pyproject.toml", "ipam/", "bin/", "deploy/"} <= set(sources)
    assert "pip wheel --no-cache-dir --no-deps -w /tmp/wheels ." in text
    assert "python3 -I deploy/image/finish.py /tmp/wheels" in text  # make image's last step too
    # the DaemonSet's command names the installer where the image puts it
    assert "deploy/install.py" in pod_spec("DaemonSet", "whereabouts-py")["containers"][0]["command"][1]
    # the CronJob's command is a console script the package installs
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^ipam-reconcile = "ipam\.reconcile:main"$', pyproject, re.M)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for src in sources:  # nothing the Dockerfile copies is ignored
        assert "!" + src in ignore


# -- (c) install.py against a fake node ----------------------------------------------------------------

FAKE_PYTHON = '#!/bin/sh\necho "args: $*"\necho "ld: $LD_LIBRARY_PATH"\n'
POD_TOKEN = "pod-token-1"


@pytest.fixture(scope="module")
def token_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeTokenAPI]:
    yield from serve(tmp_path_factory.mktemp("token-api"))


@dataclass
class Node:
    tmp: Path
    host: Path
    sa: Path
    bundle: Path
    ready: Path
    api: FakeTokenAPI
    watchers: list[subprocess.Popen[str]] = field(default_factory=list)

    def argv(self, *extra: str) -> list[str]:
        return [
            "--host-root",
            str(self.host),
            "--bundle-src",
            str(self.bundle),
            "--token-file",
            str(self.sa / "token"),
            "--ca-file",
            str(self.sa / "ca.crt"),
            "--namespace-file",
            str(self.sa / "namespace"),
            "--ready-file",
            str(self.ready),
            *extra,
        ]

    def env(self) -> dict[str, str]:
        port = self.api.url.rsplit(":", 1)[1]
        return {
            **os.environ,
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": port,
            "NODENAME": "node-a",
        }

    def at(self, host_path: str) -> Path:
        return self.host / host_path.lstrip("/")

    def kubeconfig(self, path: str = inst.KUBECONFIG_PATH) -> dict[str, Any]:
        return yaml.safe_load(self.at(path).read_text())  # type: ignore[no-any-return]


def fake_glibc(bundle: Path, host: Path, built: str = "2.36", node: str = "2.36") -> None:
    """The glibc record of an image built against `built`, and a node loader of glibc `node`."""
    record = bundle / "share" / "whereabouts-py" / "glibc.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"glibc": built, "loader": "/lib64/ld-linux-x86-64.so.2"}))
    loader = host / "lib64" / "ld-linux-x86-64.so.2"
    loader.parent.mkdir(parents=True, exist_ok=True)
    loader.write_bytes(b"\x7fELF...ld.so (GNU libc) stable release version " + node.encode() + b".\n")


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token_api: FakeTokenAPI) -> Iterator[Node]:
    token_api.accepted = {POD_TOKEN}
    token_api.grant_seconds = None
    token_api.fail_status = None
    token_api.minted.clear()
    token_api.revoked.clear()
    token_api.bearers.clear()
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text(POD_TOKEN + "\n")
    (sa / "ca.crt").write_bytes(token_api.ca)
    (sa / "namespace").write_text("kube-system")
    bundle = tmp_path / "usr-local"
    (bundle / "bin").mkdir(parents=True)
    python = bundle / "bin" / "python3.11"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    (bundle / "bin" / "python3").symlink_to("python3.11")
    (bundle / "lib" / "python3.11" / "site-packages" / "ipam").mkdir(parents=True)
    (bundle / "lib" / "python3.11" / "site-packages" / "ipam" / "__init__.py").write_text("")
    (bundle / "lib" / "libpython3.11.so.1.0").write_bytes(b"\x7fELF fake")
    (bundle / "lib" / "libpython3.11.so").symlink_to("libpython3.11.so.1.0")
    (bundle / "bin" / "python-abs").symlink_to(bundle / "bin" / "python3.11")  # absolute, inside the tree
    (bundle / "share" / "read-only").mkdir(parents=True)
    (bundle / "share" / "read-only" / "data").write_text("x")
    (bundle / "share" / "read-only").chmod(0o555)
    host = tmp_path / "host"
    host.mkdir()
    fake_glibc(bundle, host)
    result = Node(tmp_path, host, sa, bundle, tmp_path / "ready", token_api)
    for key, value in result.env().items():
        monkeypatch.setenv(key, value)
    yield result
    for proc in result.watchers:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def run_inproc(node: Node, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    rc = inst.main(node.argv(*extra))
    out, err = capsys.readouterr()
    return rc, out, err


def test_install_writes_an_executable_wrapper_naming_host_paths(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run_inproc(node, capsys)
    assert rc == 0, err
    wrapper = node.at("/opt/cni/bin/whereabouts-py")
    assert stat.S_IMODE(wrapper.stat().st_mode) == 0o755
    text = wrapper.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert f'exec /opt/cni/whereabouts-py/current/bin/python3 -S -I -B -c "{inst.SHIM_CODE}" "$@"' in text
    assert "LD_LIBRARY_PATH=/opt/cni/whereabouts-py/current/lib\n" in text
    assert str(node.host) not in text and str(node.tmp) not in text  # host paths, not the container's

    # Run it with the host paths pointed into the fake root: arguments and library path reach python.
    runnable = node.tmp / "wrapper.sh"
    runnable.write_text(text.replace("/opt/cni/whereabouts-py", str(node.at("/opt/cni/whereabouts-py"))))
    runnable.chmod(0o755)
    out = subprocess.run([str(runnable), "a b", "c"], capture_output=True, text=True, check=True).stdout
    assert f"args: -S -I -B -c {inst.SHIM_CODE} a b c\n" in out
    assert f"ld: {node.at('/opt/cni/whereabouts-py/current/lib')}\n" in out
    assert node.ready.read_text() == "ready\n"


def test_install_copies_the_bundle_and_points_current_at_it(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_inproc(node, capsys)[0] == 0
    root = node.at(inst.BUNDLE_DIR)
    current = root / "current"
    assert current.is_symlink()
    target = os.readlink(current)
    assert target.startswith("bundle-") and "/" not in target  # relative: valid on the host too
    copy = root / target
    assert (copy / "bin" / "python3.11").read_text() == FAKE_PYTHON
    assert stat.S_IMODE((copy / "bin" / "python3.11").stat().st_mode) == 0o755
    assert os.readlink(copy / "bin" / "python3") == "python3.11"
    assert os.readlink(copy / "lib" / "libpython3.11.so") == "libpython3.11.so.1.0"
    assert os.readlink(copy / "bin" / "python-abs") == "python3.11"  # absolute link made relative
    assert (copy / "lib" / "python3.11" / "site-packages" / "ipam" / "__init__.py").exists()
    assert stat.S_IMODE((copy / "share" / "read-only").stat().st_mode) == 0o555
    assert (copy / "share" / "read-only" / "data").read_text() == "x"
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp-")] == []


def test_kubeconfig_holds_server_a_minted_token_inline_ca_and_namespace(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = run_inproc(node, capsys)
    assert rc == 0, err
    [minted] = node.api.minted
    # the installer's own (pod) token was used for the TokenRequest only, for the plugin's account
    assert (minted.namespace, minted.service_account, minted.bearer) == (
        "kube-system",
        "whereabouts-py",
        POD_TOKEN,
    )
    assert minted.body["spec"] == {"expirationSeconds": 86400}  # bound to nothing, 24 h by default
    path = node.at("/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = node.kubeconfig()
    context = next(c["context"] for c in config["contexts"] if c["name"] == config["current-context"])
    cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
    user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
    assert cluster["server"] == node.api.url
    assert base64.b64decode(cluster["certificate-authority-data"]) == node.api.ca
    assert user == {"token": minted.token}  # inline only: no tokenFile, exec or file paths
    assert set(cluster) == {"server", "certificate-authority-data"}
    assert context["namespace"] == "kube-system"
    assert path.stat().st_uid == os.geteuid()
    assert "minted a token for ServiceAccount kube-system/whereabouts-py: expires " in out


def test_ipv6_api_server_address_is_bracketed() -> None:
    env = {"KUBERNETES_SERVICE_HOST": "fd00:10:96::1", "KUBERNETES_SERVICE_PORT": "443"}
    assert inst.api_server(env, None) == "https://[fd00:10:96::1]:443"


def test_flat_file_names_the_kubeconfig_and_the_node(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_inproc(node, capsys)[0] == 0
    flat = json.loads(node.at("/etc/cni/net.d/whereabouts.d/whereabouts.conf").read_text())
    assert flat == {
        "datastore": "kubernetes",
        "kubernetes": {"kubeconfig": "/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig"},
        "data_dir": "/var/lib/cni/whereabouts-py",
        "log_file": "/var/log/whereabouts-py.log",
        "node_name": "node-a",
    }
    assert node.at("/var/lib/cni/whereabouts-py").is_dir()


def test_the_flat_file_is_accepted_by_the_plugins_config_loader(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    from ipam.config import IPAMConfig, read_flat_file

    assert run_inproc(node, capsys)[0] == 0
    ipam = IPAMConfig.model_validate(read_flat_file(str(node.at(inst.FLAT_FILE_PATH))))
    assert ipam.kubernetes.kubeconfig == inst.KUBECONFIG_PATH
    assert ipam.node_name == "node-a"
    assert ipam.data_dir == inst.DATA_DIR


def snapshot_tree(root: Path) -> dict[str, tuple[int, int, int]]:
    return {
        str(p.relative_to(root)): (p.lstat().st_ino, p.lstat().st_mtime_ns, p.lstat().st_mode)
        for p in sorted(root.rglob("*"))
        if p.name != ".install.lock"
    }


def test_running_twice_changes_nothing(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_inproc(node, capsys)[0] == 0
    before = snapshot_tree(node.host)
    rc, out, err = run_inproc(node, capsys)
    assert rc == 0, err
    assert snapshot_tree(node.host) == before  # same inodes: nothing was rewritten or recopied
    assert "wrote" not in out and "installed bundle" not in out
    assert len(node.api.minted) == 1  # the token in the kubeconfig is fresh enough: kept, not re-minted
    assert "kept the plugin's token from /etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig: expires" in out
    assert node.api.reviews == 1  # shown to the API server once before it is kept


def test_a_kept_token_the_api_server_refuses_is_replaced(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_inproc(node, capsys)[0] == 0
    node.api.revoked.add(node.api.minted[-1].token)  # the ServiceAccount was deleted and recreated
    rc, _, err = run_inproc(node, capsys)
    assert rc == 0, err
    assert "refuses the plugin's token" in err
    assert len(node.api.minted) == 2 and token_in_kubeconfig(node) == node.api.minted[-1].token


def test_watch_replaces_a_revoked_token_at_the_next_check(node: Node) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            str(INSTALL_PY),
            *node.argv("--watch", "--interval", "0.05", "--token-check-interval", "0.1"),
        ],
        env=node.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    node.watchers.append(proc)
    wait_for(node.ready.exists, "first install", proc)
    first = node.api.minted[0].token
    node.api.revoked.add(first)
    wait_for(lambda: token_in_kubeconfig(node) not in ("", first), "a new token after revocation", proc)
    assert len(node.api.minted) == 2


def test_a_token_due_for_renewal_is_replaced_at_the_next_run(
    node: Node, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_inproc(node, capsys)[0] == 0
    first = node.api.minted[-1].token
    # two thirds of the lifetime later (by the installer's clock): a third is left, so it renews
    start = time.time()
    monkeypatch.setattr(inst, "now", lambda: start + 86400 * 2 / 3 + 1)
    rc, out, err = run_inproc(node, capsys)
    assert rc == 0, err
    assert len(node.api.minted) == 2
    assert token_in_kubeconfig(node) == node.api.minted[-1].token != first
    assert "rewrote" not in out and f"wrote {inst.KUBECONFIG_PATH}" in out


def test_a_kubeconfig_of_another_account_or_server_is_not_reused(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_inproc(node, capsys)[0] == 0
    path = node.at(inst.KUBECONFIG_PATH)
    config = json.loads(path.read_text())
    foreign = node.api.mint("kube-system", "someone-else", POD_TOKEN, {"spec": {"expirationSeconds": 86400}})
    config["users"][0]["user"]["token"] = foreign["status"]["token"]
    path.write_text(json.dumps(config))
    assert run_inproc(node, capsys)[0] == 0
    assert token_in_kubeconfig(node) == node.api.minted[-1].token
    assert node.api.minted[-1].service_account == "whereabouts-py"


def bundles(node: Node) -> set[str]:
    return {p.name for p in node.at(inst.BUNDLE_DIR).iterdir() if p.name.startswith("bundle-")}


def test_new_bundle_replaces_current_keeps_the_previous_and_prunes_older(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    current = node.at(inst.BUNDLE_LINK)
    assert run_inproc(node, capsys)[0] == 0
    first = os.readlink(current)
    (node.bundle / "lib" / "new-in-v2").write_text("2")
    assert run_inproc(node, capsys)[0] == 0
    second = os.readlink(current)
    assert second != first and bundles(node) == {first, second}
    assert (current / "lib" / "new-in-v2").read_text() == "2"
    (node.bundle / "lib" / "new-in-v3").write_text("3")
    assert run_inproc(node, capsys)[0] == 0
    third = os.readlink(current)
    assert bundles(node) == {second, third}


def test_leftovers_of_an_interrupted_copy_are_removed(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    stale = node.at(inst.BUNDLE_DIR) / ".tmp-bundle-0123456789abcdef.999"
    (stale / "bin").mkdir(parents=True)
    (stale / "bin" / "half").write_text("x")
    assert run_inproc(node, capsys)[0] == 0
    assert not stale.exists()


def test_kubeconfig_loads_in_the_kubernetes_client(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    from kubernetes import client, config

    assert run_inproc(node, capsys)[0] == 0
    path = str(node.at(inst.KUBECONFIG_PATH))
    configuration = client.Configuration()
    config.load_kube_config(config_file=path, client_configuration=configuration)
    assert configuration.host == node.api.url
    bearer = configuration.auth_settings()["BearerToken"]  # what the client puts in its requests
    token = node.api.minted[-1].token
    assert (bearer["in"], bearer["key"], bearer["value"]) == ("header", "authorization", f"Bearer {token}")
    assert Path(configuration.ssl_ca_cert).read_bytes() == node.api.ca
    _, active = config.list_kube_config_contexts(config_file=path)
    assert active["context"]["namespace"] == "kube-system"


# -- subprocess runs: errors and --watch ---------------------------------------------------------------


def run_installer(
    node: Node, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(INSTALL_PY), *node.argv(*extra)],
        env=env or node.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_clean_failure(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    for phrase in phrases:
        assert phrase in result.stderr


def test_installs_and_prunes_without_capabilities_as_in_the_daemonset(node: Node) -> None:
    """The DaemonSet drops ALL capabilities: root then needs owner write permission, also to remove
    an old bundle holding a read-only directory."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")  # util-linux
        assert setpriv, "setpriv is needed to run the installer without capabilities"
        prefix = [setpriv, "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--"]
    for version in range(3):
        (node.bundle / "lib" / f"v{version}").write_text(str(version))
        result = subprocess.run(
            [*prefix, sys.executable, str(INSTALL_PY), *node.argv()],
            env=node.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
    assert len(bundles(node)) == 2
    assert (node.at(inst.BUNDLE_LINK) / "lib" / "v2").read_text() == "2"


def test_missing_token_fails_with_a_message_naming_the_file(node: Node) -> None:
    (node.sa / "token").unlink()
    result = run_installer(node)
    assert_clean_failure(result, "token", str(node.sa / "token"))
    assert not node.ready.exists()
    assert not node.at(inst.KUBECONFIG_PATH).exists()


def test_unwritable_host_directory_fails_cleanly(node: Node) -> None:
    blocker = node.at("/etc/cni/net.d/whereabouts.d")
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the directory should be")  # root ignores permissions; this it cannot
    result = run_installer(node)
    assert_clean_failure(result, str(blocker))
    assert not node.ready.exists()


def test_missing_node_name_fails_cleanly(node: Node) -> None:
    env = node.env()
    del env["NODENAME"]
    assert_clean_failure(run_installer(node, env=env), "NODENAME")


def test_missing_service_env_fails_cleanly(node: Node) -> None:
    env = node.env()
    del env["KUBERNETES_SERVICE_HOST"]
    assert_clean_failure(run_installer(node, env=env), "KUBERNETES_SERVICE_HOST")


@pytest.mark.parametrize("node_glibc", ["2.35", "2.17", "1.99"])
def test_a_node_with_an_older_glibc_than_the_image_is_refused_before_anything_is_written(
    node: Node, node_glibc: str
) -> None:
    fake_glibc(node.bundle, node.host, built="2.36", node=node_glibc)
    result = run_installer(node)
    assert_clean_failure(result, f"the node's glibc is {node_glibc}, older than 2.36", "built against")
    assert not node.at(inst.BUNDLE_LINK).exists()
    assert not node.at(inst.PLUGIN_PATH).exists()
    assert not node.ready.exists()


@pytest.mark.parametrize("node_glibc", ["2.36", "2.41", "3.0"])
def test_a_node_with_the_images_glibc_or_newer_is_accepted(node: Node, node_glibc: str) -> None:
    fake_glibc(node.bundle, node.host, built="2.36", node=node_glibc)
    result = run_installer(node)
    assert result.returncode == 0, result.stderr
    assert node.at(inst.PLUGIN_PATH).exists()


def test_a_node_without_glibcs_loader_or_an_image_without_a_record_is_refused(node: Node) -> None:
    loader = node.at("/lib64/ld-linux-x86-64.so.2")
    loader.write_bytes(b"\x7fELF musl libc (x86_64)\n")
    assert_clean_failure(run_installer(node), "not glibc's loader")
    loader.unlink()
    assert_clean_failure(run_installer(node), "cannot read the node's dynamic loader", "node-loader")
    (node.bundle / "share" / "whereabouts-py" / "glibc.json").unlink()
    assert_clean_failure(run_installer(node), "records no glibc floor")
    assert not node.at(inst.PLUGIN_PATH).exists()


def wait_for(condition: Callable[[], bool], what: str, proc: subprocess.Popen[str]) -> None:
    """Poll until `condition` holds; fail (with the installer's output) if it never does."""
    for _ in range(400):  # bounded: 400 x 25 ms
        if condition():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.025)
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"{what} never happened; installer rc={proc.returncode} stdout={out!r} stderr={err!r}")


def start_watcher(node: Node) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(INSTALL_PY), *node.argv("--watch", "--interval", "0.1")],
        env=node.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    node.watchers.append(proc)
    return proc


@pytest.fixture
def watcher(node: Node) -> Iterator[subprocess.Popen[str]]:
    proc = start_watcher(node)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def token_in_kubeconfig(node: Node) -> str:
    try:
        return str(node.kubeconfig()["users"][0]["user"]["token"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def test_watch_renews_the_plugins_token_before_it_expires_and_stops_on_sigterm(node: Node) -> None:
    node.api.grant_seconds = 3  # the API server may grant less than asked: the installer goes by expiry
    watcher = start_watcher(node)
    wait_for(node.ready.exists, "first install", watcher)
    first = node.api.minted[0]
    assert token_in_kubeconfig(node) == first.token

    # The kubelet rotates the pod's own token: the kubeconfig never held it, but the next
    # TokenRequest authenticates with the new one.
    node.api.accepted = {POD_TOKEN, "pod-token-2"}
    new = node.sa / "token.new"
    new.write_text("pod-token-2\n")
    new.replace(node.sa / "token")

    # With a third of the 3 s left the installer mints again and rewrites the kubeconfig.
    wait_for(lambda: any(m.bearer == "pod-token-2" for m in node.api.minted), "renewal", watcher)
    wait_for(lambda: token_in_kubeconfig(node) not in ("", first.token), "kubeconfig rewrite", watcher)
    assert token_in_kubeconfig(node) in {m.token for m in node.api.minted[1:]}
    kubeconfig = node.at(inst.KUBECONFIG_PATH)
    assert stat.S_IMODE(kubeconfig.stat().st_mode) == 0o600

    # A file removed from the host comes back too.
    flat = node.at(inst.FLAT_FILE_PATH)
    flat.unlink()
    wait_for(flat.exists, "flat file restored", watcher)

    watcher.send_signal(signal.SIGTERM)
    out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0, err
    assert "Traceback" not in err
    assert f"rewrote {inst.KUBECONFIG_PATH}" in out
    assert "minted a token for ServiceAccount kube-system/whereabouts-py: expires " in out
    # each renewal happened before the token it replaced expired (the log says when it was due)
    assert "expired" not in err
    assert node.at(inst.PLUGIN_PATH).exists()  # stopping leaves the plugin installed


def test_watch_reports_a_vanished_pod_token_keeps_running_and_recovers(
    node: Node, watcher: subprocess.Popen[str]
) -> None:
    wait_for(node.ready.exists, "first install", watcher)
    first = token_in_kubeconfig(node)
    (node.sa / "token").unlink()
    wait_for(lambda: not node.ready.exists(), "readiness withdrawn", watcher)
    assert token_in_kubeconfig(node) == first  # the plugin's token is untouched meanwhile
    (node.sa / "token").write_text(POD_TOKEN)
    wait_for(node.ready.exists, "readiness restored", watcher)
    watcher.send_signal(signal.SIGTERM)
    _, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0
    assert str(node.sa / "token") in err and "Traceback" not in err


def test_a_refused_renewal_keeps_the_old_token_and_is_retried(
    node: Node, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    installer = inst.Installer(inst.parse_args(node.argv()))
    installer.install()
    first = token_in_kubeconfig(node)
    start = time.time()
    monkeypatch.setattr(inst, "now", lambda: start + 86400 * 2 / 3 + 1)  # due, not expired
    node.api.fail_status = 403
    with pytest.raises(
        inst.InstallError, match=r"HTTP 403: .*create on serviceaccounts/token .*whereabouts-py"
    ):
        installer.write_config()
    assert token_in_kubeconfig(node) == first
    node.api.fail_status = None
    assert installer.write_config() == [inst.KUBECONFIG_PATH]
    assert token_in_kubeconfig(node) == node.api.minted[-1].token != first


def test_daemonset_runs_the_node_agent_on_the_hosts_socket_dir() -> None:
    from ipam.shim import DEFAULT_SOCKET

    pod = pod_spec("DaemonSet", "whereabouts-py")
    [agent] = [c for c in pod["containers"] if c["name"] == "agent"]
    command = agent["command"]
    assert command[0] == "ipam-agent"
    assert command[command.index("--socket") + 1] == DEFAULT_SOCKET  # where the shim looks by default
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted = {
        volumes[m["name"]]["hostPath"]["path"]: m["mountPath"]
        for m in agent["volumeMounts"]
        if "hostPath" in volumes[m["name"]]
    }
    # the socket dir, node locks (data_dir) and the kubeconfig named in the flat file are shared with
    # CNI calls on the host, so each is mounted at its host path
    for host_dir in (
        os.path.dirname(DEFAULT_SOCKET),
        "/var/lib/cni/whereabouts-py",
        "/etc/cni/net.d/whereabouts.d",
    ):
        assert mounted.get(host_dir) == host_dir
    probe = " ".join(agent["readinessProbe"]["exec"]["command"])
    assert "127.0.0.1:9733/healthz" in probe and command[command.index("--metrics-port") + 1] == "9733"
    assert agent["securityContext"]["privileged"] is False


def test_agent_drains_within_the_pods_grace_period() -> None:
    """On SIGTERM the agent finishes its calls in flight for --drain-seconds, then exits: that must end
    before the kubelet's SIGKILL, with time left for the exit itself."""
    from ipam.agent import DRAIN_SECONDS

    pod = pod_spec("DaemonSet", "whereabouts-py")
    [agent] = [c for c in pod["containers"] if c["name"] == "agent"]
    command = agent["command"]
    drain = (
        float(command[command.index("--drain-seconds") + 1])
        if "--drain-seconds" in command
        else DRAIN_SECONDS
    )
    assert drain == DRAIN_SECONDS  # the manifest says what the agent does by itself
    assert drain + 5 <= pod["terminationGracePeriodSeconds"]


# -- (d) the host is not trusted: symlinks, modes, other distributions' paths ---------------------------


@pytest.mark.parametrize("target", [inst.KUBECONFIG_PATH, inst.FLAT_FILE_PATH, inst.PLUGIN_PATH])
def test_a_planted_symlink_to_an_identical_copy_is_replaced_not_kept(
    node: Node, capsys: pytest.CaptureFixture[str], target: str
) -> None:
    assert run_inproc(node, capsys)[0] == 0
    path = node.at(target)
    copy = node.tmp / "attacker-copy"
    shutil.copy2(path, copy)  # same content and mode: the old installer kept the link
    path.unlink()
    path.symlink_to(copy)
    assert run_inproc(node, capsys)[0] == 0
    assert not path.is_symlink() and path.is_file()
    if target != inst.KUBECONFIG_PATH:  # a symlinked kubeconfig is not read at all: a new token is minted
        assert path.read_bytes() == copy.read_bytes()
    copy.write_text("changed by the attacker")  # the node's file no longer depends on it
    assert path.read_text() != "changed by the attacker"


def test_a_symlink_is_never_written_through(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    victim = node.tmp / "victim"
    victim.write_text("precious")
    kubeconfig = node.at(inst.KUBECONFIG_PATH)
    kubeconfig.parent.mkdir(parents=True)
    kubeconfig.symlink_to(victim)
    assert run_inproc(node, capsys)[0] == 0
    assert victim.read_text() == "precious"
    assert not kubeconfig.is_symlink() and stat.S_IMODE(kubeconfig.stat().st_mode) == 0o600


def test_the_install_lock_does_not_follow_a_symlink(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    victim = node.tmp / "victim"
    victim.write_text("precious")
    root = node.at(inst.BUNDLE_DIR)
    root.mkdir(parents=True)
    (root / ".install.lock").symlink_to(victim)
    rc, _, err = run_inproc(node, capsys)
    assert rc == 0, err
    assert victim.read_text() == "precious" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert not (root / ".install.lock").is_symlink()


def test_a_symlinked_directory_on_the_way_is_refused(node: Node) -> None:
    elsewhere = node.tmp / "elsewhere"
    elsewhere.mkdir()
    node.at("/etc/cni/net.d").mkdir(parents=True)
    node.at(inst.CONF_DIR).symlink_to(elsewhere)
    result = run_installer(node)
    assert_clean_failure(result, "is a symlink", str(node.at(inst.CONF_DIR)))
    assert list(elsewhere.iterdir()) == []


def test_a_planted_bundle_symlink_is_replaced_by_a_real_copy(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    name = inst.BUNDLE_PREFIX + inst.bundle_stamp(str(node.bundle))
    elsewhere = node.tmp / "evil-bundle"
    (elsewhere / "bin").mkdir(parents=True)
    root = node.at(inst.BUNDLE_DIR)
    root.mkdir(parents=True)
    (root / name).symlink_to(elsewhere)
    assert run_inproc(node, capsys)[0] == 0
    assert not (root / name).is_symlink() and (root / name / "bin" / "python3.11").is_file()


def test_directories_are_created_0755_whatever_the_umask(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    old = os.umask(0o077)
    try:
        assert run_inproc(node, capsys)[0] == 0
    finally:
        os.umask(old)
    for directory in ("/etc", "/etc/cni", "/etc/cni/net.d", *inst.HOST_DIRS):
        st = node.at(directory).lstat()
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755, directory


def test_a_directory_others_may_write_is_refused(node: Node) -> None:
    conf = node.at(inst.CONF_DIR)
    conf.mkdir(parents=True)
    conf.chmod(0o777)
    result = run_installer(node)
    assert_clean_failure(result, str(conf), "writable by group or others")
    assert not node.at(inst.KUBECONFIG_PATH).exists()


def test_the_installers_conf_dirs_are_the_ones_the_plugin_searches() -> None:
    from ipam.config import DEFAULT_FLAT_FILES

    assert {f"{d}/whereabouts.d/whereabouts.conf" for d in inst.FLAT_FILE_CONF_DIRS} == set(
        DEFAULT_FLAT_FILES
    )


@pytest.mark.parametrize(
    ("bin_dir", "conf_dir"),
    [("/var/lib/rancher/k3s/data/cni", "/etc/cni/net.d"), ("/var/lib/cni/bin", "/etc/kubernetes/cni/net.d")],
    ids=["k3s", "openshift"],
)
def test_host_paths_are_options(
    node: Node, capsys: pytest.CaptureFixture[str], bin_dir: str, conf_dir: str
) -> None:
    rc, _, err = run_inproc(node, capsys, "--cni-bin-dir", bin_dir, "--cni-conf-dir", conf_dir)
    assert rc == 0, err
    paths = inst.Paths(bin_dir, conf_dir)
    assert node.at(f"{bin_dir}/whereabouts-py").read_text() == inst.WRAPPER
    flat = json.loads(node.at(f"{conf_dir}/whereabouts.d/whereabouts.conf").read_text())
    assert (
        flat["kubernetes"]["kubeconfig"]
        == paths.kubeconfig
        == f"{conf_dir}/whereabouts.d/whereabouts.kubeconfig"
    )
    assert node.kubeconfig(paths.kubeconfig)["users"][0]["user"]["token"] == node.api.minted[-1].token
    assert not node.at("/opt/cni/bin").exists()


def test_a_conf_dir_the_plugin_does_not_search_is_a_usage_error(node: Node) -> None:
    result = run_installer(node, "--cni-conf-dir", "/var/lib/rancher/k3s/agent/etc/cni/net.d")
    assert result.returncode == 2 and "--cni-conf-dir" in result.stderr


def test_a_token_lifetime_below_the_api_servers_minimum_is_a_usage_error(node: Node) -> None:
    result = run_installer(node, "--token-lifetime", "599")
    assert result.returncode == 2 and "at least 600" in result.stderr


def test_a_refused_token_request_fails_cleanly_naming_the_rbac_rule(node: Node) -> None:
    node.api.fail_status = 403
    result = run_installer(node)
    assert_clean_failure(result, "HTTP 403", "serviceaccounts/token", "whereabouts-py")
    assert not node.at(inst.KUBECONFIG_PATH).exists() and not node.ready.exists()


def cni_path_store(kubeconfig: str, tmp: Path) -> Any:
    """A KubernetesStore opened the way a CNI call and the node agent open it: from a node flat file
    naming `kubeconfig` (KubernetesStore.from_config), not from a path handed to connect()."""
    from ipam.config import load_config
    from ipam.store.kubernetes import KubernetesStore

    tmp.mkdir(parents=True, exist_ok=True)
    flat = tmp / "whereabouts.conf"
    flat_doc = {
        "datastore": "kubernetes",
        "kubernetes": {"kubeconfig": kubeconfig},
        "data_dir": str(tmp / "data"),
    }
    flat.write_text(json.dumps(flat_doc))
    nad = {
        "cniVersion": "1.0.0",
        "name": "net",
        "type": "x",
        "ipam": {"type": "whereabouts-py", "range": "10.4.0.0/24"},
    }
    return KubernetesStore.from_config(load_config(json.dumps(nad).encode(), flat_search=[str(flat)]))


def test_a_long_lived_client_follows_the_installers_kubeconfig_rewrite(
    node: Node, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node agent keeps one client per kubeconfig: after a renewal its next request must carry the
    new token, since the old one expires a third of a lifetime later."""
    installer = inst.Installer(inst.parse_args(node.argv()))
    installer.install()
    store = cni_path_store(str(node.at(inst.KUBECONFIG_PATH)), node.tmp / "cni")

    def bearer() -> str:  # the token the store's next request carries
        store.check_reachable()
        return node.api.bearers[-1]

    assert bearer() == node.api.minted[-1].token
    start = time.time()
    monkeypatch.setattr(inst, "now", lambda: start + 86400 * 2 / 3 + 1)
    assert installer.write_config() == [inst.KUBECONFIG_PATH]
    assert len(node.api.minted) == 2
    assert bearer() == node.api.minted[-1].token
    # a broken replacement (not a kubeconfig) keeps the last good token instead of failing every call
    node.at(inst.KUBECONFIG_PATH).write_text("garbage")
    assert bearer() == node.api.minted[-1].token
    store.close()


def test_a_refused_token_is_replaced_at_the_first_mint_that_succeeds(node: Node) -> None:
    args = inst.parse_args([*node.argv(), "--token-check-interval", "0"])
    installer = inst.Installer(args)
    installer.install()
    first = token_in_kubeconfig(node)
    node.api.revoked.add(first)
    node.api.fail_status = 403  # revoked, and the first attempts to mint anew are refused too
    with pytest.raises(inst.InstallError, match="HTTP 403"):
        installer.write_config()
    installer.args.token_check_interval = 3600  # no further check: the refusal is remembered
    with pytest.raises(inst.InstallError, match="HTTP 403"):
        installer.write_config()
    node.api.fail_status = None
    assert installer.write_config() == [inst.KUBECONFIG_PATH]
    assert token_in_kubeconfig(node) == node.api.minted[-1].token != first


def test_installs_under_a_read_only_root_with_only_the_host_dirs_writable(node: Node) -> None:
    """As in the DaemonSet (readOnlyRootFilesystem): /host, /host/opt, /host/etc/cni/net.d ... are
    read-only; only the hostPath mounts are writable. The installer must check, not create, the
    directories above them. Reproduced with bind mounts in a private mount namespace (root)."""
    assert os.geteuid() == 0, "needs root for a mount namespace (as in CI)"
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is needed"
    for directory in inst.HOST_DIRS:
        node.at(directory).mkdir(parents=True, exist_ok=True)
    host = str(node.host)
    script = [f"mount --bind {host} {host}"]
    script += [f"mount --bind {node.at(d)} {node.at(d)}" for d in inst.HOST_DIRS]
    script += [f"mount -o remount,bind,ro {host}"]
    script += [f"touch {host}/probe 2>/dev/null && {{ echo root still writable; exit 3; }}"]
    script += ["exec " + " ".join([sys.executable, str(INSTALL_PY), *node.argv()])]
    result = subprocess.run(
        [unshare, "--mount", "--propagation", "private", "sh", "-ec", "\n".join(script)],
        env=node.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert node.at(inst.KUBECONFIG_PATH).is_file() and node.at(inst.PLUGIN_PATH).is_file()
