"""Address ranges: parse the Whereabouts range forms and answer which addresses are allocatable.

Pure logic over `netaddr`; knows nothing about leases or storage. A range is turned into a sorted
list of inclusive integer intervals, so callers never walk a /8 address by address.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from hashlib import sha256

from netaddr import AddrFormatError, IPAddress, IPNetwork, IPRange, IPSet

from .bytecache import ByteLRU, deep_size

# Computed intervals kept by the node agent, bounded by bytes (a tenant's config with thousands of
# excludes costs ~130 bytes an interval); keys are digests, so a cached entry holds no config objects.
CACHE_BYTES = 16 << 20
_INTERVALS: ByteLRU[tuple[tuple[int, int], ...]] = ByteLRU(CACHE_BYTES)


class RangeConfigError(ValueError):
    """A range setting is unusable; `key` names the config key, `value` what was given."""

    def __init__(self, key: str, value: object, reason: str) -> None:
        super().__init__(f"{key}: {value!r} {reason}")
        self.key = key
        self.value = value
        self.reason = reason


@dataclass(frozen=True)
class RangeSpec:
    """One allocatable range: the network it belongs to and the addresses that may be handed out."""

    network: IPNetwork
    start: int
    end: int
    exclude: tuple[IPNetwork, ...] = ()
    gateway: IPAddress | None = None
    intervals: tuple[tuple[int, int], ...] = field(default=(), compare=False)

    @property
    def version(self) -> int:
        return int(self.network.version)

    @property
    def cidr(self) -> str:
        return str(self.network.cidr)

    @property
    def prefixlen(self) -> int:
        return int(self.network.prefixlen)

    def size(self) -> int:
        """How many addresses this range can hand out in total."""
        return sum(hi - lo + 1 for lo, hi in self.intervals)

    def contains(self, value: int) -> bool:
        return any(lo <= value <= hi for lo, hi in self.intervals)

    def offset_of(self, value: int) -> int:
        return value - int(self.network.first)

    def address_at(self, offset: int) -> IPAddress:
        return IPAddress(int(self.network.first) + offset, self.version)

    @cached_property
    def key(self) -> bytes:
        """A digest of what decides the allocatable addresses (a short cache key; computed once)."""
        net = self.network
        text = repr((net.version, net.value, net.prefixlen, self.start, self.end, self.intervals))
        return sha256(text.encode()).digest()

    def describe(self) -> str:
        first = IPAddress(self.start, self.version)
        last = IPAddress(self.end, self.version)
        return f"{self.cidr} ({first}-{last})"


def refusal(spec: RangeSpec, address: IPAddress) -> str | None:
    """Why `address` (inside `spec.network`) may not be handed out from `spec`, or None when it may."""
    value = int(address)
    if spec.contains(value):
        return None
    if spec.gateway is not None and value == int(spec.gateway):
        return "it is the gateway"
    for excluded in spec.exclude:
        if address in excluded:
            return f"it is excluded ({excluded})"
    first, last = usable_bounds(spec.network)
    if not first <= value <= last:
        return f"it is the network or broadcast address of {spec.cidr}"
    return f"it is outside range_start..range_end ({IPAddress(spec.start, spec.version)}-{IPAddress(spec.end, spec.version)})"


def usable_bounds(network: IPNetwork) -> tuple[int, int]:
    """First and last address a host may hold in `network`.

    IPv4 /31 (RFC 3021) and /32, IPv6 /127 (RFC 6164) and /128 use every address. Shorter prefixes
    lose the network address and the last one; for IPv6 that is the subnet-router anycast address
    and, as in Whereabouts, the all-ones address, so offsets stay identical to Whereabouts'.
    """
    first, last = int(network.first), int(network.last)
    host_bits = (32 if network.version == 4 else 128) - int(network.prefixlen)
    if host_bits <= 1:
        return first, last
    return first + 1, last - 1


def parse_ip(key: str, value: str) -> IPAddress:
    try:
        if "/" in value or not value.strip():
            raise AddrFormatError(value)
        return IPAddress(value.strip())
    except (AddrFormatError, ValueError, TypeError):
        raise RangeConfigError(key, value, "is not an IP address") from None


def parse_cidr(key: str, value: str) -> IPNetwork:
    """A CIDR (host bits allowed, they name the network) or a single address (a /32 or /128)."""
    try:
        text = value.strip()
        if "/" in text:
            addr_text, _, plen_text = text.partition("/")
            IPAddress(addr_text)  # netaddr accepts shorthand like "10/8"; we do not
            if not (plen_text.isascii() and plen_text.isdigit()):
                raise AddrFormatError(text)
        else:
            IPAddress(text)
        return IPNetwork(text)
    except (AddrFormatError, ValueError, TypeError):
        raise RangeConfigError(key, value, "is not a valid CIDR or IP address") from None


def _split_range(key: str, value: str) -> tuple[IPNetwork, IPAddress | None, IPAddress | None]:
    """`CIDR` or Whereabouts' `A-B/prefix` form (A first address, B/prefix last address + network)."""
    if "-" in value:
        first_text, _, rest = value.partition("-")
        if "/" not in rest:
            raise RangeConfigError(key, value, "must be a CIDR or 'first-last/prefix'")
        try:
            first = parse_ip(key, first_text)
            network = parse_cidr(key, rest)
        except RangeConfigError as exc:  # name the whole value, not the part that failed
            raise RangeConfigError(key, value, f"is not 'first-last/prefix': {exc}") from None
        last = IPAddress(network.ip)
        if first.version != network.version:
            raise RangeConfigError(key, value, "mixes IPv4 and IPv6 addresses")
        return network, first, last
    if "/" not in value:
        raise RangeConfigError(key, value, "must be a CIDR (address/prefix)")
    return parse_cidr(key, value), None, None


def build_range(
    key: str,
    range_text: str,
    range_start: str | None = None,
    range_end: str | None = None,
    exclude: Sequence[str] = (),
    gateway: IPAddress | None = None,
) -> RangeSpec:
    """Validate one range entry and compute its allocatable intervals.

    `key` is the config path of the entry (e.g. `ipam.ipRanges[1]`) so errors name the exact key.
    """
    network, dash_first, dash_last = _split_range(f"{key}.range", range_text)
    network = network.cidr
    # A bound taken from the `A-B/prefix` form is reported as the range key with the whole range text.
    start_key, start_shown = (
        (f"{key}.range_start", range_start) if range_start else (f"{key}.range", range_text)
    )
    end_key, end_shown = (f"{key}.range_end", range_end) if range_end else (f"{key}.range", range_text)
    first_usable, last_usable = usable_bounds(network)

    start_ip = parse_ip(start_key, range_start) if range_start else dash_first
    end_ip = parse_ip(end_key, range_end) if range_end else dash_last
    start, end = first_usable, last_usable
    for k, shown, ip in ((start_key, start_shown, start_ip), (end_key, end_shown, end_ip)):
        if ip is None:
            continue
        if ip.version != network.version:
            raise RangeConfigError(k, shown, f"is not the same IP family as range {network}")
        if ip not in network:
            raise RangeConfigError(k, shown, f"is outside range {network}")
    if start_ip is not None:
        start = max(int(start_ip), first_usable)
    if end_ip is not None:
        end = min(int(end_ip), last_usable)
    if start > end:
        raise RangeConfigError(
            start_key,
            start_shown if start_ip is not None else str(IPAddress(start, network.version)),
            f"is after range_end {end_ip if end_ip is not None else IPAddress(end, network.version)}",
        )

    excluded: list[IPNetwork] = []
    for i, text in enumerate(exclude):
        ex = parse_cidr(f"{key}.exclude[{i}]", text)
        if ex.version != network.version:
            raise RangeConfigError(
                f"{key}.exclude[{i}]", text, f"is not the same IP family as range {network}"
            )
        excluded.append(ex.cidr)

    if gateway is not None and gateway.version != network.version:
        gateway = None
    intervals = allocatable_intervals(network.version, start, end, excluded, gateway)
    return RangeSpec(network, start, end, tuple(excluded), gateway, intervals)


def allocatable_intervals(
    version: int, start: int, end: int, exclude: Iterable[IPNetwork], gateway: IPAddress | None
) -> tuple[tuple[int, int], ...]:
    """The [first, last] runs of `start`..`end` outside `exclude` and `gateway` (cached: the node agent
    builds every call's ranges anew, and the set arithmetic is most of that cost, ~1 ms a call)."""
    exclude = tuple(exclude)
    gw = None if gateway is None else (gateway.version, int(gateway))  # 0.0.0.0 is falsy in netaddr
    digest = sha256(repr((version, start, end, gw)).encode())
    for ex in exclude:  # version and host bits too: look-alike inputs get their own answers
        digest.update(b"%d/%d/%d;" % (ex.version, ex.value, ex.prefixlen))
    key = digest.digest()
    found = _INTERVALS.get(key)
    if found is None:
        found = compute_intervals(version, start, end, exclude, gateway)
        _INTERVALS.put(key, found, deep_size(found))
    return found


def compute_intervals(
    version: int, start: int, end: int, exclude: tuple[IPNetwork, ...], gateway: IPAddress | None
) -> tuple[tuple[int, int], ...]:
    allowed = IPSet(IPRange(IPAddress(start, version), IPAddress(end, version)))
    removed = IPSet(exclude)
    if gateway is not None:
        removed.add(gateway)
    allowed -= removed
    return tuple((int(r.first), int(r.last)) for r in allowed.iter_ipranges())


def _valid_start(name: str) -> str:
    # An IPv6 text starting with '::' gives a name starting with '-', which Kubernetes refuses (names
    # start with a letter or digit). Whereabouts has that bug; we write the '::' as '0::' there, as
    # Whereabouts already does for a trailing '::'. Names Whereabouts can create are unchanged.
    return "0" + name if name.startswith("-") else name


def pool_name(cidr: str, network_name: str = "") -> str:
    """Whereabouts' IPPool name: the CIDR with ':' and '/' turned into '-', prefixed by the network name."""
    text = cidr + "0" if cidr.endswith(":") else cidr
    normalized = text.replace(":", "-").replace("/", "-")
    return f"{network_name}-{normalized}" if network_name else _valid_start(normalized)


def same_network(recorded: str, wanted: str) -> bool:
    """Whether a range as a pool records it names the same network as `wanted` (spelling and host bits
    aside); a recorded text that is not a CIDR matches only itself."""
    if recorded == wanted:
        return True
    try:
        return bool(IPNetwork(recorded).cidr == IPNetwork(wanted).cidr)
    except (AddrFormatError, ValueError, TypeError):
        return False


def pool_name_readings(name: str) -> list[tuple[str, IPNetwork]]:
    """Every (network_name, range) whose `pool_name` is `name`. More than one range: the name is
    shared by ranges of different networks (an IPv6 range whose text, ':' turned into '-', can
    continue a network name), and only the pool's recorded range tells which one it holds."""
    out: list[tuple[str, IPNetwork]] = []
    starts = [0] + [i + 1 for i, ch in enumerate(name) if ch == "-"]
    for start in starts:
        prefix, rest = (name[: start - 1], name[start:]) if start else ("", name)
        head, sep, plen = rest.rpartition("-")
        if not sep or not head or not (plen.isascii() and plen.isdigit()):
            continue
        # an IPv4 head has no '-'; an IPv6 one may end in a dotted quad (netaddr prints ::ffff:10.0.0.0)
        text = f"{head.replace('-', ':')}/{plen}"
        try:
            network = IPNetwork(text).cidr
        except (AddrFormatError, ValueError, TypeError):
            continue
        if pool_name(str(network), prefix) == name and (prefix, network) not in out:
            out.append((prefix, network))
    return out


def reservation_name(ip: IPAddress, network_name: str = "") -> str:
    """Whereabouts' OverlappingRangeIPReservation name for an address."""
    text = str(ip).replace(":", "-")
    if text.endswith("-"):
        text += "0"
    return f"{network_name}-{text}" if network_name else _valid_start(text)
