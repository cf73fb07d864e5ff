"""ipam-controller serves the admission webhook (--webhook-bind-address): the controller process, as its
own ServiceAccount with deploy/base's RBAC, makes and stores its certificate, writes the caBundle, and the
real kube-apiserver calls it: a bad NAD is refused with the ADD's message, a good one admitted, a node-only
key admitted only with --webhook-allow-node-only-keys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipam import webhook_certs as certs
from tests.kubeapi.real import RealKube, free_port
from tests.test_webhook import GOOD, at_add, nad_config
from tests.test_webhook_real import (
    DENIED,
    _refuses,
    as_test_config,
    install_webhook_setup,
    message,
    poll,
    refused,
)

pytestmark = pytest.mark.apiserver

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"


def nads(ns: str) -> str:
    return f"/apis/k8s.cni.cncf.io/v1/namespaces/{ns}/network-attachment-definitions"


def create_nad(kube: RealKube, name: str, config: dict[str, Any], dry_run: bool = False) -> Any:
    body = {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": name}, "spec": {"config": json.dumps(config)}}  # fmt: skip
    return kube.request("POST", nads(kube.namespace), body, {"dryRun": "All"} if dry_run else None)


@pytest.fixture
def webhook_rbac(real_kube: RealKube) -> Iterator[str]:
    """deploy/base/webhook.yaml's Secret and RBAC in the test's namespace, and its configuration
    pointed at 127.0.0.1:<port>; yields the port."""
    ns = real_kube.namespace
    shipped, config = install_webhook_setup(real_kube)
    real_kube.apply_rbac()  # deploy/base/rbac.yaml: the controller's ServiceAccount
    port = free_port()
    real_kube.request("POST", CONFIGS, as_test_config(shipped, ns, port))
    try:
        yield str(port)
    finally:
        real_kube.request("DELETE", f"{CONFIGS}/{config}")


@pytest.fixture
def controller_process(real_kube: RealKube, webhook_rbac: str, tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*extra: str) -> subprocess.Popen[bytes]:
        ns = real_kube.namespace
        argv = [
            sys.executable, "-c", "import sys; from ipam.controller.main import main; sys.exit(main())",
            "--kubeconfig", real_kube.identity_kubeconfig("controller"), "--namespace", ns,
            "--metrics-bind-address", "0", "--health-probe-bind-address", "0",
            "--webhook-bind-address", f"127.0.0.1:{webhook_rbac}",
            "--webhook-cert-dir", str(tmp_path / f"certs-{len(procs)}"),
            "--webhook-cert-names", "localhost,127.0.0.1", "--webhook-config", f"whereabouts-py-{ns}",
            *extra,
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv, cwd=ROOT, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            assert proc.stderr is not None
            proc.stderr.close()


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=20)


def test_the_running_controller_refuses_a_bad_nad_and_admits_a_good_one(
    real_kube: RealKube, controller_process: Any, tmp_path: Path
) -> None:
    proc = controller_process()
    bad = nad_config({"type": "whereabouts-py", "range": "10.20.0.0/33"})
    poll(lambda: proc.poll() is None and _refuses(lambda: create_nad(real_kube, "probe", bad, dry_run=True)),
         "the API server calling the controller's webhook")  # fmt: skip
    exc = refused(lambda: create_nad(real_kube, "bad", bad))
    assert exc.status == 422
    assert message(exc) == DENIED.format("nads.whereabouts-py.cni.cncf.io") + str(at_add(bad, tmp_path))
    assert create_nad(real_kube, "good", nad_config(GOOD))["metadata"]["name"] == "good"
    node_only = nad_config({**GOOD, "data_dir": "/tmp/elsewhere"})
    assert "is a node setting" in message(refused(lambda: create_nad(real_kube, "node-only", node_only)))

    # the certificate it served is the one it stored, and the caBundle names its CA
    ns = real_kube.namespace
    secret = real_kube.request("GET", f"/api/v1/namespaces/{ns}/secrets/{certs.SECRET_NAME}")
    assert set(secret["data"]) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    hooks = real_kube.request("GET", f"{CONFIGS}/whereabouts-py-{ns}")["webhooks"]
    assert {h["clientConfig"]["caBundle"] for h in hooks} == {secret["data"]["ca.crt"]}

    assert stop(proc) == 0  # SIGTERM: the webhook and the watches stop, exit 0
    # ... and nothing judges NADs any more (failurePolicy Ignore admits)
    assert create_nad(real_kube, "unjudged", bad)["metadata"]["name"] == "unjudged"


def test_allow_node_only_keys_admits_them_and_a_second_replica_uses_the_stored_certificate(
    real_kube: RealKube, controller_process: Any
) -> None:
    first = controller_process()
    node_only = nad_config({**GOOD, "data_dir": "/tmp/elsewhere"})
    poll(lambda: first.poll() is None and _refuses(lambda: create_nad(real_kube, "p", node_only, dry_run=True)),
         "the API server calling the controller's webhook")  # fmt: skip
    ns = real_kube.namespace
    stored = real_kube.request("GET", f"/api/v1/namespaces/{ns}/secrets/{certs.SECRET_NAME}")["data"]
    assert stop(first) == 0
    second = controller_process("--webhook-allow-node-only-keys")
    bad = nad_config({"type": "whereabouts-py", "range": "10.20.0.0/33"})
    poll(lambda: second.poll() is None and _refuses(lambda: create_nad(real_kube, "bad", bad, dry_run=True)),
         "the second controller's webhook")  # fmt: skip
    assert create_nad(real_kube, "node-only", node_only)["metadata"]["name"] == "node-only"
    assert real_kube.request("GET", f"/api/v1/namespaces/{ns}/secrets/{certs.SECRET_NAME}")["data"] == stored


def test_without_its_secret_the_controller_says_so_and_exits(
    real_kube: RealKube, controller_process: Any
) -> None:
    real_kube.request("DELETE", f"/api/v1/namespaces/{real_kube.namespace}/secrets/{certs.SECRET_NAME}")
    proc = controller_process()
    assert proc.wait(timeout=60) == 1
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    assert "--webhook-bind-address: cannot read Secret" in err and "Traceback" not in err
