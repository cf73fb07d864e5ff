"""Whereabouts compatibility: what whereabouts-py would read differently in a Go Whereabouts cluster.

Pure judgement over the objects as the API server lists them (NetworkAttachmentDefinitions, IPPools,
OverlappingRangeIPReservations, NodeSlicePools); `ipamctl check --whereabouts-compat` reads them and
prints the findings. Pool and reservation names are judged from names and ranges alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from netaddr import AddrFormatError, IPAddress, IPNetwork

from .allocator import Lease
from .audit import reservation_address
from .config import NODE_ONLY_KEYS, load_config
from .errors import CNIError
from .ranges import pool_name, reservation_name, usable_bounds
from .slices import node_slice_pool_name

# what can differ, in the order findings are listed
REFUSED = "refused-config"  # our validation refuses the NAD's ipam block: every ADD fails with code 7
NODE_ONLY = "node-only-key"  # set in the NAD; whereabouts-py takes it from the node's flat file only
IGNORED = "ignored-key"  # a Whereabouts key whereabouts-py does not act on
STATIC = "static-addresses"  # `addresses`: whereabouts-py records one inside a range as a lease
BOUNDS = "bound-outside-range"  # range_start/range_end outside the range: Whereabouts ignores it, we refuse
AMBIGUOUS = "ambiguous-pool-name"  # one IPPool name, two (network_name, range) pairs
UNREADABLE_POOL = "unreadable-pool"  # a pool whose range or allocations we cannot read
LEASE_OUT = "lease-outside-range"
NO_PODREF = "lease-without-podref"
BAD_RESERVATION = "unparsable-reservation"
SLICES_DIFFER = "node-slices-differ"
KINDS = (
    REFUSED,
    NODE_ONLY,
    IGNORED,
    STATIC,
    BOUNDS,
    AMBIGUOUS,
    UNREADABLE_POOL,
    LEASE_OUT,
    NO_PODREF,
    BAD_RESERVATION,
    SLICES_DIFFER,
)
WHEREABOUTS_TYPES = ("whereabouts", "whereabouts-py")

# Go Whereabouts' keys whereabouts-py does not act on, and what it does instead
IGNORED_KEYS = {
    "leader_lease_duration": "no leader election: pools are written with conditional updates",
    "leader_renew_deadline": "no leader election: pools are written with conditional updates",
    "leader_retry_period": "no leader election: pools are written with conditional updates",
    "reconciler_cron_expression": "the reconcile schedule is the ipam-reconcile CronJob's",
    "sleep_for_race": "a test knob of Whereabouts; no sleep",
    "etcd_host": "no etcd datastore",
    "etcd_username": "no etcd datastore",
    "etcd_password": "no etcd datastore",
    "etcd_key_file": "no etcd datastore",
    "etcd_cert_file": "no etcd datastore",
    "etcd_ca_cert_file": "no etcd datastore",
}


@dataclass(frozen=True)
class Finding:
    kind: str
    subject: str  # the object: "NetworkAttachmentDefinition ns/name", "IPPool name", ...
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "subject": self.subject, "detail": self.detail}


@dataclass(frozen=True)
class Network:
    """One Whereabouts ipam block of a NAD, as Go Whereabouts reads it."""

    nad: str  # ns/name
    name: str  # the CNI config `name`
    ipam: Mapping[str, Any]

    @property
    def network_name(self) -> str:
        value = self.ipam.get("network_name")
        return value if isinstance(value, str) else ""

    @property
    def subject(self) -> str:
        return f"NetworkAttachmentDefinition {self.nad}"


@dataclass(frozen=True)
class Cluster:
    """The objects listed: NADs from every namespace, the rest from the pools' namespace."""

    nads: Sequence[Mapping[str, Any]]
    pools: Sequence[Mapping[str, Any]]
    reservations: Sequence[Mapping[str, Any]]
    node_slices: Sequence[Mapping[str, Any]]


def _meta(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _spec(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = obj.get("spec")
    return spec if isinstance(spec, Mapping) else {}


def networks(nad: Mapping[str, Any]) -> Iterator[tuple[Network, str]]:
    """The Whereabouts ipam blocks of a NAD (a single config or a conflist), with their cniVersion."""
    ns, name = _meta(nad)
    try:
        conf = json.loads(_spec(nad).get("config") or "{}")
    except ValueError:
        return  # Multus refuses it too; not ours to judge
    if not isinstance(conf, dict):
        return
    listed = conf.get("plugins")
    plugins: list[Any] = listed if isinstance(listed, list) else [conf]
    for plugin in plugins:
        ipam = plugin.get("ipam") if isinstance(plugin, dict) else None
        if isinstance(ipam, dict) and ipam.get("type") in WHEREABOUTS_TYPES:
            version = str(plugin.get("cniVersion") or conf.get("cniVersion") or "0.3.1")
            yield Network(f"{ns}/{name}", str(conf.get("name") or plugin.get("name") or ""), ipam), version


def _entries(ipam: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    out: list[tuple[str, Mapping[str, Any]]] = []
    if ipam.get("range"):
        out.append(("ipam", ipam))
    ranges = ipam.get("ipRanges")
    if isinstance(ranges, list):
        out += [(f"ipam.ipRanges[{i}]", e) for i, e in enumerate(ranges) if isinstance(e, Mapping)]
    return out


def _network_of(text: object) -> IPNetwork | None:
    """The network of a range as Whereabouts writes it (`CIDR`, or `A-B/prefix`); None if unreadable."""
    if not isinstance(text, str):
        return None
    try:
        return IPNetwork(text.rsplit("-", 1)[-1] if "." in text else text).cidr
    except (AddrFormatError, ValueError, TypeError):
        return None


def _address(text: object) -> IPAddress | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return IPAddress(text.split("/", 1)[0])  # Whereabouts also takes a bound written as a CIDR
    except (AddrFormatError, ValueError, TypeError):
        return None


def _bounds_outside(net: Network) -> tuple[list[Finding], dict[str, Any]]:
    """range_start/range_end outside their range (Whereabouts ignores them; we refuse the config),
    and the ipam block without them, as Whereabouts reads it."""
    found: list[Finding] = []
    ipam: dict[str, Any] = json.loads(json.dumps(net.ipam))
    fixed = [("ipam", ipam)] + [
        (f"ipam.ipRanges[{i}]", e) for i, e in enumerate(ipam.get("ipRanges") or []) if isinstance(e, dict)
    ]
    for key, entry in _entries(net.ipam):
        network = _network_of(entry.get("range"))
        target = next(e for k, e in fixed if k == key)
        for bound in ("range_start", "range_end"):
            ip = _address(entry.get(bound))
            if network is None or ip is None or (ip.version == network.version and ip in network):
                continue
            found.append(
                Finding(
                    BOUNDS,
                    net.subject,
                    f"{key}.{bound} {entry[bound]} is outside range {network}: Go Whereabouts ignores it, "
                    "whereabouts-py refuses the config (code 7); remove it or move it inside the range",
                )
            )
            target.pop(bound, None)
    return found, ipam


def judge_network(net: Network, version: str) -> list[Finding]:
    """What whereabouts-py reads differently in one ipam block (every ADD of the network meets it)."""
    found = [
        Finding(
            NODE_ONLY,
            net.subject,
            f"ipam.{key} is a node setting in whereabouts-py: set it in the node's flat file "
            "(whereabouts.conf); a NAD that sets it to another value than the node's is refused (code 7)",
        )
        for key in NODE_ONLY_KEYS
        if key in net.ipam
    ]
    found += [
        Finding(IGNORED, net.subject, f"ipam.{key} is ignored by whereabouts-py: {why}")
        for key, why in IGNORED_KEYS.items()
        if key in net.ipam
    ]
    if net.ipam.get("addresses"):
        found.append(
            Finding(
                STATIC,
                net.subject,
                "ipam.addresses: whereabouts-py records a static address inside a range as a lease "
                "(reserved cluster-wide) and refuses it while another pod holds it (code 104); "
                "Go Whereabouts hands it out unrecorded",
            )
        )
    bounds, ipam = _bounds_outside(net)
    found += bounds
    ours = {k: v for k, v in ipam.items() if k not in NODE_ONLY_KEYS}
    doc = {"cniVersion": version, "name": net.name, "type": "compat-check", "ipam": ours}
    try:
        load_config(json.dumps(doc).encode(), flat_search=(), environ={"NODENAME": "compat-check"})
    except CNIError as exc:
        found.append(Finding(REFUSED, net.subject, f"whereabouts-py refuses it (code {exc.code}): {exc.msg}"))
    return found


def _ranges(net: Network) -> list[IPNetwork]:
    return [n for _, e in _entries(net.ipam) if (n := _network_of(e.get("range"))) is not None]


def judge_names(nets: Sequence[Network], pools: Sequence[Mapping[str, Any]]) -> list[Finding]:
    """IPPool names two (network_name, range) pairs map to, among the NADs' networks and the pools'
    recorded ranges: Go Whereabouts reads the one pool's offsets in either range."""
    users: dict[str, dict[tuple[str, str], list[str]]] = {}
    for net in nets:
        for network in _ranges(net):
            pair = (net.network_name, str(network))
            users.setdefault(pool_name(str(network), net.network_name), {}).setdefault(pair, []).append(
                net.nad
            )
    recorded = {_meta(p)[1]: _spec(p).get("range") for p in pools}
    found: list[Finding] = []
    for name, pairs in sorted(users.items()):
        if len(pairs) > 1:
            said = "; ".join(
                f"network_name {nn!r} with range {r} (NAD {', '.join(sorted(set(nads)))})"
                for (nn, r), nads in sorted(pairs.items())
            )
            found.append(
                Finding(
                    AMBIGUOUS,
                    f"IPPool {name}",
                    f"two networks map to this one pool: {said}; whereabouts-py refuses the one whose "
                    "range the pool does not record (code 103): give one of them another network_name",
                )
            )
            continue
        (nn, cidr), nads = next(iter(pairs.items()))
        held = _network_of(recorded.get(name)) if name in recorded else None
        if held is not None and held != IPNetwork(cidr):  # unreadable: judge_pool says so
            found.append(
                Finding(
                    AMBIGUOUS,
                    f"IPPool {name}",
                    f"records range {recorded[name]}, but NAD {', '.join(sorted(set(nads)))} "
                    f"(network_name {nn!r}) reads it as range {cidr}: Go Whereabouts reads its offsets in "
                    "the wrong range, whereabouts-py refuses the pool (code 103)",
                )
            )
    return found


def _name_fits(name: str, network: IPNetwork) -> bool:
    bare = pool_name(str(network))
    return name == bare or name.endswith("-" + bare)


def judge_pool(pool: Mapping[str, Any]) -> list[Finding]:
    _, name = _meta(pool)
    subject = f"IPPool {name}"
    spec = _spec(pool)
    network = _network_of(spec.get("range"))
    if network is None:
        return [Finding(UNREADABLE_POOL, subject, f"spec.range {spec.get('range')!r} is not a CIDR")]
    found: list[Finding] = []
    if not _name_fits(name, network):
        found.append(
            Finding(
                AMBIGUOUS,
                subject,
                f"records range {spec.get('range')}, which is not the range its name stands for: "
                "whereabouts-py never allocates from it (code 103)",
            )
        )
    allocations = spec.get("allocations") or {}
    if not isinstance(allocations, Mapping):
        return [*found, Finding(UNREADABLE_POOL, subject, "spec.allocations is not an object")]
    first, last = usable_bounds(network)
    for key, value in sorted(allocations.items(), key=lambda kv: (len(str(kv[0])), str(kv[0]))):
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            found.append(
                Finding(
                    UNREADABLE_POOL,
                    subject,
                    f"allocation key {key!r} is not a decimal offset: Go Whereabouts skips it, whereabouts-py "
                    "refuses the whole pool (code 101) until it is removed",
                )
            )
            continue
        try:
            lease = Lease.from_json(value)
        except ValueError as exc:
            found.append(Finding(UNREADABLE_POOL, subject, f"allocation {key}: {exc}"))
            continue
        offset = int(key)
        if not first <= int(network.first) + offset <= last:
            where = (
                str(IPAddress(int(network.first) + offset, network.version)) if offset < network.size else "-"
            )
            found.append(
                Finding(
                    LEASE_OUT,
                    subject,
                    f"offset {offset} (address {where}) is outside the usable addresses of {network}: "
                    "whereabouts-py keeps it and ipamctl check reports it out-of-range",
                )
            )
        if not lease.podref:
            found.append(
                Finding(
                    NO_PODREF,
                    subject,
                    f"offset {offset} (container {lease.id or '-'}) names no pod: whereabouts-py cannot tell "
                    "whether it is in use and never releases it by itself (ipamctl release --force does)",
                )
            )
    return found


def _readings(name: str, nets: Sequence[Network]) -> list[tuple[str, str]]:
    """Every (network_name, address) of the NADs' networks whose reservation name is `name`."""
    out: list[tuple[str, str]] = []
    for net in nets:
        nn = net.network_name
        if nn and not name.startswith(nn + "-"):
            continue
        text = name[len(nn) + 1 :] if nn else name
        try:
            address = IPAddress(text if "." in text else text.replace("-", ":"))
        except (AddrFormatError, ValueError, TypeError):
            continue
        reading = (nn, str(address))
        if (
            reservation_name(address, nn) == name
            and any(address in r for r in _ranges(net))
            and reading not in out
        ):
            out.append(reading)
    return out


def judge_reservations(reservations: Sequence[Mapping[str, Any]], nets: Sequence[Network]) -> list[Finding]:
    names = {n.network_name for n in nets}
    found: list[Finding] = []
    for _, name in map(_meta, reservations):
        subject = f"OverlappingRangeIPReservation {name}"
        if reservation_address(name, names) == ("", ""):
            found.append(
                Finding(
                    BAD_RESERVATION,
                    subject,
                    "the name is no address (with or without a network_name prefix): whereabouts-py never "
                    "matches it to a lease and ipamctl check reports it as an orphan",
                )
            )
            continue
        readings = _readings(name, nets)
        if len(readings) > 1:
            said = "; ".join(f"{a} of network_name {nn!r}" for nn, a in readings)
            found.append(
                Finding(
                    AMBIGUOUS,
                    subject,
                    f"the name reserves two networks' addresses: {said}; one network's pod blocks the other's "
                    "address: give one of them another network_name",
                )
            )
    return found


def judge_node_slices(node_slices: Sequence[Mapping[str, Any]], nets: Sequence[Network]) -> list[Finding]:
    by_name = {_meta(p)[1]: _spec(p) for p in node_slices}
    found: list[Finding] = []
    for net in nets:
        size = net.ipam.get("node_slice_size")
        ranges = _ranges(net)
        name = node_slice_pool_name(net.network_name, net.name)
        if not size or not ranges or name not in by_name:
            continue
        spec = by_name[name]
        theirs = (_network_of(spec.get("range")), str(spec.get("sliceSize") or "").strip().lstrip("/"))
        ours = (ranges[0], str(size).strip().lstrip("/"))
        if theirs != ours:
            found.append(
                Finding(
                    SLICES_DIFFER,
                    f"NodeSlicePool {name}",
                    f"cuts {spec.get('range')} into /{theirs[1]}, but NAD {net.nad} asks for "
                    f"{ranges[0]} in /{ours[1]}: Go Whereabouts' controller re-cuts it, whereabouts-py "
                    "refuses the network's ADDs (code 103) until the two agree",
                )
            )
    return found


def judge(cluster: Cluster) -> list[Finding]:
    """Everything whereabouts-py would read differently from Go Whereabouts, in a stable order."""
    found: list[Finding] = []
    nets: list[Network] = []
    for nad in sorted(cluster.nads, key=_meta):
        for net, version in networks(nad):
            nets.append(net)
            found += judge_network(net, version)
    found += judge_names(nets, cluster.pools)
    for pool in sorted(cluster.pools, key=_meta):
        found += judge_pool(pool)
    found += judge_reservations(sorted(cluster.reservations, key=_meta), nets)
    found += judge_node_slices(cluster.node_slices, nets)
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted(found, key=lambda f: order[f.kind])


def summary(found: Sequence[Finding]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for f in found:
        counts[f.kind] = counts.get(f.kind, 0) + 1
    return counts
