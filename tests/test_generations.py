"""Attacks on the node lock's generation counter (ipam.store.locks) and what rests on it: the agent's
memory of slice pools (PoolCache.unchanged) and of the NodeSlicePool (Slicer._stamp).

A remembered pool is trusted while the lock's counter still shows this process's last generation.
Each test here makes the counter show that number again after another process wrote the pool."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ipam import nodeslices
from ipam.agent import Agent
from ipam.store.kubernetes import KubernetesStore
from ipam.store.locks import pool_generation, pool_lock
from tests.kubeapi.fixtures import K8s
from tests.test_pool_cache_races import addr, call, held, netconf

SLICE2 = "node-a-10.0.0.4-30"  # the node's second /30 slice of 10.0.0.0/28 (net1)


@pytest.fixture(autouse=True)
def _cold_slice_cache() -> None:
    nodeslices.forget_cache()


def _bump_to(lock_dir: str, name: str, target: int) -> None:
    """Other holders of the lock that write nothing (a DEL of an unknown container, a crashed call)
    until its counter shows `target`, if a few hundred holders can get it there."""
    for _ in range(500):
        now = pool_generation(lock_dir, name)
        if now is not None and now >= target:
            return
        with pool_lock(lock_dir, name, 1.0):
            pass


def _repeat_after_the_counter_restarted(k8s: K8s, tmp_path: Path, restart: str) -> None:
    """The agent wrote slice 2 and remembers it at generation G. The lock file (or directory) goes
    away and a new one is made; direct mode writes p's lease into slice 2 and the new counter
    reaches G again. The agent's repeat of p's ADD must find p's lease in slice 2."""
    conf, agent = netconf(k8s, tmp_path, node_slice_size="/30"), Agent()
    locks = str(tmp_path / "locks")
    try:
        call(conf, "ADD", "a0", agent)
        call(conf, "ADD", "a1", agent)  # slice 1 (.1 .2) full
        call(conf, "ADD", "b0", agent)  # slice 2 claimed; the agent remembers its pool
        mine_gen = pool_generation(locks, SLICE2)
        assert mine_gen is not None
        lock_file = tmp_path / "locks" / f"{SLICE2}.lock"
        if restart == "file":
            lock_file.unlink()
        elif restart == "truncated":  # an older version's lock (filelock opens it with O_TRUNC)
            lock_file.write_bytes(b"")
        elif restart == "renamed":  # the agent's kept descriptor still names the old directory
            (tmp_path / "locks").rename(tmp_path / "locks.old")
        else:
            shutil.rmtree(locks)
        first = call(conf, "ADD", "p", None)  # direct mode: p into slice 2 (.6), a new counter
        call(conf, "DEL", "a0", None)  # room in slice 1 again
        _bump_to(locks, SLICE2, mine_gen)  # on a counter that starts again at 1: it shows G again
        again = call(conf, "ADD", "p", agent)
    finally:
        agent.close()
    assert addr(first) == addr(again) == "10.0.0.6/28"
    assert [h for h in held(k8s) if h[0] == "p"] == [("p", f"{SLICE2}+2")]


def test_a_lock_file_made_anew_does_not_pass_for_the_one_the_agent_remembers(
    k8s: K8s, tmp_path: Path
) -> None:
    _repeat_after_the_counter_restarted(k8s, tmp_path, "file")


def test_a_lock_directory_made_anew_does_not_pass_for_the_one_the_agent_remembers(
    k8s: K8s, tmp_path: Path
) -> None:
    _repeat_after_the_counter_restarted(k8s, tmp_path, "dir")


def test_a_lock_directory_renamed_away_and_made_anew_is_the_one_both_processes_count_in(
    k8s: K8s, tmp_path: Path
) -> None:
    _repeat_after_the_counter_restarted(k8s, tmp_path, "renamed")


def test_a_lock_file_an_older_version_truncated_does_not_pass_for_the_one_the_agent_remembers(
    k8s: K8s, tmp_path: Path
) -> None:
    _repeat_after_the_counter_restarted(k8s, tmp_path, "truncated")


@pytest.mark.parametrize("content", [b"\xff" * 8, b"\xff" * 3, b"12345\n", b"x" * 100])
def test_a_lock_file_with_any_content_still_locks_and_counts(tmp_path: Path, content: bytes) -> None:
    """A lock file of an older version (empty, a pid) or damaged: the lock works and a holder's
    generation is never one a reader saw before it took the lock."""
    locks = tmp_path / "locks"
    locks.mkdir()
    (locks / "p.lock").write_bytes(content)
    before = pool_generation(str(locks), "p")
    with pool_lock(str(locks), "p", 1.0) as first:
        assert first is not None and first != before
        assert pool_generation(str(locks), "p") == first
    with pool_lock(str(locks), "p", 1.0) as second:
        assert second != first


def test_a_nodeslicepool_read_while_another_process_claims_is_not_taken_for_after_its_claim(
    k8s: K8s, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A direct-mode call holds the node's claim lock (the counter already shows its generation) and
    is about to write its claim of slice 2; meanwhile the agent reads the NodeSlicePool (without
    slice 2) and notes that generation. After the claim is written and p leased in slice 2, the
    agent's repeat of p's ADD must not use that list: it would find room in slice 1."""
    conf, agent = netconf(k8s, tmp_path, node_slice_size="/30"), Agent()
    original = KubernetesStore.write_node_slices
    hook: list[Callable[[], object]] = []

    def write_node_slices(store: KubernetesStore, pool: Any, entries: Any) -> None:
        if hook and threading.current_thread() is threading.main_thread():  # direct mode's claim
            hook.pop()()
        original(store, pool, entries)

    monkeypatch.setattr(KubernetesStore, "write_node_slices", write_node_slices)
    try:
        call(conf, "ADD", "a0", agent)
        call(conf, "ADD", "a1", agent)  # slice 1 (.1 .2) full
        hook.append(lambda: call(conf, "DEL", "a0", agent))  # the agent reads the NodeSlicePool now
        first = call(conf, "ADD", "p", None)  # direct mode claims slice 2: p gets .5
        again = call(conf, "ADD", "p", agent)
    finally:
        agent.close()
    assert not hook
    assert addr(first) == addr(again) == "10.0.0.5/28"
    assert [h for h in held(k8s) if h[0] == "p"] == [("p", f"{SLICE2}+1")]


def test_a_fifo_in_place_of_a_lock_file_does_not_hang_a_reader_of_its_generation(tmp_path: Path) -> None:
    """pool_generation is read on every ADD on a node with slices, without the lock: a FIFO named like
    the lock file (a lock file replaced by another kind of file) must not block the agent's thread."""
    import os

    locks = tmp_path / "locks"
    locks.mkdir()
    os.mkfifo(locks / "p.lock")
    got: list[int | None] = []
    reader = threading.Thread(target=lambda: got.append(pool_generation(str(locks), "p")), daemon=True)
    reader.start()
    reader.join(5)
    stuck = reader.is_alive()
    if stuck:  # let it go: a writer end opens the FIFO
        os.close(os.open(locks / "p.lock", os.O_WRONLY))
        reader.join(5)
    assert not stuck and got == [None]


def test_a_parent_of_the_kept_lock_directory_swapped_for_a_symlink_is_not_followed(tmp_path: Path) -> None:
    """The kept descriptor of a lock directory (3a5e8f9) is checked with one stat that follows every
    component but the last: a parent swapped for a symlink to another tree names another directory,
    so the path is walked again and refused, and nothing is created in that tree."""
    import os

    from ipam import errors
    from ipam.errors import CNIError

    data = tmp_path / "data"
    (data / "locks").mkdir(parents=True)
    with pool_lock(str(data / "locks"), "p", 1.0):
        pass
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "locks").mkdir(parents=True)
    os.rename(data, tmp_path / "old-data")
    data.symlink_to(elsewhere)
    with pytest.raises(CNIError) as info, pool_lock(str(data / "locks"), "p", 1.0):
        pass
    assert info.value.code == errors.IO_FAILURE and "symlink" in info.value.msg
    with pytest.raises(CNIError):  # nor is a generation read there
        pool_generation(str(data / "locks"), "p")
    assert list((elsewhere / "locks").iterdir()) == []


def test_a_torn_read_of_the_counter_is_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read of the counter that mixes the bytes of two values (a holder bumping it across a carry)
    is not taken: the counter is read until two reads in a row agree."""
    from ipam.store import locks

    with locks.pool_lock(str(tmp_path), "p", 1.0) as generation:
        pass
    torn = (generation ^ 0xFF00).to_bytes(8, "little")  # neither this value nor another holder's
    reads = [torn]
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        return reads.pop() if reads else real_pread(fd, n, offset)

    monkeypatch.setattr(locks.os, "pread", pread)
    assert locks.pool_generation(str(tmp_path), "p") == generation
