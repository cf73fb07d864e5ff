"""ipam-agent: the node daemon behind the CNI shim.

Serves CNI calls on a unix socket with warm datastore clients and coalesces: ops for one pool that
arrive while that pool's read-modify-write is in flight are served together by the next one (one
GET + one PUT for the whole batch), each with its own result or error. A result is only returned
after the write that holds it succeeded. Health and Prometheus metrics on a localhost port.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import queue
import signal
import socket
import socketserver
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from . import cni, errors
from .config import Config
from .engine import AddOp, Engine, Op, PoolCache, ReleaseOp
from .errors import CNIError
from .log import log
from .shim import DEFAULT_SOCKET, MAX_REQUEST, WORK_MARGIN, heartbeat_path
from .store.base import Store
from .store.open import open_store

HEARTBEAT_SECONDS = 2.0  # well below the shim's wait budget (ipam.shim.DEFAULT_WAIT)
READ_TIMEOUT = 10.0  # the shim sends its request right after connecting
MAX_CONNECTIONS = 512  # calls served at once; more are closed (their shims repeat them, see ipam.shim)
HEALTH_TIMEOUT = 5.0  # a /metrics or /healthz connection silent this long is closed
MAX_HEALTH_CONNECTIONS = 32  # on the metrics port; one more cuts the oldest
# The request line and headers a metrics connection may send: a probe's GET is ~100 bytes, while
# http.server alone reads up to 100 headers of 64 KiB each (6.5 MiB per connection held, 200 MiB for
# 32 connections trickling their last byte).
MAX_HEALTH_REQUEST = 8192
EVICT_WAIT = 1.0  # how long a new metrics connection waits for the one it cut to end
# On SIGTERM the agent stops accepting and gives its calls in flight this long to finish; keep it below
# the DaemonSet's terminationGracePeriodSeconds (deploy/base/daemonset.yaml: 20 s of 30 s).
DRAIN_SECONDS = 20.0
MAX_STORES = 8  # datastore clients kept warm (one per datastore/kubeconfig/data_dir in use)
WORKER_IDLE_SECONDS = 60.0  # a pool's worker thread ends after this long without work


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "whereabouts_py_requests", "CNI calls served", ["command", "result"], registry=r
        )
        self.allocations = Counter("whereabouts_py_allocations", "addresses handed out", registry=r)
        self.releases = Counter("whereabouts_py_releases", "addresses given back", registry=r)
        self.conflicts = Counter("whereabouts_py_conflicts", "conditional writes refused (409)", registry=r)
        self.batches = Histogram(
            "whereabouts_py_batch_size",
            "ops per pool write",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.in_flight = Gauge("whereabouts_py_calls_in_flight", "CNI calls being served", registry=r)
        self.latency = Histogram(
            "whereabouts_py_request_seconds",
            "CNI call latency",
            ["command"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )


@dataclass(eq=False)
class Ticket:
    engine: Engine
    cidr: str
    ops: list[Op]
    deadline: float
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class Coalescer:
    """One worker thread per pool; each takes everything queued for its pool as one batch."""

    def __init__(self, metrics: Metrics, idle_seconds: float = WORKER_IDLE_SECONDS) -> None:
        self.metrics = metrics
        self.idle_seconds = idle_seconds
        self.lock = threading.Lock()
        self.queues: dict[tuple[int, str, bool, str, str], queue.SimpleQueue[Ticket]] = {}

    def run(self, engine: Engine, name: str, cidr: str, ops: list[Op], deadline: float) -> None:
        """The engine's BatchRunner: queue the ops and wait for the batch that carries them."""
        # the range too: a batch is decided against one range (ops of a pool by the same name but
        # another range are refused by their own batch, never written into this range's pool)
        key = (id(engine.store), engine.network_name, engine.overlapping, name, cidr)
        ticket = Ticket(engine, cidr, ops, deadline)
        with self.lock:  # queued under the lock: an idle worker retires only from an empty queue
            q = self.queues.get(key)
            if q is None:
                q = self.queues[key] = queue.SimpleQueue()
                threading.Thread(
                    target=self._worker, args=(name, q), name=f"pool-{name}", daemon=True
                ).start()
            q.put(ticket)
        ticket.done.wait()
        if ticket.error is not None:
            raise ticket.error

    def _next(self, q: queue.SimpleQueue[Ticket]) -> Ticket | None:
        """The next ticket for this worker, or None once its queue was idle for WORKER_IDLE_SECONDS
        (the queue is then dropped and the thread ends; the next call starts a new one)."""
        while True:
            try:
                return q.get(timeout=self.idle_seconds)
            except queue.Empty:
                with self.lock:
                    if q.empty():
                        for key, other in list(self.queues.items()):
                            if other is q:
                                del self.queues[key]
                        return None

    @staticmethod
    def _live(name: str, ticket: Ticket) -> bool:
        """False (and the ticket answered with an error) when its deadline passed while it was queued:
        its shim has given up and run the call in direct mode, and the runtime may have moved on (a
        DEL served now could take the lease of a later ADD of the same container)."""
        if ticket.engine.clock() < ticket.deadline:
            return True
        ticket.error = CNIError(
            errors.TRY_AGAIN_LATER,
            f"pool {name}: the call's deadline passed while it waited for the pool; try again later",
        )
        ticket.done.set()
        return False

    def _worker(self, name: str, q: queue.SimpleQueue[Ticket]) -> None:
        while True:
            first = self._next(q)
            if first is None:
                return
            batch = [first]
            while True:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            batch = [t for t in batch if self._live(name, t)]
            if not batch:
                continue
            engine = batch[0].engine
            ops = [op for t in batch for op in t.ops]
            conflicts_before = engine.stats.conflicts

            def absorb() -> list[Op]:
                more: list[Op] = []
                while True:
                    try:
                        ticket = q.get_nowait()
                    except queue.Empty:
                        return more
                    if not self._live(name, ticket):
                        continue
                    batch.append(ticket)  # noqa: B023 - this batch, while it is being served
                    more.extend(ticket.ops)

            try:
                engine.apply_batch(name, batch[0].cidr, ops, max(t.deadline for t in batch), absorb)
                self.metrics.allocations.inc(
                    sum(1 for op in ops if isinstance(op, AddOp) and op.error is None)
                )
                self.metrics.releases.inc(sum(len(op.released) for op in ops if isinstance(op, ReleaseOp)))
            except BaseException as exc:  # every waiter of the batch gets the batch's failure
                for t in batch:
                    t.error = exc
            finally:
                self.metrics.conflicts.inc(max(0, engine.stats.conflicts - conflicts_before))
                self.metrics.batches.observe(len(ops))
                if len(batch) > 1:
                    log.debug("agent.batch", pool=name, calls=len(batch), ops=len(ops))
                for t in batch:
                    t.done.set()


class StoreCache:
    """At most `limit` warm datastore clients, least recently used evicted. An evicted store is
    closed once no call is using it any more."""

    def __init__(self, limit: int = MAX_STORES) -> None:
        self.limit = limit
        self.lock = threading.Lock()
        self.stores: OrderedDict[tuple[str, str, str], Store] = OrderedDict()
        self.users: dict[int, int] = {}  # id(store) -> calls using it
        self.evicted: dict[int, Store] = {}

    @contextmanager
    def use(self, cfg: Config) -> Iterator[Store]:
        key = (cfg.ipam.datastore, cfg.ipam.kubernetes.kubeconfig or "", cfg.ipam.data_dir)
        idle: list[Store] = []
        with self.lock:
            store = self.stores.get(key)
            if store is None:
                store = self.stores[key] = open_store(cfg)
                while len(self.stores) > self.limit:
                    _, old = self.stores.popitem(last=False)
                    if self.users.get(id(old)):
                        self.evicted[id(old)] = old  # closed by its last user
                    else:
                        idle.append(old)
            self.stores.move_to_end(key)
            self.users[id(store)] = self.users.get(id(store), 0) + 1
        for old in idle:
            old.close()
        try:
            yield store
        finally:
            self._release(store)

    def _release(self, store: Store) -> None:
        with self.lock:
            left = self.users[id(store)] = self.users[id(store)] - 1
            if left:
                return
            del self.users[id(store)]
            evicted = self.evicted.pop(id(store), None)
        if evicted is not None:
            evicted.close()

    def close(self) -> None:
        with self.lock:
            stores = [*self.stores.values(), *self.evicted.values()]
            self.stores.clear()
            self.evicted.clear()
        for store in stores:
            store.close()


class Agent:
    def __init__(self) -> None:
        self.metrics = Metrics()
        self.coalescer = Coalescer(self.metrics)
        self.cache = StoreCache()
        # pools as this agent last wrote them, per warm datastore client (gone with an evicted one)
        self.pool_caches: weakref.WeakKeyDictionary[Store, PoolCache] = weakref.WeakKeyDictionary()
        self._pool_caches_lock = threading.Lock()

    def _pool_cache(self, store: Store) -> PoolCache:
        with self._pool_caches_lock:
            found = self.pool_caches.get(store)
            if found is None:
                found = self.pool_caches[store] = PoolCache()
            return found

    @contextmanager
    def engines(self, cfg: Config, shim_timeout: float | None = None) -> Iterator[Engine]:
        with self.cache.use(cfg) as store:
            engine = cni.make_engine(cfg, store)
            engine.runner = self.coalescer.run
            engine.pool_cache = self._pool_cache(store)
            if shim_timeout is not None:  # done (rollback included) before the shim falls back to direct mode
                policy = engine.policy
                fits = max(1.0, shim_timeout - policy.rollback_seconds - WORK_MARGIN)
                engine.policy = replace(policy, deadline_seconds=min(policy.deadline_seconds, fits))
            yield engine

    def serve_call(self, request: dict[str, Any]) -> dict[str, Any]:
        env = {str(k): str(v) for k, v in (request.get("env") or {}).items()}
        stdin = str(request.get("stdin", "")).encode("utf-8", errors="surrogateescape")
        command = env.get("CNI_COMMAND", "")
        out = io.StringIO()
        started = time.monotonic()
        raw_timeout = request.get("timeout")
        shim_timeout = float(raw_timeout) if isinstance(raw_timeout, (int, float)) else None
        with self.metrics.in_flight.track_inprogress():
            code = cni.run(env, stdin, out, engines=lambda cfg: self.engines(cfg, shim_timeout))
        self.metrics.latency.labels(command).observe(time.monotonic() - started)
        self.metrics.requests.labels(command, "ok" if code == 0 else "error").inc()
        return {"code": code, "stdout": out.getvalue()}

    def close(self) -> None:
        self.cache.close()


class Connections:
    """The connections a server serves, one thread each: at most `limit` at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.cond = threading.Condition()
        self.open: dict[socket.socket, bool] = {}  # oldest first; True once cut

    def admit(self, conn: socket.socket, evict: bool) -> bool:
        """Count `conn` in. At the limit: False, or with `evict` the oldest connection is cut (its
        thread ends at once) and `conn` waits up to EVICT_WAIT for its place."""
        with self.cond:
            if len(self.open) >= self.limit and evict:
                oldest = next((c for c, cut in self.open.items() if not cut), None)
                if oldest is not None:
                    self.open[oldest] = True
                    with suppress(OSError):
                        oldest.shutdown(socket.SHUT_RDWR)
                self.cond.wait_for(lambda: len(self.open) < self.limit, EVICT_WAIT)
            if len(self.open) >= self.limit:
                return False
            self.open[conn] = False
            return True

    def done(self, conn: socket.socket) -> None:
        with self.cond:
            self.open.pop(conn, None)
            self.cond.notify_all()

    def count(self) -> int:
        with self.cond:
            return len(self.open)

    def wait_idle(self, seconds: float) -> int:
        """Wait up to `seconds` for every connection to end; then cut those still open (their clients
        see the connection close unanswered) and return how many there were."""
        with self.cond:
            self.cond.wait_for(lambda: not self.open, seconds)
            for conn in self.open:
                with suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            return len(self.open)


class _Bounded(socketserver.ThreadingMixIn):
    """A thread per connection, at most `connections.limit` of them (`evict`: a new connection cuts
    the oldest, else it is closed unserved). Failures are logged as one line, not a traceback."""

    daemon_threads = True
    evict = False
    connections: Connections

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.connections.admit(request, self.evict):
            log.warning("agent.connection-refused", server=type(self).__name__, reason="too many connections")
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.done(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.done(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        log.warning(
            "agent.connection-failed", server=type(self).__name__, error=f"{type(exc).__name__}: {exc}"
        )


class _CallHandler(socketserver.StreamRequestHandler):
    server: _SocketServer
    # Applied to the connection in setup(): each read of the request and the write of the answer; not
    # the call itself (the connection is idle while the call runs, however long it takes).
    timeout = READ_TIMEOUT

    def handle(self) -> None:
        try:
            raw = self.rfile.readline(MAX_REQUEST)
        except OSError as exc:  # a client that connects and never sends (or too slowly)
            log.warning("agent.read-failed", error=f"{type(exc).__name__}: {exc}")
            return
        try:
            request = json.loads(raw)
            if not isinstance(request, dict):
                raise ValueError("request is not an object")
        except (ValueError, RecursionError) as exc:
            log.error("agent.bad-request", error=str(exc))
            return  # the shim sees a closed socket and falls back to direct mode
        reply = self.server.agent.serve_call(request)
        self.wfile.write(json.dumps(reply).encode())


class _SocketServer(_Bounded, socketserver.UnixStreamServer):
    # a burst of pods connects at once; a full backlog would push shims to direct mode
    request_queue_size = 512

    def __init__(self, path: str, agent: Agent, max_connections: int = MAX_CONNECTIONS) -> None:
        self.agent = agent
        self.connections = Connections(max_connections)
        super().__init__(path, _CallHandler)
        st = os.stat(path)
        self.inode = (st.st_dev, st.st_ino)

    def owns_socket(self) -> bool:
        """Whether the socket file is still this server's: another agent started on the same path
        (by hand, or a second DaemonSet) replaces it, and removes it when it stops."""
        try:
            st = os.stat(str(self.server_address))
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.inode

    def remove_socket(self) -> None:
        """Unlink the socket file unless a successor has replaced it already (a DaemonSet roll that
        starts the next agent while this one drains: its socket must stay)."""
        path = str(self.server_address)
        with suppress(OSError):
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == self.inode:
                os.unlink(path)

    def drain(self, seconds: float) -> int:
        """Stop accepting (connections not yet accepted are closed: their shims repeat the call with
        the next agent), then give the calls in flight up to `seconds` to finish. Returns how many were
        still running: their connections are cut, and their shims repeat them (an ADD is idempotent;
        a late rollback here only takes leases still carrying this call's token, see Engine.add)."""
        self.server_close()
        self.remove_socket()
        log.info("agent.draining", calls=self.connections.count(), drain_s=seconds)
        left = self.connections.wait_idle(seconds)
        log.info("agent.drained", calls_cut=left)
        return left


class _HealthServer(_Bounded, HTTPServer):
    """The metrics port (localhost, but any local user can connect): a bounded number of threads, and
    a new connection cuts the oldest, so idle connections held open neither grow the agent nor starve
    the kubelet's probe."""

    evict = True
    request_queue_size = 128  # socketserver's 5 would drop the probe's SYN behind a few connects

    def __init__(self, port: int, handler: type[BaseHTTPRequestHandler], max_connections: int) -> None:
        self.connections = Connections(max_connections)
        super().__init__(("127.0.0.1", port), handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        return  # a client gone mid-answer (or cut): not worth a log line per connection


class _Capped(io.BufferedIOBase):
    """A connection's reader that ends (EOF) once `budget` bytes were read through it."""

    def __init__(self, raw: io.BufferedIOBase, budget: int) -> None:
        super().__init__()
        self.raw_reader = raw
        self.budget = budget

    def _take(self, limit: int | None) -> int:
        return self.budget if limit is None or limit < 0 else min(limit, self.budget)

    def readline(self, limit: int | None = -1) -> bytes:
        line = self.raw_reader.readline(self._take(limit)) if self.budget > 0 else b""
        self.budget -= len(line)
        return line

    def read(self, size: int | None = -1) -> bytes:
        data = self.raw_reader.read(self._take(size)) if self.budget > 0 else b""
        self.budget -= len(data)
        return data


def _health_server(
    agent: Agent,
    port: int,
    max_connections: int = MAX_HEALTH_CONNECTIONS,
    healthy: Callable[[], bool] = lambda: True,
) -> _HealthServer:
    class Handler(BaseHTTPRequestHandler):
        timeout = HEALTH_TIMEOUT  # per read and write; HTTP/1.0: one request per connection

        def setup(self) -> None:
            super().setup()
            self.rfile = _Capped(self.rfile, MAX_HEALTH_REQUEST)

        def log_message(self, format: str, *args: Any) -> None:
            return

        def do_GET(self) -> None:
            if self.path == "/metrics":
                body, ctype = generate_latest(agent.metrics.registry), "text/plain; version=0.0.4"
            elif self.path in ("/healthz", "/readyz"):
                if not healthy():  # no shim can reach this agent: the kubelet restarts it
                    self.send_error(503, "the agent's socket is gone")
                    return
                body, ctype = b"ok\n", "text/plain"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = _HealthServer(port, Handler, max_connections)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server


def bind(path: str, agent: Agent) -> _SocketServer:
    """Listen on `path` (mode 0600, parent 0700), replacing a stale socket from a dead agent."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)
    old_umask = os.umask(0o177)
    try:
        server = _SocketServer(path, agent)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return server


def heartbeat(
    path: str,
    stop: threading.Event,
    interval: float = HEARTBEAT_SECONDS,
    serving: Callable[[], bool] = lambda: True,
) -> threading.Thread:
    """Touch `<socket>.alive` every `interval` while serving. It is left behind when the agent stops:
    a shim that finds the socket missing or refusing waits for a restarted agent only while this
    file is younger than its wait budget (ipam.shim), so a restart is bridged, a removed agent is not.
    Not touched while `serving()` is false (the socket is no longer this agent's): shims would wait
    for an agent they cannot reach."""
    marker = heartbeat_path(path)

    def beat() -> None:
        lost = False
        while True:
            if serving():
                _touch(marker)
            elif not lost:
                log.error("agent.socket-lost", path=path, fix="restart the agent (its /healthz fails)")
            lost = not serving()
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    return thread


def _touch(marker: str) -> None:
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.utime(fd)  # through the descriptor: never a symlink's target
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("agent.heartbeat-failed", path=marker, error=str(exc))


def warm_up() -> None:
    """Import what serving a call needs before listening: a call must not pay for the daemon's
    imports (~0.2 s of CPU, the first call of each agent in a burst of pods on new nodes)."""
    import importlib

    for name in (
        "config",
        "engine",
        "allocator",
        "nodeslices",
        "slices",
        "kubeconfig",
        "store.open",
        "store.file",
        "store.kubernetes",
        "store.kubeclient",
        "store.renewal",
    ):
        importlib.import_module(f"{__package__}.{name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ipam-agent", description="whereabouts-py node agent")
    parser.add_argument(
        "--socket", default=DEFAULT_SOCKET, help=f"unix socket to serve (default {DEFAULT_SOCKET})"
    )
    parser.add_argument(
        "--metrics-port", type=int, default=9733, help="localhost port for /metrics and /healthz (0: off)"
    )
    parser.add_argument(
        "--metrics-connections",
        type=int,
        default=MAX_HEALTH_CONNECTIONS,
        help=f"connections served at once on the metrics port (default {MAX_HEALTH_CONNECTIONS})",
    )
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=DRAIN_SECONDS,
        help=f"on SIGTERM, how long calls in flight may still run (default {DRAIN_SECONDS:g}; keep it "
        "below the pod's terminationGracePeriodSeconds)",
    )
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    log.configure(level=args.log_level)
    warm_up()
    agent = Agent()
    server = bind(args.socket, agent)
    stopping = threading.Event()
    heartbeat(args.socket, stopping, serving=server.owns_socket)
    health = (
        _health_server(agent, args.metrics_port, args.metrics_connections, server.owns_socket)
        if args.metrics_port
        else None
    )

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("agent.listening", socket=args.socket, metrics_port=args.metrics_port)
    try:
        server.serve_forever()
    finally:
        server.drain(args.drain_seconds)  # the heartbeat goes on meanwhile: a successor is expected
        stopping.set()
        if health is not None:
            health.shutdown()
            health.server_close()
        agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
