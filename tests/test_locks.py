"""The node-local pool lock: waiters sleep in the kernel (no polling that starves the holder), the wait
is bounded in the main thread and in other threads, and the timer is left as it was found."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ipam import errors
from ipam.errors import CNIError
from ipam.store.locks import pool_lock

FLOCK_SYSCALL = {"x86_64": 73, "aarch64": 32}

WAITER = """
import sys
sys.path.insert(0, {root!r})
from ipam.store.locks import pool_lock
print("waiting", flush=True)
with pool_lock({dir!r}, "p", 60):
    print("got", flush=True)
"""


def syscall_of(pid: int) -> int | None:
    try:
        first = Path(f"/proc/{pid}/syscall").read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(first) if first.lstrip("-").isdigit() else None


def test_waiting_process_sleeps_in_flock_until_released(tmp_path: Path) -> None:
    import platform

    root = str(Path(__file__).resolve().parents[1])
    locks = str(tmp_path / "locks")
    with pool_lock(locks, "p", 1):
        proc = subprocess.Popen(
            [sys.executable, "-c", WAITER.format(root=root, dir=locks)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == "waiting\n"
        nr = FLOCK_SYSCALL.get(platform.machine())
        for _ in range(5000):  # bounded: until the waiter is blocked inside flock(2)
            if syscall_of(proc.pid) == nr:
                break
            threading.Event().wait(0.002)
        else:
            proc.kill()
            pytest.fail("the waiter never blocked in flock: is it polling?")
    assert proc.stdout.readline() == "got\n"  # released: the kernel hands it over
    assert proc.wait(timeout=30) == 0


def test_timeout_in_the_main_thread_is_code_11_and_restores_the_timer(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGALRM)
    with (
        pool_lock(str(tmp_path), "p", 1),
        pytest.raises(CNIError) as info,
        pool_lock(str(tmp_path), "p", 0.05),
    ):
        pass
    assert info.value.code == errors.TRY_AGAIN_LATER and "node lock of pool p" in info.value.msg
    assert signal.getsignal(signal.SIGALRM) is before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with pool_lock(str(tmp_path), "p", 0.05):  # and it is free again
        pass


def test_other_threads_wait_by_polling_bounded(tmp_path: Path) -> None:
    outcome: list[object] = []
    release = threading.Event()

    def holder() -> None:
        with pool_lock(str(tmp_path), "p", 1):
            outcome.append("held")
            release.wait(30)

    def waiter(timeout: float) -> None:
        try:
            with pool_lock(str(tmp_path), "p", timeout):
                outcome.append("got")
        except CNIError as exc:
            outcome.append(exc.code)

    h = threading.Thread(target=holder)
    h.start()
    while "held" not in outcome:
        threading.Event().wait(0.001)
    w = threading.Thread(target=waiter, args=(0.05,))
    w.start()
    w.join(30)
    assert outcome == ["held", errors.TRY_AGAIN_LATER]
    w = threading.Thread(target=waiter, args=(30,))
    w.start()
    release.set()
    w.join(30)
    h.join(30)
    assert outcome[-1] == "got"


def test_zero_timeout_takes_a_free_lock_and_refuses_a_held_one(tmp_path: Path) -> None:
    with pool_lock(str(tmp_path), "p", 0), pytest.raises(CNIError) as info, pool_lock(str(tmp_path), "p", 0):
        pass
    assert info.value.code == errors.TRY_AGAIN_LATER


def test_unusable_lock_directory_is_an_io_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(CNIError) as info, pool_lock(str(tmp_path / "file"), "p", 1):
        pass
    assert info.value.code == errors.IO_FAILURE
