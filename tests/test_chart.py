"""The Helm chart (charts/whereabouts-py): lint, its presets against the kustomize layouts they mirror,
and a server-side dry run of every preset on the real API server.

Helm here is Helm v4's own engine through PyPI's helm-python-sdk (libhelm_c): these machines reach no
`helm` download. Users run the `helm` CLI as usual.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.kubeapi.real import RealCluster
from tests.test_deploy import BASE, kustomize
from tests.test_webhook_monitoring import COMPONENT as MONITORING
from tests.test_webhook_monitoring import with_base

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "whereabouts-py"
# The chart's `platform` preset and the kustomize layout it must render the same objects as.
PRESETS = {
    "upstream": BASE,
    "k3s": ROOT / "deploy/overlays/k3s",
    "openshift": ROOT / "deploy/overlays/openshift",
}


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out = helm.Chart.load(CHART).render(values or {}, name="whereabouts-py", namespace="kube-system")
    manifests = [text for path, text in out.items() if not path.endswith("NOTES.txt")]  # as helm install does
    return [doc for text in manifests for doc in yaml.safe_load_all(text) if doc]


def without_labels(value: Any) -> Any:
    """`value` with every `labels` map dropped (the chart adds Helm's own), selectors kept."""
    if isinstance(value, dict):
        return {k: without_labels(v) for k, v in value.items() if k != "labels"}
    if isinstance(value, list):
        return [without_labels(v) for v in value]
    return value


def keyed(objects: list[dict[str, Any]]) -> dict[tuple[str, str, str], Any]:
    return {
        (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): without_labels(o)
        for o in objects
    }


def test_helm_lint_passes_strict() -> None:
    result = helm.lint(CHART, strict=True)
    assert result["errors"] == [], result
    assert [m for m in result["messages"] if m["severity"] > 1] == [], result


@pytest.mark.parametrize("platform", sorted(PRESETS))
def test_each_preset_renders_the_objects_of_its_kustomize_layout(platform: str) -> None:
    chart = keyed(render({"platform": platform}))
    layout = keyed(kustomize(PRESETS[platform]))
    assert sorted(chart) == sorted(layout)
    for key in layout:
        assert chart[key] == layout[key], key


ALL_MONITORING = {
    "monitoring": {k: {"enabled": True} for k in ("serviceMonitor", "prometheusRule", "dashboard")}
}


def test_monitoring_on_renders_the_base_with_the_monitoring_component(tmp_path: Path) -> None:
    chart = keyed(render(ALL_MONITORING))
    layout = keyed(with_base(tmp_path))
    assert sorted(chart) == sorted(layout)
    for key in layout:
        assert chart[key] == layout[key], key


def test_the_charts_monitoring_files_are_the_components() -> None:
    copies = CHART / "files" / "monitoring"
    for name in ("rbac.yaml", "servicemonitor.yaml", "prometheusrule.yaml", "whereabouts-py-dashboard.json"):
        assert (copies / name).read_bytes() == (MONITORING / name).read_bytes(), name


def test_the_charts_crds_are_the_projects_crds() -> None:
    ours = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    charts = {p.name: p.read_text() for p in (CHART / "crds").glob("*.yaml")}
    assert charts == ours


def test_values_change_what_they_name() -> None:
    objects = render(
        {
            "image": {"repository": "quay.io/me/wpy", "tag": "1.2.3"},
            "namespace": "ipam",
            "tokenLifetimeSeconds": 3600,
            "reconciler": {"schedule": "*/2 * * * *"},
            "hostPaths": {"cniBinDir": "/usr/libexec/cni"},
        }
    )
    [ds] = [o for o in objects if o["kind"] == "DaemonSet"]
    [cron] = [o for o in objects if o["kind"] == "CronJob"]
    install = ds["spec"]["template"]["spec"]["containers"][0]
    assert install["image"] == "quay.io/me/wpy:1.2.3"
    assert "--token-lifetime=3600" in install["args"] and "--cni-bin-dir=/usr/libexec/cni" in install["args"]
    assert {"name": "cni-bin", "mountPath": "/host/usr/libexec/cni"} in install["volumeMounts"]
    assert cron["spec"]["schedule"] == "*/2 * * * *"
    assert {o["metadata"].get("namespace", "ipam") for o in objects} == {"ipam"}
    # every subject of a binding names the chosen namespace, so the identities still match
    subjects = [s for o in objects for s in o.get("subjects", [])]
    assert subjects and {s["namespace"] for s in subjects} == {"ipam"}


def test_controller_values_change_what_they_name() -> None:
    objects = render(
        {
            "controller": {
                "replicas": 3,
                "releaseAfterNotReady": 600,
                "metricsPort": 9090,
                "resources": {"limits": {"memory": "1Gi"}},
            },
            "webhook": {"allowNodeOnlyKeys": True},
        }
    )
    [deploy] = [o for o in objects if o["kind"] == "Deployment"]
    [metrics] = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"].endswith("-metrics")]
    assert deploy["spec"]["replicas"] == 3
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    from ipam.controller.main import build_parser

    args = build_parser().parse_args(container["command"][1:])
    assert args.release_after_not_ready == 600.0 and args.webhook_allow_node_only_keys
    assert args.metrics_bind_address == ":9090"
    assert {"name": "metrics", "containerPort": 9090} in container["ports"]
    assert metrics["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics"}]
    assert container["resources"] == {
        "requests": {"cpu": "50m", "memory": "128Mi"},
        "limits": {"memory": "1Gi"},
    }


def test_without_controller_and_webhook_nothing_of_either_renders() -> None:
    objects = render({"controller": {"enabled": False}, "webhook": {"enabled": False}})
    assert [o["metadata"]["name"] for o in objects if "controller" in o["metadata"]["name"]] == []
    assert {o["kind"] for o in objects} >= {"DaemonSet", "CronJob"}
    # the controller without its webhook: no webhook flags, port, volume or Service
    objects = render({"webhook": {"enabled": False}})
    [deploy] = [o for o in objects if o["kind"] == "Deployment"]
    assert not any("webhook" in a for a in deploy["spec"]["template"]["spec"]["containers"][0]["command"])
    assert [o for o in objects if o["kind"] == "Service"] == [
        o for o in objects if o["metadata"]["name"] == "whereabouts-py-controller-metrics"
    ]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"platform": "rke2"}, 'platform: "rke2" is not one of upstream, k3s, openshift'),
        ({"hostPaths": {"cniConfDir": "/tmp/x"}}, 'hostPaths.cniConfDir: "/tmp/x" is not a directory'),
        (
            {"controller": {"enabled": False}},
            "webhook.enabled: the admission webhook is served by ipam-controller: set controller.enabled=true",
        ),
    ],
)
def test_a_wrong_value_fails_the_render_naming_it(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render(values)


@pytest.mark.parametrize("platform", sorted(PRESETS))
def test_each_preset_passes_a_server_side_dry_run(apiserver: RealCluster, platform: str) -> None:
    objects = render({"platform": platform})
    answers = apiserver.apply(objects, dry_run=True)
    assert len(answers) == len(objects)
