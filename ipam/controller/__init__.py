"""The cluster-side controller (`ipam-controller`): watch-driven reclaim of leaked leases, pods on dead
nodes, pool usage as Prometheus metrics, Events, and leader election between its replicas.

- watch: LIST + WATCH of one resource (metadata only for pods), resumed by resourceVersion;
- cache: what the watches know, kept small, pointing the reclaim worker at pods to look at;
- rules: the pure judgement (ipam.audit's, plus pods on dead nodes);
- reclaim: confirm with a GET, release through ipam-reconcile's conditional write;
- leader, metrics, events, main: leader election, /metrics and probes, Events, the wiring.
"""
