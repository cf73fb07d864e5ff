"""make image, for real: the OCI archive deploy/image/build.py writes, its layout against deploy/Dockerfile,
and the node install path run end to end against the real kube-apiserver.

The archive is built once per set of inputs (build.py's cache, keyed by every file it reads), so a
suite run rebuilds it only when the image's inputs changed; a fresh machine builds it (~1.5 min).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.image_node import (
    Image,
    InstallerContainer,
    NodeView,
    build,
    built_image,
    finish,
    layer_names,
    oci,
    read_archive,
    snapshot,
    unpack,
)
from tests.kubeapi.real import RealCluster, RealKube, free_port
from tests.test_deploy import ROOT, inst, kustomize, pod_spec
from tests.test_deploy_apiserver import INSTALLER_SA, rbac_into

DOCKERFILE = ROOT / "deploy" / "Dockerfile"


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    if os.geteuid() != 0:
        pytest.fail("make image needs root (mmdebstrap, chroot): run the suite as root, as CI does")
    return built_image(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def rootfs(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpack(image, tmp_path_factory.mktemp("image") / "root")


# -- the archive -------------------------------------------------------------------------------------------


def test_skopeo_and_podman_load_the_archive_under_its_digest(image: Image, tmp_path: Path) -> None:
    inspect = subprocess.run(
        ["skopeo", "inspect", f"oci-archive:{image.archive}"], capture_output=True, text=True, check=True
    )
    assert json.loads(inspect.stdout)["Digest"] == image.digest
    subprocess.run(  # copying checks every blob against its digest
        ["skopeo", "copy", "--quiet", f"oci-archive:{image.archive}", f"dir:{tmp_path / 'copy'}"], check=True
    )
    runroot = tempfile.mkdtemp(prefix="wpy-podman-")  # podman refuses a runroot path over 50 characters
    podman = ["podman", "--root", str(tmp_path / "storage"), "--runroot", runroot, "--storage-driver", "vfs"]
    loaded = subprocess.run([*podman, "load", "-i", str(image.archive)], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    assert "localhost/whereabouts-py:" + build.version() in loaded.stdout
    listed = subprocess.run(
        [*podman, "images", "--digests", "--format", "{{.Digest}}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert listed.stdout.split() == [image.digest]
    shutil.rmtree(runroot, ignore_errors=True)


def test_the_image_records_its_glibc_and_has_no_base_image(image: Image) -> None:
    manifest, config, _ = read_archive(image.archive)
    assert len(manifest["layers"]) == 1  # type: ignore[arg-type]
    assert config["history"] == [
        {"created": config["created"], "created_by": "deploy/image/build.py (make image)"}
    ]
    names = layer_names(image)
    assert "/usr/local/share/whereabouts-py/glibc.json" in names
    assert not any(name.startswith("/usr/local/lib/python3.11/site-packages/kubernetes/") for name in names)


def dockerfile() -> tuple[str, list[str], str, list[str]]:
    """The Dockerfile's WORKDIR, CMD, its RUN step (joined) and COPY lines."""
    text = DOCKERFILE.read_text()
    workdir = re.findall(r"^WORKDIR (\S+)$", text, re.M)
    (cmd,) = re.findall(r"^CMD (\[.*\])$", text, re.M)
    (run,) = re.findall(r"^RUN ((?:.*\\\n)*.*)$", text, re.M)
    return workdir[-1], json.loads(cmd), run.replace("\\\n", " "), re.findall(r"^COPY (.+)$", text, re.M)


def test_the_image_has_the_dockerfiles_layout(image: Image) -> None:
    """Both recipes: /opt/whereabouts-py is what the Dockerfile's COPY lines bring in, /usr/local is what
    finish.py makes of it in both (its RUN step runs the same script with the same pinned wheels), and
    the image runs the same command from the same directory."""
    workdir, cmd, run, copies = dockerfile()
    _, config, _ = read_archive(image.archive)
    assert config["config"]["WorkingDir"] == workdir == build.APP  # type: ignore[index]
    assert config["config"]["Cmd"] == cmd  # type: ignore[index]
    assert "-r deploy/image/requirements.txt" in run and "--require-hashes" in run
    assert "python3 -I deploy/image/finish.py /tmp/wheels" in run
    names = layer_names(image)
    # COPY SRC... DEST, expanded here without build.py's parser: git's files, less .dockerignore's
    expected = set()
    for line in copies:
        *sources, dest = line.split()
        for source in sources:
            listed = subprocess.run(
                ["git", "-C", str(ROOT), "ls-files", source], capture_output=True, text=True, check=True
            )
            for rel in listed.stdout.split():
                if "__pycache__" not in rel and not rel.endswith(".pyc"):
                    inside = (
                        os.path.relpath(rel, source.rstrip("/"))
                        if source.endswith("/")
                        else os.path.basename(rel)
                    )
                    expected.add(os.path.normpath(os.path.join(workdir, dest, inside)))
    assert {n for n in names if n.startswith(build.APP + "/")} == expected
    local = [n[len("/usr/local/") :] for n in names if n.startswith("/usr/local/")]
    for pattern in finish.LAYOUT["require"]:
        assert any(re.fullmatch(pattern.replace(".", r"\.").replace("*", "[^/]*"), n) for n in local), pattern
    for pattern in finish.LAYOUT["prune"]:
        regex = pattern.replace(".", r"\.").replace("*", "[^/]*") + "(/.*)?"
        assert not [n for n in local if re.fullmatch(regex, n)], pattern


def test_packing_is_reproducible_whatever_the_trees_dates_and_owners(tmp_path: Path) -> None:
    digests = []
    for i, stamp in enumerate((1_000_000_000, 1_600_000_000)):
        tree = tmp_path / f"t{i}"
        (tree / "usr" / "bin").mkdir(parents=True)
        for name in ("b", "a", "c"):  # created in another order each time
            (tree / "usr" / "bin" / (name if i else name[::-1])).write_text(name)
        (tree / "usr" / "link").symlink_to("bin/a")
        for path in tree.rglob("*"):
            os.utime(path, (stamp, stamp), follow_symlinks=False)
        digests.append(oci.pack(str(tree), str(tmp_path / f"{i}.tar"), 1_700_000_000, "x:1", {"Cmd": ["a"]}))
    assert digests[0] == digests[1]
    assert (tmp_path / "0.tar").read_bytes() == (tmp_path / "1.tar").read_bytes()


def test_readmes_image_rename_then_kubectl_apply_passes_a_server_side_dry_run(
    apiserver: RealCluster, tmp_path: Path
) -> None:
    """docs/operating.md, Install: the sed line that names the pushed image, run on a copy of deploy/, then
    `kubectl apply -k deploy/base` (rendered by kubectl's kustomize, applied as a server-side dry run)."""
    readme = (ROOT / "docs" / "operating.md").read_text()
    install = readme[readme.index("### Install") : readme.index("### Other distributions")]
    (sed,) = re.findall(r"^(sed -i .*\\\n\s+.*)$", install, re.M)
    copy = tmp_path / "deploy"
    shutil.copytree(ROOT / "deploy", copy)
    command = sed.replace("\\\n", " ").replace("REGISTRY", "registry.test:5000")
    subprocess.run(["sh", "-c", command], cwd=tmp_path, check=True)
    objects = kustomize(copy / "base")
    workloads = [o for o in objects if o["kind"] in ("DaemonSet", "CronJob", "Deployment")]
    assert sorted(o["kind"] for o in workloads) == ["CronJob", "DaemonSet", "Deployment"]
    images = {c["image"] for o in workloads for c in containers(o)}
    assert images == {f"registry.test:5000/whereabouts-py:{build.version()}"}
    answers = apiserver.apply(objects, dry_run=True)
    assert [a["metadata"]["name"] for a in answers] == [o["metadata"]["name"] for o in objects]


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = (
        obj["spec"]["template"]["spec"]
        if obj["kind"] in ("DaemonSet", "Deployment")
        else obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    )
    return list(spec["containers"])


# -- the node path, against the real API server ---------------------------------------------------------


def daemonset_install() -> tuple[list[str], list[str]]:
    container = pod_spec("DaemonSet", "whereabouts-py")["containers"][0]
    return container["command"], container["args"]


class Node:
    """A scratch host, the installer's identity on the real server, and runs of the image's installer."""

    def __init__(self, kube: RealKube, tmp: Path) -> None:
        self.kube, self.tmp = kube, tmp
        ns = kube.namespace
        kube.apply(rbac_into(ns))
        pod = kube.request("POST", f"/api/v1/namespaces/{ns}/pods", {
            "metadata": {"name": "whereabouts-py-install"},
            "spec": {"serviceAccountName": INSTALLER_SA, "nodeName": "node-a", "containers": [{"name": "c", "image": "x"}]},
        })  # fmt: skip
        self.sa = tmp / "sa"
        self.sa.mkdir()
        (self.sa / "token").write_text(kube.cluster.token(INSTALLER_SA, ns, 3600, bound_pod=pod))
        (self.sa / "ca.crt").write_bytes((kube.cluster.certs / "ca.crt").read_bytes())
        (self.sa / "namespace").write_text(ns)
        self.host = tmp / "host"
        self.host.mkdir()
        loader = self.host / "lib64" / "ld-linux-x86-64.so.2"  # what the DaemonSet's node-loader mounts
        loader.parent.mkdir()
        shutil.copyfile(os.path.realpath("/lib64/ld-linux-x86-64.so.2"), loader)
        self.runs = 0

    def installer(self, rootfs: Path, watch: bool = True) -> InstallerContainer:
        command, args = daemonset_install()
        if not watch:
            args = [a for a in args if a != "--watch"]
        self.runs += 1
        pod_tmp = self.tmp / f"pod-tmp-{self.runs}"
        pod_tmp.mkdir()
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",  # the image's
            "NODENAME": "node-a",
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": self.kube.url.rsplit(":", 1)[1],
        }
        return InstallerContainer(rootfs, self.host, self.sa, pod_tmp, command + args, env)

    def install_once(self, rootfs: Path) -> str:
        code, out = self.installer(rootfs, watch=False).wait()
        assert code == 0, out
        return out

    def bundles(self) -> set[str]:
        return {
            p.name for p in (self.host / "opt/cni/whereabouts-py").iterdir() if p.name.startswith("bundle-")
        }


@pytest.fixture
def node(real_kube: RealKube, tmp_path: Path) -> Node:
    return Node(real_kube, tmp_path)


def cni(view: NodeView, command: str, conf: dict[str, Any], **extra: str) -> subprocess.CompletedProcess[str]:
    """One CNI call as the runtime makes it: the wrapper at its host path, a clean environment."""
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c-web-0",
        "CNI_NETNS": "/var/run/netns/c-web-0",
        "CNI_IFNAME": "net1",
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=apps;K8S_POD_NAME=web-0",
        **extra,
    }
    return view.run([inst.PLUGIN_PATH], env, json.dumps(conf))


def agent_requests(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        m[0]: float(m[1])
        for m in re.findall(
            r'^whereabouts_py_requests_total\{command="(\w+)",result="ok"\} (\S+)$', text, re.M
        )
    }


def wait_for_socket(view: NodeView, agent: subprocess.Popen[str], port: int) -> None:
    for _ in range(400):  # bounded: 400 x 50 ms
        if agent.poll() is not None:
            raise AssertionError(f"the agent exited: {agent.communicate()}")
        try:
            agent_requests(port)
            return
        except OSError:
            subprocess.run(["sleep", "0.05"], check=True)
    raise AssertionError("the agent never served /metrics")


def calls(view: NodeView, kube: RealKube, conf: dict[str, Any], **env: str) -> str:
    """VERSION, ADD, CHECK, DEL through the wrapper; the address ADD handed out."""
    version = cni(view, "VERSION", {"cniVersion": "1.0.0"}, **env)
    assert version.returncode == 0, version.stderr
    assert "1.0.0" in json.loads(version.stdout)["supportedVersions"]
    added = cni(view, "ADD", conf, **env)
    assert added.returncode == 0, added.stdout + added.stderr
    address = json.loads(added.stdout)["ips"][0]["address"]
    leased = [
        a
        for pool in kube.api.objects("ippools", kube.namespace)
        for a in pool["spec"].get("allocations", {}).values()
    ]
    assert [a["podref"] for a in leased] == ["apps/web-0"], leased
    checked = cni(view, "CHECK", {**conf, "prevResult": json.loads(added.stdout)}, **env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    deleted = cni(view, "DEL", conf, **env)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert not [
        a
        for pool in kube.api.objects("ippools", kube.namespace)
        for a in pool["spec"].get("allocations", {}).values()
    ]
    return str(address)


def test_the_images_installer_sets_up_a_node_whose_wrapper_serves_cni_calls_on_the_real_api_server(
    rootfs: Path, node: Node, real_kube: RealKube, tmp_path: Path
) -> None:
    """The DaemonSet's installer from the unpacked image (read-only root, own namespaces, the scratch
    host at /host, its ServiceAccount token) installs the bundle, wrapper, kubeconfig and flat file; this
    machine then execs the wrapper, with the node agent started from the installed bundle and without it."""
    container = node.installer(rootfs)
    container.wait_ready()
    out = container.stop()
    assert container.proc.returncode == 0, out
    assert "minted a token for ServiceAccount" in out and "installed on node node-a" in out
    conf = {
        "cniVersion": "1.0.0",
        "name": "n",
        "type": "ipvlan",
        "ipam": {"type": "whereabouts-py", "range": "192.0.2.0/28"},
    }
    real_kube.api.put_pod("apps", "web-0")
    view = NodeView(node.host, tmp_path)
    port = free_port()
    bundle = inst.BUNDLE_LINK
    agent = subprocess.Popen(
        view.argv("/usr/bin/env", "-i", f"LD_LIBRARY_PATH={bundle}/lib", "NODENAME=node-a",
                  f"{bundle}/bin/python3", "-I", f"{bundle}/bin/ipam-agent", "--metrics-port", str(port)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_for_socket(view, agent, port)
        assert calls(view, real_kube, conf).startswith("192.0.2.")
        assert agent_requests(port) == {"ADD": 1, "CHECK": 1, "DEL": 1}  # each call went through the agent
        agent.terminate()
        agent.communicate(timeout=30)
        assert calls(view, real_kube, conf, WHEREABOUTS_PY_AGENT_WAIT="0").startswith(
            "192.0.2."
        )  # direct mode
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.communicate()
        view.close()
    log = (node.host / "var/log/whereabouts-py.log").read_text()  # the flat file's log_file, at its host path
    assert '"command":"ADD"' in log and '"command":"DEL"' in log


def test_reinstalling_changes_nothing_and_a_new_image_replaces_current_and_prunes(
    rootfs: Path, node: Node, tmp_path: Path
) -> None:
    node.install_once(rootfs)
    written = ["opt/cni/bin", "opt/cni/whereabouts-py", "etc/cni/net.d/whereabouts.d"]
    before = {d: snapshot(node.host / d) for d in written}
    out = node.install_once(rootfs)
    assert {d: snapshot(node.host / d) for d in written} == before, out
    assert "wrote" not in out and "installed bundle" not in out
    (first,) = node.bundles()
    # newer images: the same tree with one file more each (a new bundle stamp)
    newer = []
    for i in (2, 3):
        tree = tmp_path / f"image-{i}"
        subprocess.run(["cp", "-a", str(rootfs), str(tree)], check=True)
        (tree / "usr/local/lib" / f"release-{i}").write_text(str(i))
        node.install_once(tree)
        current = os.readlink(node.host / "opt/cni/whereabouts-py/current")
        newer.append(current)
        assert (node.host / "opt/cni/whereabouts-py" / current / "lib" / f"release-{i}").exists()
    assert node.bundles() == set(newer)  # the previous one kept, the one before it removed
    assert first not in newer and len(set(newer)) == 2
    assert os.readlink(node.host / "opt/cni/whereabouts-py/current") == newer[-1]


def test_the_images_installer_refuses_a_node_with_an_older_glibc(rootfs: Path, node: Node) -> None:
    record = json.loads((rootfs / "usr/local/share/whereabouts-py/glibc.json").read_text())
    assert record == {
        "glibc": os.confstr("CS_GNU_LIBC_VERSION").split()[1],
        "loader": "/lib64/ld-linux-x86-64.so.2",
    }
    loader = node.host / "lib64/ld-linux-x86-64.so.2"
    major, minor = record["glibc"].split(".")
    older = f"{major}.{int(minor) - 1}"
    loader.write_bytes(
        loader.read_bytes().replace(
            f"release version {record['glibc']}.".encode(), f"release version {older}.".encode()
        )
    )
    code, out = node.installer(rootfs, watch=False).wait()
    assert code == 1
    assert (
        f"the node's glibc is {older}, older than {record['glibc']}, the glibc this image was built against"
        in out
    )
    assert "Traceback" not in out
    assert not (node.host / "opt/cni/bin/whereabouts-py").exists()


def in_image(rootfs: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """`argv` run in the unpacked image (read-only root, its own mount namespace), as its containers run."""
    r = shlex.quote(str(rootfs))
    setup = f"mount --bind {r} {r} && mount -o remount,bind,ro {r}"
    command = (
        f"{setup} && exec chroot {r} /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin {shlex.join(argv)}"
    )
    return subprocess.run(
        ["unshare", "--mount", "--fork", "--", "sh", "-c", command], capture_output=True, text=True
    )


def test_the_image_runs_ipam_controller_with_its_webhook_and_leader_election(rootfs: Path) -> None:
    ran = in_image(rootfs, "ipam-controller", "--help")
    assert ran.returncode == 0, ran.stderr
    assert "--webhook-bind-address" in ran.stdout and "--leader-elect" in ran.stdout
    # what it loads on demand, from the image's own interpreter
    code = (
        "import ipam.webhook_certs, ipam.webhook, kubernetes.client;"
        "from kubernetes.leaderelection.resourcelock import leaselock;"
        "from ipam.controller.leader import configure_client;"
        "print(ipam.webhook_certs.make_certificates(['x']).cert[:27].decode())"
    )
    ran = in_image(rootfs, "python3", "-I", "-c", code)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "-----BEGIN CERTIFICATE-----"


def test_the_controllers_packages_stay_in_the_image(rootfs: Path, node: Node) -> None:
    """The nodes get /usr/local without ipam-controller's dependencies (kubernetes, cryptography, ...):
    the CNI path, the agent and the installer never import them."""
    import nodebundle  # deploy/nodebundle.py, on sys.path since tests.test_deploy loaded install.py

    assert nodebundle.NOT_FOR_NODES == (finish.CONTROLLER_SITE,)
    assert (rootfs / "usr/local" / finish.CONTROLLER_SITE / "kubernetes").is_dir()
    node.install_once(rootfs)
    current = node.host / "opt/cni/whereabouts-py/current"
    assert (current / "bin/python3").exists()
    assert not (current / finish.CONTROLLER_SITE).exists()
    assert not list(current.glob("lib/python3*/site-packages/kubernetes"))
    assert not list(current.glob("lib/python3*/site-packages/cryptography"))
