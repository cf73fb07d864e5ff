"""deploy/components/monitoring: it renders on top of the base, passes a server-side dry run with
prometheus-operator's CRDs (tests/third_party/), and its alerts and dashboard query only metrics that
exist: the controller's (the names below) and the node agent's (read from ipam.agent.Metrics)."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from ipam.agent import Metrics
from tests.kubeapi.real import ApiError, RealKube
from tests.test_deploy import BASE, DEPLOY, kustomize
from tests.test_webhook_real import install_crds

COMPONENT = DEPLOY / "components" / "monitoring"
THIRD_PARTY = Path(__file__).resolve().parent / "third_party"
CRDS = [
    THIRD_PARTY / "prometheus-servicemonitor-crd.yaml",
    THIRD_PARTY / "prometheus-prometheusrule-crd.yaml",
]

#: ipam-controller's metric names the component relies on (README, "Operating it: the controller")
CONTROLLER_METRICS = frozenset({
    "whereabouts_py_pool_size_addresses",
    "whereabouts_py_pool_allocated_addresses",
    "whereabouts_py_pool_retained_addresses",
    "whereabouts_py_pool_free_addresses",
    "whereabouts_py_leases_released_total",
    "whereabouts_py_leaks_pending",
    "whereabouts_py_orphan_reservations",
    "whereabouts_py_controller_is_leader",
    "whereabouts_py_watch_healthy",
})  # fmt: skip

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan"}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, keywords,
    label names (inside {} or a by/without/on/ignoring list), strings or durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[match.end() :].lstrip()
        if match.group() not in _KEYWORDS and not rest.startswith("("):
            names.add(match.group())
    return names


def test_metric_names_finds_selected_metrics_only() -> None:
    expr = ('histogram_quantile(0.99, sum by (le) (rate(a_bucket{command="ADD", x=~"b|c"}[5m]))) '
            "/ on (instance) group_left b_total > 0 and absent(c)")  # fmt: skip
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


def agent_metrics() -> set[str]:
    """The sample names the node agent exposes (…_bucket, …_total, …), from its own registry."""
    metrics = Metrics()
    metrics.latency.labels("ADD").observe(0.01)
    metrics.requests.labels("ADD", "ok").inc()
    return {s.name for family in metrics.registry.collect() for s in family.samples}


def component_objects() -> list[dict[str, Any]]:
    return kustomize(COMPONENT)


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def alerts() -> dict[str, dict[str, Any]]:
    rule = one(component_objects(), "PrometheusRule")
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r}


def test_every_alert_queries_only_the_controllers_metrics() -> None:
    found = alerts()
    assert found
    for name, rule in found.items():
        used = metric_names(rule["expr"])
        assert used, f"{name} selects no metric"
        assert used <= CONTROLLER_METRICS, f"{name}: {sorted(used - CONTROLLER_METRICS)}"


def test_the_alerts_the_issue_asks_for() -> None:
    found = alerts()
    warning, critical = found["WhereaboutsPyPoolNearlyFull"], found["WhereaboutsPyPoolFull"]
    assert (
        warning["labels"]["severity"] == "warning" and ">= 0.85" in warning["expr"] and "for" not in warning
    )
    assert (
        critical["labels"]["severity"] == "critical"
        and ">= 0.95" in critical["expr"]
        and critical["for"] == "5m"
    )
    for rule in (warning, critical):
        assert metric_names(rule["expr"]) == {
            "whereabouts_py_pool_allocated_addresses",
            "whereabouts_py_pool_size_addresses",
        }
    leaks = found["WhereaboutsPyLeaksNotReleased"]
    assert "whereabouts_py_leaks_pending" in metric_names(leaks["expr"]) and leaks["for"] == "15m"
    absent = found["WhereaboutsPyControllerAbsent"]
    assert absent["expr"].startswith("absent(whereabouts_py_controller_is_leader)")


def test_the_dashboard_shows_usage_releases_and_add_latency_from_metrics_that_exist() -> None:
    (dashboard_map,) = [o for o in component_objects() if o["kind"] == "ConfigMap"]
    assert dashboard_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = dashboard_map["data"].values()
    dashboard = json.loads(text)
    assert dashboard == json.loads((COMPONENT / "whereabouts-py-dashboard.json").read_text())
    known = CONTROLLER_METRICS | agent_metrics()
    exprs = {p["title"]: [t["expr"] for t in p["targets"]] for p in dashboard["panels"]}
    for title, queries in exprs.items():
        for expr in queries:
            assert metric_names(expr) and metric_names(expr) <= known, (title, expr)
    assert {"Pool usage", "Leases released, by reason", "Agent ADD latency"} <= set(exprs)
    assert "whereabouts_py_request_seconds_bucket" in metric_names(exprs["Agent ADD latency"][0])
    assert "whereabouts_py_leases_released_total" in metric_names(exprs["Leases released, by reason"][0])


def with_base(tmp_path: Path) -> list[dict[str, Any]]:
    """The base with the component, as a user's kustomization would have it."""
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{os.path.relpath(BASE, tmp_path)}]\ncomponents: [{os.path.relpath(COMPONENT, tmp_path)}]\n"
    )
    return kustomize(tmp_path)


def test_the_component_adds_its_objects_and_changes_nothing_of_the_base(tmp_path: Path) -> None:
    base, combined = kustomize(BASE), with_base(tmp_path)
    added = [o for o in combined if o not in base]
    assert len(combined) == len(base) + len(added)
    assert sorted(o["kind"] for o in added) == [
        "ConfigMap",
        "PrometheusRule",
        "Role",
        "RoleBinding",
        "ServiceMonitor",
    ]
    assert all(o["metadata"]["namespace"] == "kube-system" for o in added)
    monitor = one(added, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "controller"


@pytest.mark.apiserver
def test_base_and_component_pass_a_server_side_dry_run(real_kube: RealKube, tmp_path: Path) -> None:
    install_crds(real_kube, *CRDS)
    objects = with_base(tmp_path)
    answers = real_kube.cluster.apply(objects, dry_run=True)
    assert [a["metadata"]["name"] for a in answers] == [o["metadata"]["name"] for o in objects]


@pytest.mark.apiserver
@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("PrometheusRule", ["spec", "groups", 0, "rules", 0, "exprr"], "x"),  # not in the schema
        ("PrometheusRule", ["spec", "groups", 0, "name"], ""),  # minLength 1
        ("ServiceMonitor", ["spec", "endpoints", 0, "scheme"], "ftp"),  # enum
    ],
)
def test_the_trimmed_crds_still_refuse_broken_objects(
    real_kube: RealKube, kind: str, path: list[Any], value: Any
) -> None:
    """Guards the dry run above: the trimmed CRDs keep prometheus-operator's rules."""
    install_crds(real_kube, *CRDS)
    obj = copy.deepcopy(one(component_objects(), kind))
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ApiError) as caught:
        real_kube.cluster.apply(obj, dry_run=True)
    assert caught.value.status in (400, 422)
