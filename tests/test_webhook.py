"""ipam.webhook's judgement (pure AdmissionReviews), its TLS server, and ipam.webhook_certs.
The same webhook registered with the real kube-apiserver: tests/test_webhook_real.py."""

from __future__ import annotations

import base64
import copy
import datetime
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipam import webhook_certs as certs
from ipam.config import load_config
from ipam.errors import CNIError
from ipam.webhook import (
    ALLOW_DELETE_ANNOTATION,
    DEFAULT_NODE_SETTINGS,
    Policy,
    WebhookServer,
    project_identities,
    review,
    serve_webhook,
)
from tests.test_deploy import inst

GOOD = {"type": "whereabouts-py", "range": "10.20.0.0/24"}
ADMIN = "system:admin"
RECONCILER = "system:serviceaccount:kube-system:whereabouts-py-reconciler"


def nad_config(ipam: dict[str, Any], version: str = "1.0.0", **top: Any) -> dict[str, Any]:
    return {
        "cniVersion": version,
        "name": "storage",
        "type": "macvlan",
        "master": "eth1",
        "ipam": ipam,
        **top,
    }


def nad_request(config: Any, operation: str = "CREATE") -> dict[str, Any]:
    text = config if isinstance(config, str) else json.dumps(config)
    obj = {"apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
           "metadata": {"name": "storage", "namespace": "rook-ceph"}, "spec": {"config": text}}  # fmt: skip
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u-1",
            "operation": operation,
            "resource": {
                "group": "k8s.cni.cncf.io",
                "version": "v1",
                "resource": "network-attachment-definitions",
            },
            "userInfo": {"username": "tenant"},
            "object": obj,
            "oldObject": obj if operation == "UPDATE" else None,
        },
    }


def pool_request(
    allocations: dict[str, Any], username: str = ADMIN, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    pool = {"apiVersion": "whereabouts.cni.cncf.io/v1alpha1", "kind": "IPPool",
            "metadata": {"name": "10.20.0.0-24", "namespace": "kube-system", "annotations": annotations or {}},
            "spec": {"range": "10.20.0.0/24", "allocations": allocations}}  # fmt: skip
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u-2",
            "operation": "DELETE",
            "resource": {"group": "whereabouts.cni.cncf.io", "version": "v1alpha1", "resource": "ippools"},
            "userInfo": {"username": username},
            "object": None,
            "oldObject": pool,
        },
    }


LEASE = {"1": {"id": "c1", "podref": "rook-ceph/osd-0", "ifname": "net1"}}


def answer(req: dict[str, Any], policy: Policy | None = None) -> dict[str, Any]:
    out = review(req, policy)
    assert out["apiVersion"] == "admission.k8s.io/v1" and out["kind"] == "AdmissionReview"
    assert out["response"]["uid"] == req["request"]["uid"]
    return dict(out["response"])


def at_add(config: dict[str, Any], tmp_path: Path) -> CNIError:
    """What the plugin's ADD says on a node installed by deploy/install.py (its flat file)."""
    flat = tmp_path / "whereabouts.conf"
    flat.write_text(inst.flat_file("node-a").decode())
    with pytest.raises(CNIError) as caught:
        load_config(json.dumps(config).encode(), flat_search=[str(flat)], environ={})
    return caught.value


# -- NetworkAttachmentDefinitions ----------------------------------------------------------------------


BAD = [
    {"type": "whereabouts-py", "range": "10.20.0.0/33"},
    {"type": "whereabouts-py"},
    {"type": "whereabouts-py", "range": "10.20.0.0/24", "range_start": "10.21.0.1"},
    {"type": "whereabouts-py", "range": "10.20.0.0/24", "network_name": "Bad_Name"},
    {"type": "whereabouts-py", "range": "10.20.0.0/24", "retry_deadline_seconds": 0},
    {"type": "whereabouts-py", "range": "10.20.0.0/24", "data_dir": "/tmp/elsewhere"},
    {"type": "whereabouts-py", "range": "10.20.0.0/24", "kubernetes": {"kubeconfig": "/root/.kube/config"}},
    {"type": "whereabouts-py", "range": "10.20.0.0/24", "datastore": "file"},
]


@pytest.mark.parametrize("ipam", BAD, ids=lambda i: ",".join(sorted(set(i) - {"type"})) or "no-range")
@pytest.mark.parametrize("operation", ["CREATE", "UPDATE"])
def test_a_bad_nad_is_refused_with_the_message_its_add_would_get(
    ipam: dict[str, Any], operation: str, tmp_path: Path
) -> None:
    config = nad_config(ipam)
    expected = at_add(config, tmp_path)
    assert expected.code == 7
    response = answer(nad_request(config, operation))
    assert response["allowed"] is False
    assert response["status"]["message"] == str(expected)
    assert response["status"]["code"] == 422


def test_a_nad_that_repeats_the_nodes_own_settings_is_accepted_as_at_add(tmp_path: Path) -> None:
    ipam = {**GOOD, **copy.deepcopy(DEFAULT_NODE_SETTINGS)}
    flat = tmp_path / "whereabouts.conf"
    flat.write_text(inst.flat_file("node-a").decode())
    load_config(json.dumps(nad_config(ipam)).encode(), flat_search=[str(flat)], environ={})  # ADD passes
    assert answer(nad_request(nad_config(ipam)))["allowed"] is True


def test_the_webhooks_node_settings_are_what_the_installer_writes_on_every_node() -> None:
    written = json.loads(inst.flat_file("node-a"))
    del written["node_name"]
    assert written == DEFAULT_NODE_SETTINGS


def test_node_name_is_refused_in_a_nad_whatever_its_value() -> None:
    """Each node has its own: the one node whose name it is would accept it, every other refuses."""
    response = answer(nad_request(nad_config({**GOOD, "node_name": "node-a"})))
    assert response["allowed"] is False
    assert response["status"]["message"].startswith(
        "invalid config: ipam.node_name: 'node-a' is a node setting"
    )


def test_node_only_keys_pass_when_the_cluster_allows_them_and_are_still_validated() -> None:
    allow = Policy(allow_node_only_keys=True)
    for key, value in (("data_dir", "/tmp/elsewhere"), ("node_name", "node-a"), ("datastore", "file")):
        config = nad_config({**GOOD, key: value})
        assert answer(nad_request(config))["allowed"] is False
        assert answer(nad_request(config), allow)["allowed"] is True
    refused = answer(nad_request(nad_config({**GOOD, "data_dir": "relative/dir"})), allow)
    assert refused["allowed"] is False
    assert "ipam.data_dir" in refused["status"]["message"] and "absolute path" in refused["status"]["message"]


def test_a_good_nad_is_accepted_in_both_forms() -> None:
    assert answer(nad_request(nad_config(GOOD)))["allowed"] is True
    conflist = {"cniVersion": "1.0.0", "name": "storage",
                "plugins": [{"type": "macvlan", "master": "eth1", "ipam": GOOD}, {"type": "tuning"}]}  # fmt: skip
    assert answer(nad_request(conflist))["allowed"] is True


def test_a_conflist_is_judged_plugin_by_plugin_with_the_lists_version() -> None:
    bad = {"type": "whereabouts-py", "range": "10.20.0.0/24", "gateway": "nope"}
    conflist = {"cniVersion": "1.0.0", "name": "storage",
                "plugins": [{"type": "macvlan", "ipam": GOOD}, {"type": "ipvlan", "ipam": bad}]}  # fmt: skip
    response = answer(nad_request(conflist))
    assert response["allowed"] is False
    assert response["status"]["message"].startswith(
        "plugins[1]: invalid config: ipam.gateway: 'nope' is not an IP address"
    )
    # the list's cniVersion is the plugin's: an unsupported one is refused as at ADD (code 1)
    old = {"cniVersion": "0.1.0", "name": "storage", "plugins": [{"type": "macvlan", "ipam": GOOD}]}
    response = answer(nad_request(old))
    assert response["allowed"] is False
    assert response["status"]["message"].startswith("plugins[0]: incompatible CNI version '0.1.0'")


@pytest.mark.parametrize(
    "config",
    [
        nad_config({"type": "whereabouts", "range": "10.20.0.0/33"}),  # Go Whereabouts: not ours to judge
        nad_config({"type": "host-local", "subnet": "x"}),
        "not json {",
        "",
        {"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "macvlan", "ipam": {"type": "static"}}]},
        json.dumps(["a", "list"]),
    ],
    ids=["go-whereabouts", "host-local", "not-json", "empty", "other-conflist", "json-list"],
)
def test_other_nads_are_not_judged(config: Any) -> None:
    assert answer(nad_request(config))["allowed"] is True


# -- IPPool deletion -----------------------------------------------------------------------------------


def test_deleting_a_pool_with_leases_is_refused() -> None:
    response = answer(pool_request(LEASE))
    assert response["allowed"] is False
    assert response["status"]["code"] == 403
    message = response["status"]["message"]
    assert "still holds 1 lease(s) (one is rook-ceph/osd-0)" in message
    assert f'{ALLOW_DELETE_ANNOTATION}="true"' in message


def test_deleting_a_pool_is_allowed_when_empty_annotated_or_by_the_projects_own_identities() -> None:
    assert answer(pool_request({}))["allowed"] is True
    assert answer(pool_request(LEASE, annotations={ALLOW_DELETE_ANNOTATION: "true"}))["allowed"] is True
    assert answer(pool_request(LEASE, annotations={ALLOW_DELETE_ANNOTATION: "yes"}))["allowed"] is False
    assert answer(pool_request(LEASE, username=RECONCILER))["allowed"] is True
    elsewhere = Policy(trusted_users=project_identities("whereabouts"))
    assert answer(pool_request(LEASE, username=RECONCILER), elsewhere)["allowed"] is False
    assert (
        answer(
            pool_request(LEASE, username="system:serviceaccount:whereabouts:whereabouts-py-controller"),
            elsewhere,
        )["allowed"]
        is True
    )


def test_other_requests_are_allowed_and_a_non_review_is_an_error() -> None:
    req = pool_request(LEASE)
    req["request"]["operation"] = "UPDATE"
    assert answer(req)["allowed"] is True
    req = nad_request(nad_config({"type": "whereabouts-py"}), "DELETE")
    assert answer(req)["allowed"] is True
    for bad in ({}, {"request": {}}, {"request": {"uid": 3}}, []):
        with pytest.raises(ValueError):
            review(bad)  # type: ignore[arg-type]


# -- certificates --------------------------------------------------------------------------------------


NAMES = certs.service_names("whereabouts-py-controller", "kube-system")


def test_made_certificates_are_usable_until_near_their_end_or_a_name_changes() -> None:
    made = certs.make_certificates(NAMES, ("127.0.0.1",))
    assert certs.usable(made, NAMES, ("127.0.0.1",))
    assert not certs.usable(made, [*NAMES, "other.svc"], ("127.0.0.1",))
    assert not certs.usable(made, NAMES, ("127.0.0.2",))
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=certs.SERVING_DAYS - 20)
    assert not certs.usable(made, NAMES, ("127.0.0.1",), now=later)
    other = certs.make_certificates(NAMES)
    assert not certs.usable(certs.Certificates(other.ca_cert, other.ca_key, made.cert, made.key), NAMES)


class FakeApi:
    """A Secret and a webhook configuration with resourceVersions, and a competitor that writes once."""

    class Conflict(Exception):
        status = 409

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {
            "/api/v1/namespaces/ns/secrets/s": {"metadata": {"name": "s", "resourceVersion": "1"}},
            "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/whereabouts-py": {
                "metadata": {"resourceVersion": "1"},
                "webhooks": [
                    {"name": "a", "clientConfig": {"url": "https://x"}},
                    {"name": "b", "clientConfig": {}},
                ],
            },
        }
        self.race: dict[str, Any] | None = None
        self.puts = 0

    def request(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> Any:
        stored = self.objects[path]
        if method == "GET":
            return copy.deepcopy(stored)
        assert method == "PUT"
        if self.race is not None:  # another replica writes between our GET and PUT
            stored.update(self.race)
            stored["metadata"]["resourceVersion"] = str(int(stored["metadata"]["resourceVersion"]) + 1)
            self.race = None
        if body["metadata"]["resourceVersion"] != stored["metadata"]["resourceVersion"]:
            raise self.Conflict("conflict")
        self.puts += 1
        body["metadata"]["resourceVersion"] = str(int(stored["metadata"]["resourceVersion"]) + 1)
        self.objects[path] = copy.deepcopy(body)
        return body


def test_two_replicas_racing_for_the_secret_end_with_the_same_certificates() -> None:
    api = FakeApi()
    theirs = certs.make_certificates(NAMES)
    api.race = {"data": {k: base64.b64encode(v).decode() for k, v in
                         zip(("ca.crt", "ca.key", "tls.crt", "tls.key"), (theirs.ca_cert, theirs.ca_key, theirs.cert, theirs.key), strict=True)}}  # fmt: skip
    mine = certs.ensure_secret(api, "ns", NAMES, secret="s")
    assert mine == theirs and api.puts == 0  # our write lost; theirs was usable, so we took it
    assert certs.ensure_secret(api, "ns", NAMES, secret="s") == theirs


def test_a_new_name_renews_the_serving_certificate_under_the_same_ca() -> None:
    api = FakeApi()
    first = certs.ensure_secret(api, "ns", NAMES, secret="s")
    second = certs.ensure_secret(api, "ns", NAMES, ("127.0.0.1",), secret="s")
    assert second.ca_cert == first.ca_cert and second.cert != first.cert
    assert certs.usable(second, NAMES, ("127.0.0.1",)) and api.puts == 2


def test_the_ca_bundle_is_written_into_every_webhook_once() -> None:
    api = FakeApi()
    made = certs.make_certificates(NAMES)
    assert certs.ensure_ca_bundle(api, made.ca_cert) is True
    hooks = api.objects[
        "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/whereabouts-py"
    ]["webhooks"]
    assert {base64.b64decode(h["clientConfig"]["caBundle"]) for h in hooks} == {made.ca_cert}
    assert hooks[0]["clientConfig"]["url"] == "https://x"
    assert certs.ensure_ca_bundle(api, made.ca_cert) is False and api.puts == 1


# -- the TLS server ------------------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[WebhookServer, ssl.SSLContext, certs.Certificates]]:
    made = certs.make_certificates(["localhost"], ("127.0.0.1",))
    certfile, keyfile = certs.write_files(made, str(tmp_path))
    assert oct(Path(keyfile).stat().st_mode & 0o777) == "0o600"
    server = serve_webhook("127.0.0.1:0", certfile, keyfile)
    context = ssl.create_default_context(cadata=made.ca_cert.decode())
    try:
        yield server, context, made
    finally:
        server.stop()


def post(
    server: WebhookServer, context: ssl.SSLContext, body: bytes, path: str = "/validate"
) -> tuple[int, bytes]:
    req = urllib.request.Request(f"https://127.0.0.1:{server.port}{path}", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def test_the_server_answers_reviews_over_tls(
    served: tuple[WebhookServer, ssl.SSLContext, certs.Certificates],
) -> None:
    server, context, _ = served
    status, body = post(server, context, json.dumps(pool_request(LEASE)).encode())
    assert status == 200 and json.loads(body)["response"]["allowed"] is False
    status, body = post(server, context, json.dumps(nad_request(nad_config(GOOD))).encode())
    assert status == 200 and json.loads(body)["response"] == {"uid": "u-1", "allowed": True}
    assert post(server, context, b"not json")[0] == 400
    assert post(server, context, b"{}")[0] == 400
    assert post(server, context, b"{}", "/elsewhere")[0] == 404
    with urllib.request.urlopen(f"https://127.0.0.1:{server.port}/healthz", timeout=10, context=context) as r:
        assert r.read() == b"ok\n"


def test_a_renewed_certificate_is_served_to_new_connections(
    served: tuple[WebhookServer, ssl.SSLContext, certs.Certificates], tmp_path: Path
) -> None:
    server, old_context, _ = served
    renewed = certs.make_certificates(["localhost"], ("127.0.0.1",))
    new_dir = tmp_path / "new"
    new_dir.mkdir()
    server.reload_certificate(*certs.write_files(renewed, str(new_dir)))
    new_context = ssl.create_default_context(cadata=renewed.ca_cert.decode())
    assert post(server, new_context, json.dumps(pool_request({})).encode())[0] == 200
    with pytest.raises(urllib.error.URLError):
        post(server, old_context, json.dumps(pool_request({})).encode())


# -- the shipped rights --------------------------------------------------------------------------------


def test_the_controller_may_keep_only_its_own_secret_and_webhook_configuration() -> None:
    from tests.test_deploy import BASE, assert_bound, find, load_docs

    docs = load_docs(BASE / "webhook.yaml")
    role, cluster_role = (
        find("Role", "whereabouts-py-controller-webhook", docs),
        find("ClusterRole", "whereabouts-py-controller-webhook", docs),
    )
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": [certs.SECRET_NAME],
            "verbs": ["get", "update"],
        }
    ]
    assert cluster_role["rules"] == [{"apiGroups": ["admissionregistration.k8s.io"], "resources": ["validatingwebhookconfigurations"],
                                      "resourceNames": [certs.WEBHOOK_CONFIG_NAME], "verbs": ["get", "update"]}]  # fmt: skip
    for kind in ("Role", "ClusterRole"):
        assert_bound(kind, "whereabouts-py-controller-webhook", "whereabouts-py-controller")
    assert find("Secret", certs.SECRET_NAME, docs).get("data") is None  # the controller fills it
    assert find("ValidatingWebhookConfiguration", certs.WEBHOOK_CONFIG_NAME, docs)
    # the webhook's own exemption names the same identities as its matchConditions
    (config,) = [d for d in docs if d["kind"] == "ValidatingWebhookConfiguration"]
    conditions = " ".join(c["expression"] for h in config["webhooks"] for c in h.get("matchConditions", []))
    assert all(user in conditions for user in Policy().trusted_users)
    assert ALLOW_DELETE_ANNOTATION in conditions


class Reloads:
    def __init__(self) -> None:
        self.files: list[tuple[str, str]] = []

    def reload_certificate(self, certfile: str, keyfile: str) -> None:
        self.files.append((certfile, keyfile))


def test_the_keeper_follows_another_replicas_renewal_and_restores_an_emptied_ca_bundle(
    tmp_path: Path,
) -> None:
    import threading
    import time

    api = FakeApi()
    api.objects["/api/v1/namespaces/kube-system/secrets/s"] = api.objects.pop(
        "/api/v1/namespaces/ns/secrets/s"
    )
    keeper = certs.CertKeeper(api, "kube-system", str(tmp_path), secret="s")
    assert keeper.refresh() is True and keeper.refresh() is False
    assert keeper.current is not None and Path(keeper.certfile).read_bytes() == keeper.current.cert
    first = keeper.current
    config = api.objects[
        "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/whereabouts-py"
    ]
    for hook in config["webhooks"]:
        hook["clientConfig"].pop("caBundle")  # a re-apply of the manifests

    server, stop = Reloads(), threading.Event()
    runner = threading.Thread(target=keeper.run, args=(server, stop, 0.01))
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while (
            any("caBundle" not in h["clientConfig"] for h in config["webhooks"])
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
            config = api.objects[
                "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/whereabouts-py"
            ]
        assert server.files == []  # the caBundle came back; the certificate did not change
        other = certs.make_certificates(NAMES)  # another replica renews
        secret = api.objects["/api/v1/namespaces/kube-system/secrets/s"]
        secret["data"] = {k: base64.b64encode(v).decode() for k, v in
                          zip(("ca.crt", "ca.key", "tls.crt", "tls.key"), (other.ca_cert, other.ca_key, other.cert, other.key), strict=True)}  # fmt: skip
        while not server.files and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        runner.join(timeout=30)
    assert server.files and server.files[0] == (keeper.certfile, keeper.keyfile)
    assert keeper.current == other != first
    assert Path(keeper.certfile).read_bytes() == other.cert
    config = api.objects[
        "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/whereabouts-py"
    ]
    assert {base64.b64decode(h["clientConfig"]["caBundle"]) for h in config["webhooks"]} == {other.ca_cert}
