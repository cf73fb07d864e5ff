"""The admission webhook registered with the real kube-apiserver: deploy/base/webhook.yaml's
configuration (a `url` clientConfig on 127.0.0.1 instead of the Service, limited to the test's
namespace), its certificate made and stored, and its caBundle written, with the controller's own
identity and RBAC from the same file. The API server itself calls the webhook and refuses or admits."""

from __future__ import annotations

import base64
import copy
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from ipam import webhook_certs as certs
from ipam.store.kubeclient import KubeClient, load_kubeconfig
from ipam.webhook import ALLOW_DELETE_ANNOTATION, Policy, WebhookServer, project_identities, serve_webhook
from tests.kubeapi.real import ApiError, RealKube, load_yaml, rebase_rbac
from tests.test_webhook import BAD, GOOD, at_add, nad_config

pytestmark = pytest.mark.apiserver

ROOT = Path(__file__).resolve().parent.parent
WEBHOOK_YAML = ROOT / "deploy" / "base" / "webhook.yaml"
NAD_CRD = ROOT / "tests" / "third_party" / "multus-nad-crd.yaml"
CONTROLLER_SA = "whereabouts-py-controller"
RECONCILER_SA = "whereabouts-py-reconciler"
DENIED = 'admission webhook "{}" denied the request: '


def install_crds(real_kube: RealKube, *paths: Path) -> None:
    """Third-party CRDs, once per API server (tests/third_party/)."""
    for path in paths:
        for doc in load_yaml(path):
            try:
                real_kube.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", doc)
            except ApiError as exc:
                if exc.status != 409:
                    raise
            real_kube.cluster.wait_established(doc["metadata"]["name"])


def poll(check: Any, what: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"not seen within {timeout:.0f} s: {what}")


def as_test_config(doc: dict[str, Any], ns: str, port: int) -> dict[str, Any]:
    """The shipped configuration, pointed at the test's server and confined to the test's namespace
    (the API server is shared by the whole session)."""
    doc = copy.deepcopy(doc)
    doc["metadata"]["name"] = f"whereabouts-py-{ns}"
    for hook in doc["webhooks"]:
        hook["clientConfig"] = {"url": f"https://127.0.0.1:{port}/validate"}
        hook["namespaceSelector"] = {"matchLabels": {"kubernetes.io/metadata.name": ns}}
        for cond in hook.get("matchConditions", []):
            cond["expression"] = cond["expression"].replace(":kube-system:", f":{ns}:")
    return doc


@dataclass
class Registered:
    kube: RealKube
    config: str
    server: WebhookServer
    controller: KubeClient

    @property
    def ns(self) -> str:
        return self.kube.namespace

    def nads(self) -> str:
        return f"/apis/k8s.cni.cncf.io/v1/namespaces/{self.ns}/network-attachment-definitions"

    def pools(self) -> str:
        return f"/apis/whereabouts.cni.cncf.io/v1alpha1/namespaces/{self.ns}/ippools"

    def nad(self, name: str, config: dict[str, Any], dry_run: bool = False) -> Any:
        body = {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
                "metadata": {"name": name}, "spec": {"config": json.dumps(config)}}  # fmt: skip
        return self.kube.request("POST", self.nads(), body, {"dryRun": "All"} if dry_run else None)

    def pool(self, name: str, allocations: dict[str, Any], annotations: dict[str, str] | None = None) -> None:
        self.kube.request("POST", self.pools(), {
            "apiVersion": "whereabouts.cni.cncf.io/v1alpha1", "kind": "IPPool",
            "metadata": {"name": name, "annotations": annotations or {}},
            "spec": {"range": "10.20.0.0/24", "allocations": allocations}})  # fmt: skip


def refused(call: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value


def message(exc: ApiError) -> str:
    return str(exc.body.get("message")) if isinstance(exc.body, dict) else str(exc.body)


def install_webhook_setup(real_kube: RealKube) -> tuple[dict[str, Any], str]:
    """The NAD CRD, and deploy/base/webhook.yaml's Secret and RBAC in the test's namespace with its
    rights renamed to the test's own configuration; returns the shipped configuration (not created)
    and that configuration's name."""
    install_crds(real_kube, NAD_CRD)
    ns = real_kube.namespace
    docs = load_yaml(WEBHOOK_YAML)
    (shipped,) = [d for d in docs if d["kind"] == "ValidatingWebhookConfiguration"]
    config = f"whereabouts-py-{ns}"
    setup, _ = rebase_rbac([d for d in docs if d is not shipped], ns, ns, real_kube.cluster)
    for doc in setup:
        for rule in doc.get("rules", []):
            if rule.get("resourceNames") == ["whereabouts-py"]:
                rule["resourceNames"] = [config]
    real_kube.cluster.apply(setup)
    return shipped, config


@pytest.fixture
def registered(real_kube: RealKube, tmp_path: Path) -> Iterator[Registered]:
    ns = real_kube.namespace
    shipped, config = install_webhook_setup(real_kube)
    assert real_kube.apply_rbac()["controller"] == CONTROLLER_SA  # deploy/base/rbac.yaml makes the account
    controller = KubeClient(load_kubeconfig(real_kube.token_kubeconfig(CONTROLLER_SA, ns)))

    # what the controller does at start, with its own identity
    keeper = certs.CertKeeper(
        controller, ns, str(tmp_path), ips=("127.0.0.1",), hosts=("localhost",), config=config
    )
    made = certs.ensure_secret(controller, ns, keeper.names(), keeper.ips)
    server = serve_webhook(
        "127.0.0.1:0", *certs.write_files(made, str(tmp_path)), Policy(trusted_users=project_identities(ns))
    )
    real_kube.request("POST", "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations",
                      as_test_config(shipped, ns, server.port))  # fmt: skip
    reg = Registered(real_kube, config, server, controller)
    try:
        assert keeper.refresh() is True  # the Secret's certificate, and the caBundle written
        assert keeper.current == made and keeper.refresh() is False
        bad = nad_config(BAD[0])
        poll(
            lambda: _refuses(lambda: reg.nad("probe", bad, dry_run=True)),
            "the API server calling the webhook",
        )
        yield reg
    finally:
        server.stop()
        controller.close()
        real_kube.request(
            "DELETE", f"/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/{config}"
        )


def _refuses(call: Any) -> bool:
    try:
        call()
    except ApiError:
        return True
    return False


def test_the_controllers_identity_kept_the_secret_and_the_ca_bundle(registered: Registered) -> None:
    ns = registered.ns
    secret = registered.kube.request("GET", f"/api/v1/namespaces/{ns}/secrets/{certs.SECRET_NAME}")
    stored = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert set(stored) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    config = registered.kube.request(
        "GET", f"/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/{registered.config}"
    )
    assert {base64.b64decode(h["clientConfig"]["caBundle"]) for h in config["webhooks"]} == {stored["ca.crt"]}
    # a second start changes nothing; and the rights go no further than those two objects
    assert (
        certs.ensure_secret(registered.controller, ns, ["localhost"], ("127.0.0.1",)).cert
        == stored["tls.crt"]
    )
    for method, path in (
        ("GET", f"/api/v1/namespaces/{ns}/secrets"),
        ("GET", "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/other"),
        ("POST", f"/api/v1/namespaces/{ns}/secrets"),
    ):
        with pytest.raises(Exception) as caught:
            registered.controller.request(
                method, path, {"metadata": {"name": "x"}} if method == "POST" else None
            )
        assert getattr(caught.value, "status", None) == 403


def test_the_api_server_refuses_bad_nads_with_the_adds_message_and_admits_a_good_one(
    registered: Registered, tmp_path: Path
) -> None:
    hook = DENIED.format("nads.whereabouts-py.cni.cncf.io")
    bad = nad_config({"type": "whereabouts-py", "range": "10.20.0.0/33"})
    exc = refused(lambda: registered.nad("bad", bad))
    assert exc.status == 422
    assert message(exc) == hook + str(at_add(bad, tmp_path))

    node_only = nad_config({**GOOD, "data_dir": "/tmp/elsewhere"})
    exc = refused(lambda: registered.nad("node-only", node_only))
    assert message(exc) == hook + str(at_add(node_only, tmp_path))
    assert "ipam.data_dir: '/tmp/elsewhere' is a node setting" in message(exc)

    created = registered.nad("good", nad_config(GOOD))
    assert created["metadata"]["name"] == "good"
    # UPDATE is judged too
    created["spec"]["config"] = json.dumps(bad)
    exc = refused(lambda: registered.kube.request("PUT", f"{registered.nads()}/good", created))
    assert message(exc).startswith(hook + "invalid config: ipam.range")
    conflist = {"cniVersion": "1.0.0", "name": "storage", "plugins": [{"type": "macvlan", "ipam": GOOD}]}
    registered.nad("good-list", conflist)


def test_the_api_server_refuses_deleting_a_pool_with_leases_unless_annotated(registered: Registered) -> None:
    lease = {"1": {"id": "c1", "podref": f"{registered.ns}/osd-0", "ifname": "net1"}}
    registered.pool("held", lease)
    exc = refused(lambda: registered.kube.request("DELETE", f"{registered.pools()}/held"))
    assert exc.status == 403
    assert message(exc).startswith(DENIED.format("ippools.whereabouts-py.cni.cncf.io"))
    assert f"still holds 1 lease(s) (one is {registered.ns}/osd-0)" in message(exc)
    registered.kube.request("GET", f"{registered.pools()}/held")  # still there

    registered.kube.request("PATCH", f"{registered.pools()}/held",
                            {"metadata": {"annotations": {ALLOW_DELETE_ANNOTATION: "true"}}})  # fmt: skip
    registered.kube.request("DELETE", f"{registered.pools()}/held")
    registered.pool("empty", {})
    registered.kube.request("DELETE", f"{registered.pools()}/empty")


def test_the_reconcilers_identity_deletes_a_pool_with_leases(registered: Registered) -> None:
    kube = registered.kube
    kube.apply_rbac()  # deploy/base/rbac.yaml: the reconciler may delete pools (node-slice cleanup)
    reconciler = KubeClient(load_kubeconfig(kube.reconciler_kubeconfig()))
    try:
        registered.pool("slice", {"1": {"id": "c1", "podref": f"{registered.ns}/p"}})
        reconciler.request("DELETE", f"{registered.pools()}/slice")
    finally:
        reconciler.close()
    assert not _exists(kube, f"{registered.pools()}/slice")


def _exists(kube: RealKube, path: str) -> bool:
    try:
        kube.request("GET", path)
    except ApiError as exc:
        assert exc.status == 404
        return False
    return True


def test_with_the_controller_down_only_the_risky_deletes_are_refused(registered: Registered) -> None:
    """The documented failurePolicy: NADs Ignore (the ADD still checks), IPPool deletes Fail, but the
    matchConditions keep empty pools, annotated pools and the project's identities off the webhook."""
    lease = {"1": {"id": "c1", "podref": f"{registered.ns}/osd-0"}}
    registered.pool("held", lease)
    registered.pool("empty", {})
    registered.pool("annotated", lease, {ALLOW_DELETE_ANNOTATION: "true"})
    registered.server.stop()
    exc = refused(lambda: registered.kube.request("DELETE", f"{registered.pools()}/held"))
    assert "failed calling webhook" in message(exc)
    registered.kube.request("DELETE", f"{registered.pools()}/empty")
    registered.kube.request("DELETE", f"{registered.pools()}/annotated")
    registered.nad("unjudged", nad_config({"type": "whereabouts-py", "range": "10.20.0.0/33"}))


def test_the_shipped_configuration_is_what_the_tests_register() -> None:
    """Guards as_test_config: only clientConfig, namespaceSelector and the namespace in the
    matchConditions differ from deploy/base/webhook.yaml."""
    (shipped,) = [
        d
        for d in yaml.safe_load_all(WEBHOOK_YAML.read_text())
        if d and d["kind"] == "ValidatingWebhookConfiguration"
    ]
    tested = as_test_config(shipped, "kube-system", 1)
    for a, b in zip(shipped["webhooks"], tested["webhooks"], strict=True):
        assert {k: v for k, v in a.items() if k != "clientConfig"} == {
            k: v for k, v in b.items() if k not in ("clientConfig", "namespaceSelector")
        }
        assert a["clientConfig"]["service"]["path"] == "/validate"
    assert {h["failurePolicy"] for h in shipped["webhooks"]} == {"Ignore", "Fail"}
