"""pytest fixtures: one API test server per session, reset before each test that asks for `kube`.

from tests.kubeapi.fixtures import kube, kube_server  # noqa: F401   (in conftest.py)

def test_something(kube):
    kube.kubeconfig_path            # an ordinary kubeconfig: token user, context namespace kube-system
    kube.api.set_faults(seed=1, error_rate=0.2)
    kube.api.put_pod("apps", "web-0", uid="u1")
    kube.api.objects("ippools", "kube-system")
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .real import ASSETS_ENV, RealCluster, RealKube, assets_dir
from .server import APIServer, KubeAPI, write_kubeconfig


@dataclass
class KubeHandle:
    url: str
    kubeconfig_path: str  # context namespace: kube-system
    api: KubeAPI  # the store: faults, counters, pods, objects, CRDs
    server: APIServer  # the HTTP server (api is also server.api)
    tmp_dir: Path
    kind: str = "testserver"  # the `k8s` fixture's parameter: which server this is
    namespace: str = "kube-system"  # where pools live (the kubeconfig's context namespace)

    def plugin_kubeconfig(self) -> str:
        """The test server does no authorisation: one kubeconfig serves every component."""
        return self.kubeconfig_path

    def reconciler_kubeconfig(self) -> str:
        return self.kubeconfig_path

    def reset(self) -> None:
        """Clear objects, faults and counters and serve our own CRDs from crds/ again."""
        self.api.reset()
        self.api.use_crds(None)

    def kubeconfig(self, namespace: str | None = "kube-system", name: str | None = None) -> str:
        """Another kubeconfig for the same server, with a different context namespace (None: none)."""
        path = self.tmp_dir / (name or f"kubeconfig-{namespace or 'none'}")
        return str(write_kubeconfig(path, self.url, namespace=namespace))


@pytest.fixture(scope="session")
def kube_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeHandle]:
    api = KubeAPI()
    server = APIServer(api).start()
    tmp_dir = tmp_path_factory.mktemp("kube")
    kubeconfig = write_kubeconfig(tmp_dir / "kubeconfig", server.url)
    yield KubeHandle(server.url, str(kubeconfig), api, server, tmp_dir)
    server.stop()


@pytest.fixture
def kube(kube_server: KubeHandle) -> Iterator[KubeHandle]:
    kube_server.reset()
    yield kube_server
    kube_server.api.clear_faults()


# -- the real kube-apiserver (tests/kubeapi/real.py) ----------------------------------------------


def running_cluster(work: Path) -> Iterator[RealCluster]:
    """A started etcd + kube-apiserver from $KUBEBUILDER_ASSETS in `work`, stopped when the generator
    closes; the test fails (never skips) when the variable is unset."""
    assets = assets_dir()
    if assets is None:
        pytest.fail(f"{ASSETS_ENV} is not set: the real-API tier cannot run (make test-apiserver needs it)")
    cluster = RealCluster(assets, work)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    """etcd + kube-apiserver, once per session; tests using it are marked `apiserver` and deselected
    (with one line saying so) when $KUBEBUILDER_ASSETS is unset."""
    yield from running_cluster(tmp_path_factory.mktemp("apiserver"))


@pytest.fixture
def real_kube(apiserver: RealCluster, tmp_path: Path) -> RealKube:
    """A fresh namespace on the real server and an admin kubeconfig whose context names it."""
    return RealKube(apiserver, f"t-{uuid.uuid4().hex[:10]}", tmp_path)


# -- both servers ----------------------------------------------------------------------------------

K8s = KubeHandle | RealKube
"""What a test parametrised over both servers gets: `kind`, `namespace` (pools and, by convention,
the test's pods), `url`, `kubeconfig_path` (admin), `kubeconfig(...)`, `plugin_kubeconfig()` and
`reconciler_kubeconfig()` (on the real server: the components' own ServiceAccounts from
deploy/rbac.yaml), and `api.objects/put_pod/delete_pod`. Fault injection and request counts exist
only on the test server: those tests take `kube`."""


@pytest.fixture(params=["testserver", pytest.param("apiserver", marks=pytest.mark.apiserver)])
def k8s(request: pytest.FixtureRequest) -> K8s:
    """The same test on the Python API test server and on the real kube-apiserver + etcd."""
    handle: K8s = request.getfixturevalue("kube" if request.param == "testserver" else "real_kube")
    return handle
