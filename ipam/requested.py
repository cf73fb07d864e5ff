"""Exact addresses an ADD asks for (docs/requested-and-sticky-addresses.md); pure, no I/O.

- requested: `runtimeConfig.ips` (the `ips` capability: Multus passes the network selection element's
  `ips`). Each is the attachment's address in the range holding it; one the range may not hand out
  is refused here, one another attachment holds is refused by the allocator.
- static: Whereabouts' `addresses: [{address, gateway}]` and CNI_ARGS `IP=a,b` / `GATEWAY=g`. Added to
  the result as Whereabouts adds them (after the ranges' addresses, each with its own prefix and the
  gateway it names, `GATEWAY=` going to every one whose network contains it); one inside a range is
  also recorded as a lease of that range, so that no other pod is given it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from netaddr import AddrFormatError, IPAddress, IPNetwork

from . import errors
from .allocator import REQUESTED, STATIC
from .engine import Want
from .errors import CNIError
from .ranges import RangeSpec, refusal, usable_bounds


@dataclass(frozen=True)
class Static:
    """One static address: its address, its network (the prefix it was written with), its gateway."""

    address: IPAddress
    network: IPNetwork
    gateway: IPAddress | None = None

    def result(self, old: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {"address": f"{self.address}/{self.network.prefixlen}"}
        if old:
            entry["version"] = str(self.address.version)
        if self.gateway is not None:
            entry["gateway"] = str(self.gateway)
        return entry


def _address(key: str, text: object, code: int) -> tuple[IPAddress, IPNetwork | None]:
    """`a.b.c.d` or `a.b.c.d/p` -> (address, network or None)."""
    try:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(text)
        addr_text, slash, plen = text.strip().partition("/")
        address = IPAddress(addr_text)
        if not slash:
            return address, None
        if not (plen.isascii() and plen.isdigit()):
            raise ValueError(text)
        return address, IPNetwork(f"{address}/{plen}")
    except (AddrFormatError, ValueError, TypeError):
        raise CNIError(code, f"invalid {key}: {errors.shown(text)} is not an IP address or CIDR") from None


def _range_of(ranges: Sequence[RangeSpec], address: IPAddress) -> RangeSpec | None:
    return next(
        (spec for spec in ranges if address.version == spec.version and address in spec.network), None
    )


def requested_wants(runtime_config: Mapping[str, Any], ranges: Sequence[RangeSpec]) -> list[Want]:
    """`runtimeConfig.ips` as exact addresses of the ranges; a prefix written with one is not used
    (the result carries the range's). Refused (code 7) when it is not in a range, not allocatable
    there, or a second request for one range."""
    raw = runtime_config.get("ips")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise CNIError(
            errors.INVALID_CONFIG, f"invalid config: runtimeConfig.ips: {errors.shown(raw)} is not a list"
        )
    wants: list[Want] = []
    for i, item in enumerate(raw):
        key = f"runtimeConfig.ips[{i}]"
        address, _ = _address(f"config: {key}", item, errors.INVALID_CONFIG)
        spec = _range_of(ranges, address)
        why = "it lies outside every range of this network" if spec is None else refusal(spec, address)
        if spec is not None and any(w.spec == spec for w in wants):
            why = f"range {spec.cidr} already has a requested address (one address per range)"
        if why is not None:
            raise CNIError(
                errors.INVALID_CONFIG,
                f"invalid config: {key}: requested address {address} is refused: {why}",
                "ranges: " + ", ".join(spec.describe() for spec in ranges),
            )
        assert spec is not None
        wants.append(Want(spec, spec.offset_of(int(address)), REQUESTED))
    return wants


MAX_IP_ARGS = 64  # CNI_ARGS IP=: as many as ipam.addresses may list (config.LIMITS)


def statics(addresses: Sequence[Mapping[str, Any]], cni_args: Mapping[str, str]) -> list[Static]:
    """Whereabouts' static addresses: `ipam.addresses`, then CNI_ARGS `IP=` (comma-separated CIDRs);
    CNI_ARGS `GATEWAY=` sets the gateway of every one whose network holds it."""
    out: list[Static] = []
    for i, entry in enumerate(addresses):
        address, network = _address(
            f"config: ipam.addresses[{i}].address", entry.get("address"), errors.INVALID_CONFIG
        )
        if network is None:
            raise CNIError(
                errors.INVALID_CONFIG,
                f"invalid config: ipam.addresses[{i}].address: {errors.shown(entry.get('address'))} is not a CIDR",
            )
        gateway = None
        if entry.get("gateway"):
            gateway, _ = _address(
                f"config: ipam.addresses[{i}].gateway", entry["gateway"], errors.INVALID_CONFIG
            )
        out.append(Static(address, network, gateway))
    listed = [t for t in (t.strip() for t in cni_args.get("IP", "").split(",")) if t]
    if len(listed) > MAX_IP_ARGS:
        raise CNIError(
            errors.INVALID_ENV,
            f"invalid CNI_ARGS IP: {len(listed)} addresses, more than the limit of {MAX_IP_ARGS}",
        )
    for item in listed:
        address, network = _address("CNI_ARGS IP", item, errors.INVALID_ENV)
        if network is None:
            raise CNIError(errors.INVALID_ENV, f"invalid CNI_ARGS IP: {errors.shown(item)} is not a CIDR")
        out.append(Static(address, network))
    for item in filter(None, (t.strip() for t in cni_args.get("GATEWAY", "").split(","))):
        gateway, network = _address("CNI_ARGS GATEWAY", item, errors.INVALID_ENV)
        if network is not None:
            raise CNIError(
                errors.INVALID_ENV, f"invalid CNI_ARGS GATEWAY: {errors.shown(item)} is not an IP address"
            )
        out = [Static(s.address, s.network, gateway) if gateway in s.network else s for s in out]
    return out


def static_wants(static: Sequence[Static], ranges: Sequence[RangeSpec]) -> list[Want]:
    """The static addresses to record: those inside a range's usable addresses (not its network or
    broadcast address). One the range excludes, or its gateway, is recorded too: two pods given the
    same static address would otherwise both have it."""
    wants: list[Want] = []
    for s in static:
        spec = _range_of(ranges, s.address)
        if spec is None:
            continue
        first, last = usable_bounds(spec.network)
        offset = spec.offset_of(int(s.address))
        if first <= int(s.address) <= last and all(w.spec != spec or w.offset != offset for w in wants):
            wants.append(Want(spec, offset, STATIC))
    return wants
