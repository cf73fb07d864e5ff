"""Overlapping-range reservations of one engine (`ipam.engine`): one per address and network
(`ranges.reservation_name`), claimed after each pool write and given back on DEL, GC, a rollback,
and when a repeated ADD moved a lease to another address."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from netaddr import AddrFormatError, IPAddress

from . import errors
from .allocator import STATIC, Lease
from .errors import CNIError
from .log import log
from .ranges import RangeSpec, reservation_name
from .store.base import Store

if TYPE_CHECKING:
    from .engine import AddOp


def taken_error(address: IPAddress, kind: str, holder: Lease, where: str) -> CNIError:
    who = f"pod {holder.podref}" if holder.podref else f"container {holder.id}"
    if holder.retained:
        who += " (retained for it after its DEL: sticky)"
    return CNIError(
        errors.ADDRESS_TAKEN,
        f"{'static' if kind == STATIC else 'requested'} address {address} is not available: it is held by {who}",
        f"{where}; interface {holder.ifname or '-'}",
    )


@dataclass(frozen=True)
class Reservations:
    """An engine's reservations (`Engine.reservations`); none are kept without `overlapping`."""

    store: Store
    network_name: str
    overlapping: bool
    retry: Callable[[str, float, Callable[[], bool]], None]  # the engine's retry loop

    def reserve_batch(self, name: str, ops: Sequence[AddOp], deadline: float) -> list[AddOp]:
        """Claim the reservation of every address just written; returns the ops that collided."""
        collided: list[AddOp] = []
        if not self.overlapping:
            return collided
        for op in ops:
            if op.error is not None or op.offset is None:
                continue
            address = op.spec.address_at(op.offset)
            rname = reservation_name(address, self.network_name)
            try:
                holder = self.reserve(rname, op.request.lease(), str(address), deadline)
            except CNIError as exc:  # this op's failure alone; its lease goes with its rollback
                op.offset, op.error = None, exc
                continue
            if holder is not None:
                log.info("address.reserved-elsewhere", pool=name, reservation=rname, holder=holder.podref)
                if op.want is not None:  # that very address was asked for: no other will do
                    address = op.spec.address_at(op.offset)
                    op.offset, op.error = (
                        None,
                        taken_error(address, op.request.kind, holder, f"reservation {rname}"),
                    )
                    continue
                op.skip.add(op.offset)
                collided.append(op)
        return collided

    def unreserve_moved(self, name: str, ops: Sequence[AddOp], deadline: float) -> None:
        """Give back the reservations of leases a re-ADD moved to another address (quietly: the
        orphan sweep is the backstop), unless the attachment got that same address back."""
        if not self.overlapping:
            return
        for op in ops:
            if op.error is not None:
                continue
            for offset, old in op.moved:
                if offset == op.offset:
                    continue
                rname = reservation_name(op.spec.address_at(offset), self.network_name)
                log.info("lease.moved", pool=name, reservation=rname, to=op.offset)
                self.unreserve_name(rname, old.id, old.ifname, deadline, quiet=True)

    def reserve(self, rname: str, lease: Lease, address: str, deadline: float) -> Lease | None:
        """store.reserve inside the retry loop; the other holder, or None when it is ours now."""
        holder: list[Lease | None] = [None]

        def step() -> bool:
            holder[0] = self.store.reserve(rname, lease, address)
            return True

        self.retry(rname, deadline, step)
        return holder[0]

    def unreserve_name(
        self, rname: str, container_id: str, ifname: str, deadline: float, quiet: bool
    ) -> None:
        def step() -> bool:
            self.store.unreserve(rname, container_id, ifname)
            return True

        try:
            self.retry(rname, deadline, step)
        except CNIError as exc:
            if not quiet:
                raise
            # an orphaned reservation only blocks its address until the reconciler removes it
            log.error("reservation.release-failed", reservation=rname, error=str(exc))

    def unreserve(
        self, spec: RangeSpec, offsets: list[int], container_id: str, ifname: str, deadline: float
    ) -> None:
        if not self.overlapping:
            return
        for offset in offsets:
            rname = reservation_name(spec.address_at(offset), self.network_name)
            self.unreserve_name(rname, container_id, ifname, deadline, quiet=False)

    def held(self, spec: RangeSpec, container_id: str, ifname: str) -> list[str]:
        """Reservations of `spec`'s addresses still held by this attachment, when the store can list
        them by holder cheaply (the file store); the Kubernetes store's orphans wait for the sweep."""
        held_by = getattr(self.store, "reservations_held_by", None)
        if not self.overlapping or held_by is None:
            return []
        held: list[tuple[str, str]] = held_by(container_id, ifname)
        prefix = f"{self.network_name}-" if self.network_name else ""
        out = []
        for rname, recorded in held:
            if not rname.startswith(prefix):
                continue
            text = rname[len(prefix) :]
            try:
                address = IPAddress(text if spec.version == 4 else text.replace("-", ":"), spec.version)
            except (ValueError, TypeError, AddrFormatError):
                continue
            # one recording another address is another network's by the same name (ADDRESS_ANNOTATION)
            if recorded and recorded != str(address):
                continue
            if address in spec.network and reservation_name(address, self.network_name) == rname:
                out.append(rname)
        return out
