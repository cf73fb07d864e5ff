"""ipamctl on the file datastore (show, check, release, repair), the table layout against golden files,
and colour only on a terminal."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from ipam.allocator import Lease, Request
from ipam.ctl import main as ctl_main
from ipam.engine import Engine
from ipam.ranges import build_range
from ipam.store.file import FileStore

GOLDEN = Path(__file__).parent / "golden"
OLD = "2026-11-29T09:00:00Z"


@pytest.fixture
def data_dir(tmp_path: Path) -> str:
    """Rook's storage network with three OSDs, a small default network, and one orphan reservation."""
    store = FileStore(str(tmp_path / "data"))
    storage = Engine(store, network_name="storage")
    for i in range(3):
        request = Request(f"ctr{i}", "net1", f"rook-ceph/osd-{i}", node="node-a", created=OLD)
        storage.add([build_range("ipam", "192.168.20.0/28")], request)
    Engine(store).add(
        [build_range("ipam", "10.0.0.0/30")], Request("c9", "net1", "default/web", node="node-b")
    )
    store.reserve("storage-192.168.20.9", Lease("dead", "rook-ceph/osd-9", "net1", created=OLD))
    return str(tmp_path / "data")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def ctl(data_dir: str, *args: str, out: io.StringIO | None = None) -> tuple[int, str, str]:
    out = out if out is not None else io.StringIO()
    err = io.StringIO()
    code = ctl_main(["--datastore", "file", "--data-dir", data_dir, *args], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def ctl_json(data_dir: str, *args: str) -> tuple[int, Any]:
    code, out, err = ctl(data_dir, *args, "-o", "json")
    assert out, err
    return code, json.loads(out)


@pytest.mark.parametrize("command", ["show", "check"])
def test_table_layout_matches_the_golden_file(data_dir: str, command: str) -> None:
    code, out, _ = ctl(data_dir, command)
    assert code == (0 if command == "show" else 1)
    assert out == (GOLDEN / f"ipamctl_{command}.txt").read_text()


def test_colour_only_on_a_terminal(data_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    _, plain, _ = ctl(data_dir, "check")
    _, coloured, _ = ctl(data_dir, "check", out=Terminal())
    assert "\033[" not in plain
    assert "\033[1mKIND" in coloured and "\033[31morphan-reservation" in coloured
    assert coloured.replace("\033[1m", "").replace("\033[31m", "").replace("\033[0m", "") == plain
    _, json_out, _ = ctl(data_dir, "-o", "json", "check", out=Terminal())
    assert "\033[" not in json_out
    monkeypatch.setenv("NO_COLOR", "1")
    assert ctl(data_dir, "check", out=Terminal())[1] == plain


def test_show_json_and_holders(data_dir: str) -> None:
    code, doc = ctl_json(data_dir, "show")
    assert code == 0
    assert [(p["name"], p["network"], p["used"], p["free"]) for p in doc["pools"]] == [
        ("10.0.0.0-30", "", 1, 1),
        ("storage-192.168.20.0-28", "storage", 3, 11),
    ]
    assert doc["pools"][1]["leases"][0] == {
        "address": "192.168.20.1",
        "podref": "rook-ceph/osd-0",
        "id": "ctr0",
        "ifname": "net1",
        "node": "node-a",
    }
    code, doc = ctl_json(data_dir, "show", "--pod", "rook-ceph/osd-2")
    assert (code, [(e["address"], e["reservation"]) for e in doc["leases"]]) == (
        0,
        [("192.168.20.3", "storage-192.168.20.3")],
    )
    code, doc = ctl_json(data_dir, "show", "--address", "192.168.20.1", "--network", "other")
    assert (code, doc["leases"], doc["reservations_without_lease"]) == (1, [], [])
    code, out, _ = ctl(data_dir, "show", "--address", "192.168.20.9")  # only a reservation blocks it
    assert code == 0
    assert out.splitlines()[1].split() == [
        "192.168.20.9",
        "-",
        "rook-ceph/osd-9",
        "dead",
        "net1",
        "storage-192.168.20.9",
    ]


def test_check_says_leaked_leases_cannot_be_judged(data_dir: str) -> None:
    code, doc = ctl_json(data_dir, "check")
    assert code == 1
    assert doc["notes"] == ["leaked leases not judged: the file datastore has no pod list"]
    assert doc["problems"] == [
        {
            "kind": "orphan-reservation",
            "pool": "",
            "address": "192.168.20.9",
            "podref": "rook-ceph/osd-9",
            "detail": "reservation storage-192.168.20.9 has no lease",
        }
    ]


def test_release_needs_force_without_a_pod_list(data_dir: str) -> None:
    code, out, err = ctl(data_dir, "release", "192.168.20.2")
    assert (code, out) == (1, "")
    assert "cannot tell whether rook-ceph/osd-1 still runs (the file datastore has no pod list)" in err
    code, out, _ = ctl(data_dir, "release", "192.168.20.2", "--force")
    assert (code, out) == (
        0,
        "release pool=storage-192.168.20.0-28 address=192.168.20.2 podref=rook-ceph/osd-1 container=ctr1\n",
    )
    reservations = sorted(os.listdir(Path(data_dir) / "reservations"))
    assert "storage-192.168.20.2.json" not in reservations and "storage-192.168.20.1.json" in reservations
    code, doc = ctl_json(data_dir, "show", "--address", "192.168.20.2")
    assert (code, doc["leases"]) == (1, [])


def test_repair_deletes_the_orphan_reservation_and_recreates_a_missing_one(data_dir: str) -> None:
    (
        Path(data_dir) / "reservations" / "storage-192.168.20.1.json"
    ).unlink()  # the crash window after the pool write
    code, out, _ = ctl(data_dir, "repair", "--grace", "0")
    assert code == 0
    assert out.splitlines() == [
        "note leaked leases not judged: the file datastore has no pod list",
        "delete reservation=storage-192.168.20.9 podref=rook-ceph/osd-9 reason=orphaned",
        "create reservation=storage-192.168.20.1 pool=storage-192.168.20.0-28 address=192.168.20.1 podref=rook-ceph/osd-0 reason=missing",
        "summary pools=2 leases=4 kept=4 released=0 reservations_deleted=1 errors=0",
    ]
    code, doc = ctl_json(data_dir, "check")
    assert (code, doc["problems"]) == (0, [])
    held = json.loads((Path(data_dir) / "reservations" / "storage-192.168.20.1.json").read_text())["spec"]
    assert (held["containerid"], held["podref"]) == ("ctr0", "rook-ceph/osd-0")


def test_a_missing_data_dir_is_exit_2(tmp_path: Path) -> None:
    code, out, err = ctl(str(tmp_path / "nope"), "show")
    assert (code, out) == (2, "")
    assert err == f"ipamctl: --data-dir {tmp_path / 'nope'}: no such directory\n"


def test_retained_leases_are_shown_as_retained_and_release_frees_one(tmp_path: Path) -> None:
    from ipam.allocator import Retention

    store = FileStore(str(tmp_path / "data"))
    engine = Engine(store)
    spec = build_range("ipam", "10.9.0.0/29")
    engine.add([spec], Request("c0", "net1", "apps/db-0", node="node-a"))
    engine.add([spec], Request("c1", "net1", "apps/web", node="node-a"))
    engine.release([spec], "c0", "net1", Retention("2026-01-01T00:00:00Z", "statefulset"))
    engine.release([spec], "c1", "net1", Retention("2026-01-01T00:00:00Z", until="2026-01-01T00:10:00Z"))
    data = str(tmp_path / "data")
    code, doc = ctl_json(data, "show")
    assert code == 0
    assert [
        (e["address"], e["podref"], e.get("state"), e.get("retention")) for e in doc["pools"][0]["leases"]
    ] == [
        ("10.9.0.1", "apps/db-0", "retained", "statefulset apps/db"),
        ("10.9.0.2", "apps/web", "retained", "until 2026-01-01T00:10:00Z"),
    ]
    code, out, _ = ctl(data, "show")
    assert (next(line for line in out.splitlines() if line.startswith("10.9.0.1")).split()) == [
        "10.9.0.1",
        "10.9.0.0-29",
        "retained",
        "apps/db-0",
        "statefulset",
        "apps/db",
    ]
    code, out, _ = ctl(data, "show", "--pod", "apps/web")
    assert "retained" in out and "until 2026-01-01T00:10:00Z" in out
    # a retained lease has no live holder: released without --force (the file datastore has no pods)
    code, out, err = ctl(data, "release", "10.9.0.1")
    assert (code, err) == (0, "") and "release" in out
    assert [e["address"] for e in ctl_json(data, "show")[1]["pools"][0]["leases"]] == ["10.9.0.2"]


EVIL = "\x1b]0;owned\x07\x1b[2J\u202eevil\r\nfake line"


@pytest.mark.parametrize(
    "command", [["show"], ["check"], ["show", "--address", "10.9.0.1"], ["repair", "--dry-run"]]
)
def test_text_read_from_the_datastore_is_printed_escaped_and_cut(tmp_path: Path, command: list[str]) -> None:
    """A lease or reservation written by anyone holding the datastore's credentials (a node's token) may
    carry terminal escapes, bidi overrides, line breaks or megabytes: ipamctl's and the reconciler's
    text output shows them escaped, cut to a bounded length."""
    store = FileStore(str(tmp_path / "data"))
    # as long as the lease reader takes (LEASE_FIELD_LIMITS); a longer one makes the pool unreadable
    request = Request("c" * 200 + EVIL, "net1", f"ns/{EVIL}", node=EVIL + "n" * 200, created=OLD)
    Engine(store).add([build_range("ipam", "10.9.0.0/24")], request)
    store.reserve("10.9.0.7", Lease(EVIL, "ns/" + "p" * 3000 + EVIL, "net1", created=OLD))
    _, out, err = ctl(str(tmp_path / "data"), *command)
    for text in (out, err):
        assert not any(c in text for c in "\x1b\x07\r\u202e"), text[:2000]
        assert "fake line" not in text.replace("\\x0d\\x0afake line", "")  # never on a line of its own
        assert max(map(len, text.splitlines()), default=0) < 2000
    if command[0] == "show":
        assert "\\x1b" in out  # shown, escaped
