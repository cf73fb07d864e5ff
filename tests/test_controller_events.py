"""ipam-controller's Events, without a server: the rate limit drops (and counts) what is over it, and an
IPPool gets one Warning per crossing of 95% (again only after it fell below 90%)."""

from __future__ import annotations

from typing import Any

from ipam.controller.events import Recorder


class Client:
    def __init__(self) -> None:
        self.posted: list[dict[str, Any]] = []

    def request(self, method: str, path: str, body: Any = None) -> Any:
        assert method == "POST" and path.startswith("/apis/events.k8s.io/v1/namespaces/")
        self.posted.append(body)
        return body


def test_events_over_the_burst_are_dropped_and_counted() -> None:
    client = Client()
    recorder = Recorder(client, "test", rate=0.001, burst=3)
    for i in range(5):
        recorder.released(f"apps/p{i}", f"uid-{i}", f"10.0.0.{i}", "pool", "pod-gone")
    assert [e["regarding"]["name"] for e in client.posted] == ["p0", "p1", "p2"]
    assert dict(recorder.counts) == {"emitted": 3, "dropped": 2}
    first = client.posted[0]
    assert first["type"] == "Normal" and first["reason"] == "AddressReleased"
    assert first["regarding"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "namespace": "apps",
        "name": "p0",
        "uid": "uid-0",
    }
    assert first["metadata"]["namespace"] == "apps"


def test_one_warning_per_crossing_of_95_percent() -> None:
    client = Client()
    recorder = Recorder(client, "test")
    for used in (90, 94, 95, 96, 100, 93, 96, 89, 95):
        recorder.pool_usage("kube-system", "10.0.0.0-24", used, 100)
    warnings = [e for e in client.posted if e["type"] == "Warning"]
    assert [e["note"].split(": ")[1] for e in warnings] == [
        "95 of 100 addresses leased",
        "95 of 100 addresses leased",
    ]
    assert {e["regarding"]["kind"] for e in warnings} == {"IPPool"}
