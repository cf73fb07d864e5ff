"""ipamctl: see, check and repair whereabouts-py's address pools from a terminal.

Parses the command line, reads the datastore once (`reconcile.gather`), asks `ipam.audit` what it
means and prints it as an aligned table (colour only on a terminal) or JSON. Writes go through the
engine's conditional writes (`reconcile.Reconciler`), exactly as DEL and `ipam-reconcile` make them.

Exit codes: 0 ok, 1 problems found or refused, 2 could not run (a message on stderr names what failed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from netaddr import AddrFormatError, IPAddress

from . import audit, compat
from .audit import Holding, Inventory, PoolView
from .errors import CNIError, ConflictError, TransientStoreError
from .log import log
from .printable import printable
from .reconcile import FileSource, KubeSource, Reconciler, Source, gather

DEFAULT_DATA_DIR = "/var/lib/cni/whereabouts-py"
OK, PROBLEMS, FAILED = 0, 1, 2


class Failure(Exception):
    """ipamctl could not run: the message says what failed (exit 2)."""


# -- output ---------------------------------------------------------------------------------------

RED, YELLOW, GREEN, BOLD, RESET = "\033[31m", "\033[33m", "\033[32m", "\033[1m", "\033[0m"


@dataclass
class Output:
    out: TextIO
    err: TextIO
    json: bool
    colour: bool

    def paint(self, text: str, colour: str) -> str:
        return f"{colour}{text}{RESET}" if self.colour and colour else text

    def write(self, text: str = "") -> None:
        """One line of the table output; cluster-written text in it is made printable (ipam.printable)."""
        self.out.write(printable(text) + "\n")

    def dump(self, doc: Any) -> None:
        self.out.write(json.dumps(doc, indent=2) + "\n")

    def table(
        self, headers: Sequence[str], rows: Sequence[Sequence[str]], colours: Sequence[str] = ()
    ) -> None:
        """Left-aligned columns two spaces apart; a row's colour wraps it after padding, so it never
        shifts the columns."""
        rows = [[printable(c) for c in r] for r in rows]
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

        self.out.write(self.paint(line(headers), BOLD) + "\n")
        for i, row in enumerate(rows):
            self.out.write(self.paint(line(row), colours[i] if i < len(colours) else "") + "\n")


def usage_bar(used: int, size: int, width: int = 10) -> str:
    share = used / size if size else 0.0
    filled = min(width, round(share * width))
    return f"[{'#' * filled}{'.' * (width - filled)}] {round(share * 100):3d}%"


def _nodes(view: PoolView) -> str:
    return ",".join(f"{node or '-'}:{count}" for node, count in view.nodes().items())


def lease_json(h: Holding) -> dict[str, str]:
    """A lease; `state` (retained, requested, static) and `retention` only when it has them."""
    out = {
        "address": h.address,
        "podref": h.lease.podref,
        "id": h.lease.id,
        "ifname": h.lease.ifname,
        "node": h.lease.node,
    }
    if h.lease.retained:
        out.update(state="retained", retention=audit.retention_note(h.lease), released=h.lease.retained)
    elif h.lease.kind:
        out["state"] = h.lease.kind
    return out


def _write_retained(o: Output, held: Sequence[Holding]) -> None:
    """The retained leases among `held` (sticky): kept for a pod name after its DEL."""
    rows = [
        [h.address, h.pool.name, "retained", h.lease.podref, audit.retention_note(h.lease)]
        for h in held
        if h.lease.retained
    ]
    if rows:
        o.write()
        o.table(["ADDRESS", "POOL", "STATE", "PODREF", "KEPT"], rows)


# -- commands -------------------------------------------------------------------------------------


def cmd_show(args: argparse.Namespace, source: Source, o: Output) -> int:
    inventory = gather(source)
    views = audit.pool_views(inventory)
    if args.address is not None or args.pod is not None:
        return _show_holder(args, inventory, views, o)
    views.sort(key=lambda v: (v.network, v.node, v.name))
    if o.json:
        o.dump(
            {
                "pools": [
                    {
                        "name": v.name,
                        "range": v.snapshot.cidr,
                        "network": v.network,
                        "node": v.node,
                        "used": v.used(),
                        "free": v.free(),
                        "leases": [lease_json(h) for h in audit.holdings([v])],
                    }
                    for v in views
                ]
            }
        )
        return OK
    rows, colours = [], []
    for v in views:
        share = v.used() / v.size if v.size else 0.0
        rows.append(
            [
                v.name,
                v.snapshot.cidr,
                v.network,
                v.node,
                str(v.used()),
                str(v.free()),
                usage_bar(v.used(), v.size),
                _nodes(v),
            ]
        )
        colours.append(RED if share >= 0.9 else YELLOW if share >= 0.75 else "")
    o.table(["NAME", "RANGE", "NETWORK", "NODE", "USED", "FREE", "USAGE", "NODES"], rows, colours)
    if not views:
        o.write("(no pools)")
    _write_retained(o, audit.holdings(views))
    return OK


def _show_holder(args: argparse.Namespace, inventory: Inventory, views: list[PoolView], o: Output) -> int:
    """Leases holding an address (or of a pod) with their reservations; a reservation no lease backs
    is listed too, since it blocks the address as well."""
    reservations = {r.name: r for r in inventory.reservations}
    if args.address is not None:
        address = parse_address(args.address)
        held = audit.find_address(views, address, args.network)
        found = audit.find_reservations(inventory, views, address=address, network=args.network)
        what = {"address": address}
    else:
        held = audit.find_pod(views, args.pod)
        found = audit.find_reservations(inventory, views, podref=args.pod)
        what = {"pod": args.pod}
    entries = []
    for h in held:
        r = reservations.get(h.reservation)
        entries.append(
            {
                "pool": h.pool.name,
                "network": h.pool.network,
                **lease_json(h),
                "reservation": r.name if r else "",
                "reservation_podref": r.holder.podref if r else "",
            }
        )
    shown = {e["reservation"] for e in entries}
    alone = [
        {
            "name": r.name,
            "address": audit.reservation_address(r.name, {v.network for v in views})[1],
            "podref": r.holder.podref,
            "id": r.holder.id,
            "ifname": r.holder.ifname,
        }
        for r in found
        if r.name not in shown
    ]
    if o.json:
        o.dump({**what, "leases": entries, "reservations_without_lease": alone})
    else:
        rows = [
            [
                e["address"],
                e["pool"],
                e["podref"],
                e["id"],
                e["ifname"],
                e["node"],
                e["reservation"] or "(none)",
            ]
            for e in entries
        ]
        rows += [[r["address"], "-", r["podref"], r["id"], r["ifname"], "", r["name"]] for r in alone]
        o.table(["ADDRESS", "POOL", "PODREF", "CONTAINER", "IFNAME", "NODE", "RESERVATION"], rows)
        if not rows:
            o.write(f"nothing holds {next(iter(what.values()))}")
        _write_retained(o, held)
    return OK if entries or alone else PROBLEMS


def cmd_check(args: argparse.Namespace, source: Source, o: Output) -> int:
    if args.whereabouts_compat:
        return cmd_compat(args, source, o)
    inventory = gather(source)
    problems = audit.audit(inventory, datetime.now(UTC), args.grace)
    notes = list(inventory.notes)
    counts = audit.summary(problems)
    if o.json:
        doc: dict[str, Any] = {"problems": [p.to_json() for p in problems], "summary": counts}
        if notes:
            doc["notes"] = notes
        o.dump(doc)
    else:
        if problems:
            rows = [[p.kind, p.pool, p.address, p.podref, p.detail] for p in problems]
            colours = [YELLOW if p.warning else RED for p in problems]
            o.table(["KIND", "POOL", "ADDRESS", "PODREF", "DETAIL"], rows, colours)
            o.write()
        total = sum(len(v.snapshot.allocations) for v in audit.pool_views(inventory))
        found = " ".join(f"{k}={n}" for k, n in counts.items()) or "no problems"
        o.write(
            f"checked pools={len(inventory.pools)} leases={total} reservations={len(inventory.reservations)}: {found}"
        )
        for note in notes:
            o.write(f"note: {note}")
    return PROBLEMS if any(not p.warning for p in problems) else OK


def cmd_compat(args: argparse.Namespace, source: Source, o: Output) -> int:
    """check --whereabouts-compat: what whereabouts-py would read differently in this cluster."""
    if not isinstance(source, KubeSource):
        raise Failure(
            "--whereabouts-compat reads a Kubernetes cluster (NADs and pools): not --datastore file"
        )
    from .store.kubernetes import NODE_SLICES, POOLS, RESERVATIONS

    kube = source.kube
    cluster = compat.Cluster(
        nads=kube.list_network_attachments(args.nad_namespace),
        pools=kube.list_objects(POOLS),
        reservations=kube.list_objects(RESERVATIONS),
        node_slices=kube.list_objects(NODE_SLICES),
    )
    found = compat.judge(cluster)
    counts = compat.summary(found)
    nets = sum(1 for nad in cluster.nads for _ in compat.networks(nad))
    checked = {
        "network_attachment_definitions": len(cluster.nads),
        "whereabouts_networks": nets,
        "ippools": len(cluster.pools),
        "reservations": len(cluster.reservations),
        "node_slice_pools": len(cluster.node_slices),
    }
    if o.json:
        o.dump({"findings": [f.to_json() for f in found], "summary": counts, "checked": checked})
    else:
        width = max((len(f.kind) for f in found), default=0)
        for f in found:  # the detail on a line of its own: it says what to do, and is long
            o.write(f"{o.paint(f.kind.ljust(width), YELLOW)}  {f.subject}")
            o.write(f"  {f.detail}")
        if found:
            o.write()
        said = " ".join(f"{k}={n}" for k, n in counts.items()) or "nothing whereabouts-py reads differently"
        o.write(
            f"checked NADs={len(cluster.nads)} (whereabouts networks={nets}) IPPools={len(cluster.pools)} "
            f"reservations={len(cluster.reservations)} NodeSlicePools={len(cluster.node_slices)} "
            f"in {source.where}: {said}"
        )
    return PROBLEMS if found else OK


def cmd_release(args: argparse.Namespace, source: Source, o: Output) -> int:
    address = parse_address(args.ip)
    inventory = gather(source)
    held = audit.find_address(audit.pool_views(inventory), address, args.network)
    if not held:
        where = f" in network {args.network!r}" if args.network is not None else ""
        return _refuse(o, [f"no lease holds {address}{where}"], [])
    refusals = []
    for h in held:
        why = _holder_alive(h, inventory)
        if why and not args.force:
            refusals.append(f"{h.address} in pool {h.pool.name}: {why}; pass --force to release it anyway")
    if refusals:
        return _refuse(o, refusals, held)
    verb = "would-release" if args.dry_run else "release"
    done: list[Holding] = []
    if not args.dry_run:
        reconciler = Reconciler(source, 0.0, False, o.err)
        by_pool: dict[str, list[Holding]] = {}
        for h in held:
            by_pool.setdefault(h.pool.name, []).append(h)
        for group in by_pool.values():
            gone = reconciler.release_holdings(group)
            done += [h for h in group if h.offset in gone]
    else:
        done = list(held)
    changed = [h for h in held if h not in done]
    if o.json:
        o.dump(
            {
                "released" if not args.dry_run else "would_release": [
                    {"pool": h.pool.name, **lease_json(h)} for h in done
                ],
                "changed": [{"pool": h.pool.name, **lease_json(h)} for h in changed],
            }
        )
    else:
        for h in done:
            o.write(
                f"{verb} pool={_where(source)}{h.pool.name} address={h.address} podref={h.lease.podref} "
                f"container={h.lease.id}"
            )
        for h in changed:
            o.write(
                f"skip pool={_where(source)}{h.pool.name} address={h.address}: the lease changed since it was read"
            )
    return PROBLEMS if changed else OK


def _holder_alive(h: Holding, inventory: Inventory) -> str:
    """Why releasing this lease would take a live pod's address ("" when it would not)."""
    if h.lease.retained:
        return ""  # its DEL is done: it is only kept for the pod name (sticky)
    if inventory.pods is None:
        return f"cannot tell whether {h.lease.podref or 'its holder'} still runs (the file datastore has no pod list)"
    if not h.lease.podref:
        return "the lease names no pod to check"
    pod = inventory.pods.get(h.lease.podref)
    if audit.holder_is_live(h.lease, pod):
        assert pod is not None
        return f"held by pod {h.lease.podref} (uid {pod.uid}), which still exists"
    return ""


def _refuse(o: Output, reasons: list[str], held: list[Holding]) -> int:
    if o.json:
        o.dump({"refused": reasons, "leases": [{"pool": h.pool.name, **lease_json(h)} for h in held]})
    else:
        for reason in reasons:
            o.err.write(printable(f"ipamctl: refused: {reason}") + "\n")
    return PROBLEMS


def cmd_repair(args: argparse.Namespace, source: Source, o: Output) -> int:
    import io

    sink = io.StringIO() if o.json else o.out
    summary = Reconciler(source, args.grace, args.dry_run, sink).run_once()
    if summary.errors and any(line.startswith("error listing") for line in summary.lines):
        raise Failure(summary.lines[0].removeprefix("error "))
    if o.json:
        counts = summary.counts()
        if args.dry_run:
            counts["would_release"] = counts.pop("released")
        o.dump(
            {
                "dry_run": args.dry_run,
                "changes": summary.changes,
                "errors": [line for line in summary.lines if line.startswith("error ")],
                "notes": [line.removeprefix("note ") for line in summary.lines if line.startswith("note ")],
                "summary": counts,
            }
        )
    return PROBLEMS if summary.errors else OK


def cmd_delete_nodeslicepool(args: argparse.Namespace, source: Source, o: Output) -> int:
    """Delete a NodeSlicePool (a changed cut) safely: `slicereturn.delete_node_slices`."""
    from .slicereturn import KeptChanging, SlicesInUse, delete_node_slices
    from .store.slicestore import SliceStore

    store = source.store
    if not isinstance(store, SliceStore):
        raise Failure("this datastore has no NodeSlicePools")
    refused: list[str] = []
    try:
        lines = delete_node_slices(store, args.name, args.dry_run)
    except LookupError as exc:
        raise Failure(str(exc)) from None
    except SlicesInUse as exc:
        lines = exc.lines
        refused = [f"NodeSlicePool {args.name} is not deleted: {b}" for b in exc.busy]
    except KeptChanging as exc:
        raise Failure(str(exc)) from None
    if o.json:
        o.dump(
            {
                "dry_run": args.dry_run,
                "deleted": any(line.startswith("delete ") for line in lines),
                "lines": lines,
                "refused": refused,
            }
        )
    else:
        for line in lines:
            o.write(line)
        for reason in refused:
            o.err.write(printable(f"ipamctl: refused: {reason}") + "\n")
    return PROBLEMS if refused else OK


def _where(source: Source) -> str:
    return f"{source.where}/" if source.where else ""


def parse_address(text: str) -> str:
    try:
        if "/" in text:
            raise AddrFormatError(text)
        return str(IPAddress(text.strip()))
    except (AddrFormatError, ValueError):
        raise Failure(f"{text!r} is not an IP address") from None


# -- the command line -----------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Global options, accepted before and after the command."""
    d = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--kubeconfig",
        default=d,
        help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then the in-cluster account)",
    )
    parser.add_argument(
        "-n",
        "--namespace",
        default=d,
        help="namespace of the pools (default: the kubeconfig context's, else kube-system)",
    )
    parser.add_argument(
        "--datastore",
        choices=("kubernetes", "file"),
        default=argparse.SUPPRESS if suppress else "kubernetes",
        help="where the leases live (default: kubernetes)",
    )
    parser.add_argument(
        "--data-dir",
        default=argparse.SUPPRESS if suppress else DEFAULT_DATA_DIR,
        help=f"the file datastore's directory (default: {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default=argparse.SUPPRESS if suppress else "table",
        help="output format (default: table)",
    )


def _grace(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--grace", type=float, default=300.0, metavar="SECONDS", help=what)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipamctl", description="See, check and repair whereabouts-py's address pools."
    )
    _common(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    show = commands.add_parser(
        "show", help="pools and their usage, or who holds an address or a pod's leases"
    )
    _common(show, suppress=True)
    which = show.add_mutually_exclusive_group()
    which.add_argument("--address", metavar="IP", help="who holds IP (pool, lease, reservation)")
    which.add_argument("--pod", metavar="NS/NAME", help="the leases of this pod")
    show.add_argument("--network", default=None, help="with --address: only this network_name's pools")

    check = commands.add_parser("check", help="report leaked, duplicate and orphaned addresses")
    _common(check, suppress=True)
    _grace(check, "how long a pod may be missing its address from network-status (default: 300)")
    check.add_argument(
        "--whereabouts-compat",
        action="store_true",
        help="before switching from Go Whereabouts: report what whereabouts-py would read differently "
        "in the NADs (all namespaces), IPPools, reservations and NodeSlicePools",
    )
    check.add_argument(
        "--nad-namespace",
        default=None,
        metavar="NS",
        help="with --whereabouts-compat: only this namespace's NADs (default: every namespace)",
    )
    check.add_argument("--json", action="store_true", help="the same as -o json")

    release = commands.add_parser("release", help="release the lease(s) holding IP, as DEL does")
    _common(release, suppress=True)
    release.add_argument("ip", metavar="IP")
    release.add_argument("--network", default=None, help="only the pools of this network_name")
    release.add_argument(
        "--dry-run", action="store_true", help="change nothing; print what would be released"
    )
    release.add_argument("--force", action="store_true", help="release even while the holder pod exists")

    repair = commands.add_parser("repair", help="fix what check found that is safe to fix (ipam-reconcile)")
    _common(repair, suppress=True)
    repair.add_argument("--dry-run", action="store_true", help="change nothing; print what would change")
    _grace(repair, "minimum age in seconds of a lease or reservation before it is changed (default: 300)")

    nsp = commands.add_parser(
        "delete-nodeslicepool",
        help="delete a NodeSlicePool (to change a network's cut) once none of its slices holds a lease",
    )
    _common(nsp, suppress=True)
    nsp.add_argument(
        "name", metavar="NAME", help="the NodeSlicePool (the network_name, else the network's name)"
    )
    nsp.add_argument("--dry-run", action="store_true", help="change nothing; print what would change")
    return parser


def kubeconfig_path(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    for path in (os.environ.get("KUBECONFIG") or "").split(os.pathsep):
        if path and os.path.exists(path):
            return path
    default = os.path.expanduser("~/.kube/config")
    return default if os.path.exists(default) else None


def open_source(args: argparse.Namespace) -> Source:
    if args.datastore == "file":
        from .store.file import FileStore

        if not os.path.isdir(args.data_dir):
            raise Failure(f"--data-dir {args.data_dir}: no such directory")
        return FileSource(FileStore(args.data_dir))
    from .store.kubernetes import KubernetesStore

    path = kubeconfig_path(args.kubeconfig)
    try:
        store = KubernetesStore.connect(path, tempfile.gettempdir() + "/whereabouts-py-ctl", args.namespace)
    except Exception as exc:  # CNIError, or whatever the client's loader raised on a broken file
        what = f"kubeconfig {path}" if path else "the in-cluster service account (no kubeconfig found)"
        reason = (exc.details or exc.msg) if isinstance(exc, CNIError) else f"{type(exc).__name__}: {exc}"
        raise Failure(f"cannot load {what}: {' '.join(reason.split())}") from None
    return KubeSource(store)


COMMANDS = {
    "show": cmd_show,
    "check": cmd_check,
    "release": cmd_release,
    "repair": cmd_repair,
    "delete-nodeslicepool": cmd_delete_nodeslicepool,
}


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage error
        return OK if exc.code == 0 else FAILED
    if getattr(args, "grace", 0.0) < 0:
        err.write("ipamctl: --grace must be >= 0\n")
        return FAILED
    log.configure(level="warning")
    colour = args.output == "table" and out.isatty() and not os.environ.get("NO_COLOR")
    as_json = args.output == "json" or getattr(args, "json", False)
    o = Output(out, err, as_json, colour and not as_json)
    source: Source | None = None
    try:
        source = open_source(args)
        return COMMANDS[args.command](args, source, o)
    except Failure as exc:
        err.write(printable(f"ipamctl: {exc}") + "\n")
    except (CNIError, TransientStoreError, ConflictError) as exc:
        err.write(printable(f"ipamctl: {args.command} failed: {exc}") + "\n")
    finally:
        if source is not None:
            source.store.close()
    return FAILED


if __name__ == "__main__":
    sys.exit(main())
