"""Fixtures for the end-to-end suite: preflight, the CNI_PATH directory, and a runtime per test."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import runtime as rt
from tests.kubeapi.fixtures import K8s

CNI_VERSIONS = ["0.3.1", "0.4.0", "1.0.0"]


@pytest.fixture(scope="session", autouse=True)
def e2e_preflight() -> Iterator[None]:
    """Fail (never skip) when the machine cannot run the suite; sweep namespaces of dead runs."""
    missing = rt.tools_missing()
    if missing:
        pytest.fail(
            "the e2e suite needs: " + "; ".join(missing) + ". Run it as root with iproute2 and "
            "containernetworking-plugins installed (`.ci/run` installs them).",
            pytrace=False,
        )
    version = subprocess.run(
        [str(rt.OUR_PLUGIN)],
        input='{"cniVersion": "1.0.0"}',
        env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if version.returncode != 0 or "supportedVersions" not in version.stdout:
        pytest.fail(
            f"{rt.OUR_PLUGIN} VERSION failed (exit {version.returncode}): "
            f"stdout={version.stdout!r} stderr={version.stderr!r}",
            pytrace=False,
        )
    rt.sweep_stale_netns()
    yield
    rt.sweep_own_netns()


@pytest.fixture(scope="session")
def cni_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return rt.make_cni_bin_dir(tmp_path_factory.mktemp("cni-bin") / "bin")


@pytest.fixture
def runtime(cni_bin: Path) -> Iterator[rt.Runtime]:
    """A node netns of its own per test; every attachment DEL'd and every netns deleted afterwards."""
    runtime = rt.Runtime(cni_bin)
    try:
        yield runtime
    finally:
        failures = runtime.cleanup()
    if failures:
        pytest.fail("DEL during teardown failed:\n" + "\n\n".join(failures), pytrace=False)


@pytest.fixture(params=CNI_VERSIONS)
def cni_version(request: pytest.FixtureRequest) -> str:
    version: str = request.param
    return version


_kernel_support: dict[str, str | None] = {}


def require_kernel_link(kind: str) -> None:
    """Fail with a clear message when the kernel cannot make `kind` links (e.g. CONFIG_IPVLAN unset)."""
    if kind not in _kernel_support:
        _kernel_support[kind] = rt.kernel_supports(kind)
    error = _kernel_support[kind]
    if error is not None:
        pytest.fail(
            f"this kernel cannot create {kind} links (`ip link add ... type {kind}`: {error}); "
            f"the {kind} plugin cannot work here. Run the suite on a kernel with {kind} support "
            f"(CONFIG_{kind.upper()}).",
            pytrace=False,
        )


IpamFactory = Callable[..., dict[str, Any]]


@dataclass
class Backend:
    """Where leases live for a test: the ipam keys that select the datastore, and how to read it back."""

    name: str
    keys: dict[str, Any]
    read: Callable[[], rt.StoreView]


@pytest.fixture
def backend(request: pytest.FixtureRequest, runtime: rt.Runtime, tmp_path: Path) -> Backend:
    """The file datastore by default; parametrise indirectly with "kubernetes" for IPPool objects in
    the Kubernetes API test server, or "apiserver" for the real kube-apiserver (the plugin then uses
    its own ServiceAccount from deploy/rbac.yaml), reached from the node netns through a loopback
    forwarder."""
    name = getattr(request, "param", "file")
    data_dir = tmp_path / "ipam-data"
    if name == "file":
        return Backend(
            name, {"datastore": "file", "data_dir": str(data_dir)}, lambda: rt.read_store(data_dir)
        )
    if name not in ("kubernetes", "apiserver"):
        raise ValueError(f"unknown backend {name!r}")
    kube: K8s = request.getfixturevalue("kube" if name == "kubernetes" else "real_kube")
    forwarder = rt.LoopbackForwarder(runtime.node, int(kube.url.rsplit(":", 1)[1]))
    runtime.after_dels.append(forwarder.close)  # the teardown DELs still need the API server

    def read() -> rt.StoreView:
        def named(plural: str) -> dict[str, dict[str, Any]]:
            return {o["metadata"]["name"]: o for o in kube.api.objects(plural, kube.namespace)}

        return rt.StoreView(named("ippools"), named("overlappingrangeipreservations"))

    keys = {
        "datastore": "kubernetes",
        "kubernetes": {"kubeconfig": kube.plugin_kubeconfig()},
        "data_dir": str(data_dir),  # the node-local lock directory
    }
    return Backend(name, keys, read)


@pytest.fixture
def ipam(backend: Backend, tmp_path: Path) -> IpamFactory:
    """Build an ipam block for our plugin on this test's datastore."""

    def make(cidr: str | None = None, **extra: Any) -> dict[str, Any]:
        block: dict[str, Any] = {"type": rt.OUR_TYPE}
        if cidr is not None:
            block["range"] = cidr
        block.update(backend.keys, log_file=str(tmp_path / "ipam.log"), **extra)
        return block

    return make


@pytest.fixture
def store(backend: Backend) -> Callable[[], rt.StoreView]:
    """Read the datastore back: pools (spec.allocations) and overlapping-range reservations."""
    return backend.read


@pytest.fixture
def ipam_log(tmp_path: Path) -> Callable[[], str]:
    """The plugin's log file, for failure messages."""

    def read() -> str:
        path = tmp_path / "ipam.log"
        return path.read_text()[-4000:] if path.exists() else "(no ipam.log)"

    return read


def dumps(doc: Any) -> str:
    return json.dumps(doc, indent=1, sort_keys=True)
