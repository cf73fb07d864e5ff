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
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
INSTALL_PY = DEPLOY / "install.py"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
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


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in all_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected exactly one {kind} {name}, found {len(matches)}"
    return matches[0]


def pod_spec(kind: str, name: str) -> dict[str, Any]:
    obj = find(kind, name)
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return obj["spec"]["template"]["spec"]  # type: ignore[no-any-return]


# -- (a) schema validation -----------------------------------------------------------------------------


def test_manifests_exist() -> None:
    assert {p.name for p in MANIFESTS} >= {"rbac.yaml", "daemonset.yaml", "cronjob.yaml"}


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


def test_daemonset_runs_the_installer_with_the_host_paths_it_writes_mounted() -> None:
    ds = find("DaemonSet", "whereabouts-py")
    assert ds["metadata"]["namespace"] == "kube-system"
    pod = pod_spec("DaemonSet", "whereabouts-py")
    assert pod["serviceAccountName"] == "whereabouts-py"
    assert pod["hostNetwork"] is True
    assert {"operator": "Exists"} in pod["tolerations"]  # every taint
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"install", "agent"}
    container = containers["install"]
    command = container["command"]
    assert command[:2] == ["python3", "/opt/whereabouts-py/deploy/install.py"]
    host_root = command[command.index("--host-root") + 1]
    assert "--watch" in command
    env = {e["name"]: e for e in container["env"]}
    assert env["NODENAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted = {}  # host path -> container path
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "hostPath" in volume:
            mounted[volume["hostPath"]["path"]] = mount["mountPath"]
            assert not mount.get("readOnly", False)
    for host_dir in inst.HOST_DIRS:
        assert mounted.get(host_dir) == host_root + host_dir, (
            f"{host_dir} is not mounted at {host_root}{host_dir}"
        )
    assert set(mounted) == set(inst.HOST_DIRS), "hostPath mounts the installer does not need"

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


def test_both_workloads_run_the_same_image() -> None:
    images = {
        pod_spec(kind, name)["containers"][0]["image"]
        for kind, name in (("DaemonSet", "whereabouts-py"), ("CronJob", "ipam-reconcile"))
    }
    assert len(images) == 1


PLUGIN_RULES = {
    (GROUP, "ippools"): {"get", "list", "create", "update"},
    (GROUP, "overlappingrangeipreservations"): {"get", "create", "update", "delete"},
    (GROUP, "nodeslicepools"): {"get", "create", "update"},  # node_slice_size: claim a slice
}
RECONCILER_RULES = {
    # create + delete: fence a slice pool before returning its slice, remove it after
    (GROUP, "ippools"): {"get", "list", "update", "create", "delete"},
    (GROUP, "overlappingrangeipreservations"): {"get", "list", "create", "delete"},
    (GROUP, "nodeslicepools"): {"get", "list", "update"},
    ("", "pods"): {"list"},
    ("", "nodes"): {"list"},
}


def granted(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


@pytest.mark.parametrize(
    ("account", "rules"),
    [("whereabouts-py", PLUGIN_RULES), ("whereabouts-py-reconciler", RECONCILER_RULES)],
)
def test_cluster_roles_grant_exactly_the_verbs_each_component_uses(
    account: str, rules: dict[tuple[str, str], set[str]]
) -> None:
    assert granted(find("ClusterRole", account)) == rules
    sa = find("ServiceAccount", account)
    assert sa["metadata"]["namespace"] == "kube-system"
    binding = find("ClusterRoleBinding", account)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": account,
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "kube-system"}]


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
    assert "pip install --no-cache-dir ." in text
    # the DaemonSet's command names the installer where the image puts it
    assert "deploy/install.py" in pod_spec("DaemonSet", "whereabouts-py")["containers"][0]["command"][1]
    # the CronJob's command is a console script the package installs
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^ipam-reconcile = "ipam\.reconcile:main"$', pyproject, re.M)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for src in sources:  # nothing the Dockerfile copies is ignored
        assert "!" + src in ignore


# -- (c) install.py against a fake node ----------------------------------------------------------------

CA = b"-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"
FAKE_PYTHON = '#!/bin/sh\necho "args: $*"\necho "ld: $LD_LIBRARY_PATH"\n'


@dataclass
class Node:
    tmp: Path
    host: Path
    sa: Path
    bundle: Path
    ready: Path

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
        return {
            **os.environ,
            "KUBERNETES_SERVICE_HOST": "10.96.0.1",
            "KUBERNETES_SERVICE_PORT": "443",
            "NODENAME": "node-a",
        }

    def at(self, host_path: str) -> Path:
        return self.host / host_path.lstrip("/")

    def kubeconfig(self) -> dict[str, Any]:
        return yaml.safe_load(self.at(inst.KUBECONFIG_PATH).read_text())  # type: ignore[no-any-return]


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Node:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("token-1\n")
    (sa / "ca.crt").write_bytes(CA)
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
    result = Node(tmp_path, host, sa, bundle, tmp_path / "ready")
    for key, value in result.env().items():
        monkeypatch.setenv(key, value)
    return result


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


def test_kubeconfig_holds_server_token_ca_and_namespace(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_inproc(node, capsys)[0] == 0
    path = node.at("/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = node.kubeconfig()
    context = next(c["context"] for c in config["contexts"] if c["name"] == config["current-context"])
    cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
    user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
    assert cluster["server"] == "https://10.96.0.1:443"
    assert base64.b64decode(cluster["certificate-authority-data"]) == CA
    assert user["token"] == "token-1"
    assert context["namespace"] == "kube-system"


def test_ipv6_api_server_address_is_bracketed(
    node: Node, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00:10:96::1")
    assert run_inproc(node, capsys)[0] == 0
    assert node.kubeconfig()["clusters"][0]["cluster"]["server"] == "https://[fd00:10:96::1]:443"


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
    assert configuration.host == "https://10.96.0.1:443"
    bearer = configuration.auth_settings()["BearerToken"]  # what the client puts in its requests
    assert (bearer["in"], bearer["key"], bearer["value"]) == ("header", "authorization", "Bearer token-1")
    assert Path(configuration.ssl_ca_cert).read_bytes() == CA
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


@pytest.fixture
def watcher(node: Node) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, str(INSTALL_PY), *node.argv("--watch", "--interval", "0.1")],
        env=node.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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


def test_watch_rewrites_the_kubeconfig_on_token_rotation_and_stops_on_sigterm(
    node: Node, watcher: subprocess.Popen[str]
) -> None:
    wait_for(node.ready.exists, "first install", watcher)
    assert token_in_kubeconfig(node) == "token-1"

    # The kubelet rotates the projected token by swapping its file.
    new = node.sa / "token.new"
    new.write_text("token-2\n")
    new.replace(node.sa / "token")
    wait_for(lambda: token_in_kubeconfig(node) == "token-2", "kubeconfig rewrite with the new token", watcher)
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
    assert node.at(inst.PLUGIN_PATH).exists()  # stopping leaves the plugin installed


def test_watch_reports_a_vanished_token_keeps_running_and_recovers(
    node: Node, watcher: subprocess.Popen[str]
) -> None:
    wait_for(node.ready.exists, "first install", watcher)
    (node.sa / "token").unlink()
    wait_for(lambda: not node.ready.exists(), "readiness withdrawn", watcher)
    (node.sa / "token").write_text("token-3")
    wait_for(lambda: token_in_kubeconfig(node) == "token-3", "recovery with the new token", watcher)
    wait_for(node.ready.exists, "readiness restored", watcher)
    watcher.send_signal(signal.SIGTERM)
    _, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0
    assert str(node.sa / "token") in err and "Traceback" not in err


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
    for host_dir in (os.path.dirname(DEFAULT_SOCKET), "/var/lib/cni/whereabouts-py", "/etc/cni/net.d/whereabouts.d"):
        assert mounted.get(host_dir) == host_dir
    probe = " ".join(agent["readinessProbe"]["exec"]["command"])
    assert "127.0.0.1:9733/healthz" in probe and command[command.index("--metrics-port") + 1] == "9733"
    assert agent["securityContext"]["privileged"] is False
