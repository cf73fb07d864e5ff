"""pytest fixtures: one API test server per session, reset before each test that asks for `kube`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .server import APIServer, KubeAPI, write_kubeconfig


@dataclass
class KubeHandle:
    url: str
    kubeconfig_path: str
    api: KubeAPI
    server: APIServer

    def reset(self) -> None:
        self.api.reset()
        self.api.use_crds(sorted((Path(__file__).resolve().parents[2] / "crds").glob("*.yaml")))


@pytest.fixture(scope="session")
def kube_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeHandle]:
    api = KubeAPI()
    server = APIServer(api).start()
    kubeconfig = write_kubeconfig(tmp_path_factory.mktemp("kube") / "kubeconfig", server.url)
    yield KubeHandle(server.url, str(kubeconfig), api, server)
    server.stop()


@pytest.fixture
def kube(kube_server: KubeHandle) -> Iterator[KubeHandle]:
    kube_server.reset()
    yield kube_server
    kube_server.api.clear_faults()
