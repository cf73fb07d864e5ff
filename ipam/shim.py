"""The CNI executable's fast path: forward the call to the node agent over its unix socket.

Every pod pays this module's imports, so until the agent has answered it imports nothing but the C
modules `_socket` and `_json` (and `posix`, built in): `socket` would pull in `enum`/`selectors`/
`collections` and `json` pulls in `re`, ~10 ms per exec together on a 2-core host, and under -S even
`os` is not loaded at start-up (1.4 ms of CPU). tests/test_shim_imports.py holds it to that. Logging,
the CNI layer, pydantic etc. are imported only once the agent declined.

`try_agent` returns None whenever the agent cannot answer (no socket, refused, died mid-call, timed
out); the caller then runs the call in-process (direct mode). That fallback cannot double-allocate:
an ADD is idempotent by pod reference + interface, so a repeat finds the lease the agent may already
have written.

Agent restarts are not outages. While an agent serves, it touches a heartbeat file beside its socket
(`<socket>.alive`, see `ipam.agent`). When the socket is missing or refusing, or the agent closed the
connection without answering, the shim keeps retrying for as long as that heartbeat is younger than
the wait budget ($WHEREABOUTS_PY_AGENT_WAIT seconds, default 15, 0 = never wait) and then falls back.
A node that never ran an agent has no heartbeat file and falls back at once; a node whose agent was
removed stops waiting once its last heartbeat is older than the budget.
"""

import posix
import sys

try:  # the C halves of socket and json: the pure-Python wrappers cost more than the whole call
    import _json
    import _socket
except ImportError:  # an interpreter without them (not CPython): the regular modules do the same
    _json = None  # type: ignore[assignment]
    _socket = None  # type: ignore[assignment]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

DEFAULT_SOCKET = "/run/whereabouts-py/agent.sock"
# The shim's wait must outlast everything the agent may still do for the call, or its direct-mode
# fallback runs while the agent works on (and may roll back) the same ADD. So: the largest
# retry_deadline_seconds the config accepts, plus the rollback's own budget, plus one API request in
# flight at the deadline; still below kubelet's 4 minutes. The agent is also told this wait and
# shortens its deadline to fit inside it (ipam.agent), so a lower WHEREABOUTS_PY_AGENT_TIMEOUT holds too.
MAX_DEADLINE = 200.0  # config.IPAMConfig.retry_deadline_seconds (le=200)
ROLLBACK_SECONDS = 10.0  # engine.RetryPolicy.rollback_seconds
WORK_MARGIN = 20.0  # one API request in flight at the deadline (connect 5 s + read 15 s)
DEFAULT_TIMEOUT = MAX_DEADLINE + ROLLBACK_SECONDS + WORK_MARGIN
DEFAULT_WAIT = 15.0  # how long a restarting agent may be away before calls run in direct mode
MAX_WAIT = 120.0  # a misconfigured wait must not eat kubelet's 4-minute budget
HEARTBEAT_SUFFIX = ".alive"
RETRY_INTERVAL = 0.05
MAX_REPLY = 16 << 20
# The largest request the agent reads (ipam.agent). A longer one would be cut there, refused, and
# repeated by the wait below: such a call (a tenant's NAD near etcd's 1.5 MiB in non-ASCII text is
# 3x that once escaped) runs in direct mode at once instead.
MAX_REQUEST = 4 << 20
FORWARDED = ("CNI_", "K8S_", "NODENAME")


class AgentUnavailable(Exception):
    """The agent did not answer; `retry` when it may answer a repeat of the call (it was away)."""

    def __init__(self, message: str, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


def socket_path(env: "Mapping[str, str]", stdin: bytes = b"") -> str:
    """$WHEREABOUTS_PY_AGENT_SOCKET, else the node flat file's `agent_socket`, else the default.

    Never the network config's `ipam.agent_socket`: a tenant's socket would answer for the root shim
    (and its forged reply become the CNI result). `stdin` is unused, kept for callers."""
    if env.get("WHEREABOUTS_PY_AGENT_SOCKET"):
        return env["WHEREABOUTS_PY_AGENT_SOCKET"]
    return flat_file_agent_socket(env) or DEFAULT_SOCKET


# -- the node flat file's agent_socket: ipam.flatfile's rules with posix and _json only ---------------
# (ipam.flatfile imports json, os, stat and typing: several ms on every exec of a node whose runtime
# does not set WHEREABOUTS_PY_AGENT_SOCKET; tests/test_shim_imports.py checks both agree)

FLAT_FILE_ENV = "WHEREABOUTS_PY_FLAT_FILE"
DEFAULT_FLAT_FILES = (
    "/etc/kubernetes/cni/net.d/whereabouts.d/whereabouts.conf",
    "/etc/cni/net.d/whereabouts.d/whereabouts.conf",
)
MAX_NODE_FILE = 1 << 20
_S_IFMT, _S_IFREG = 0o170000, 0o100000


def _read_node_file(path: str) -> "bytes | None":
    """flatfile.read_node_file: a regular file owned by our euid, writable by nobody else (else None)."""
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC | posix.O_NONBLOCK | posix.O_NOCTTY)
    except (OSError, ValueError):
        return None
    try:
        st = posix.fstat(fd)
        if (st.st_mode & _S_IFMT) != _S_IFREG or st.st_uid != posix.geteuid() or st.st_mode & 0o022:
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = posix.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > MAX_NODE_FILE:
                return None
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        posix.close(fd)


def flat_file_agent_socket(env: "Mapping[str, str]") -> "str | None":
    """flatfile.agent_socket: the first flat file that is a regular file, its `agent_socket` if usable."""
    override = env.get(FLAT_FILE_ENV, "")
    for path in (override,) if override else DEFAULT_FLAT_FILES:
        try:
            if "\0" in path or (posix.stat(path).st_mode & _S_IFMT) != _S_IFREG:
                continue
        except (OSError, ValueError):
            continue
        data = _read_node_file(path)
        try:
            doc = _loads(data) if data is not None else None
        except (ValueError, UnicodeDecodeError):
            return None
        value = doc.get("agent_socket") if isinstance(doc, dict) else None
        return value if isinstance(value, str) and value and "\0" not in value else None
    return None


def heartbeat_path(path: str) -> str:
    return path + HEARTBEAT_SUFFIX


# -- JSON without the json package ------------------------------------------------------------------


class _ScanContext:
    """What _json's C scanner reads from a json.JSONDecoder: plain JSON, no hooks."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> float:
        raise ValueError(f"unexpected JSON constant {name}")


def _loads(data: bytes) -> object:
    """json.loads for a whole document (ValueError when it is not exactly one JSON value)."""
    text = data.decode("utf-8").strip(" \t\r\n")
    if _json is None:
        import json

        return json.loads(text)
    try:
        value, end = _json.make_scanner(_ScanContext)(text, 0)  # type: ignore[arg-type]
    except StopIteration:
        raise ValueError("not JSON") from None
    except Exception as exc:  # the C scanner's JSONDecodeError (a ValueError) and kin
        raise ValueError(str(exc)) from None
    if end != len(text):
        raise ValueError("extra data after the JSON value")
    return value


def _dumps_request(env: "Mapping[str, str]", stdin: str, timeout: float) -> bytes:
    """json.dumps({"env": env, "stdin": stdin, "timeout": timeout}) (ASCII, \\u escapes); `timeout`
    tells the agent how long this shim waits, so it fits its work for the call inside it."""
    if _json is None:
        import json

        return json.dumps({"env": dict(env), "stdin": stdin, "timeout": timeout}).encode()
    quote = _json.encode_basestring_ascii
    pairs = ", ".join(f"{quote(k)}: {quote(v)}" for k, v in env.items())
    return f'{{"env": {{{pairs}}}, "stdin": {quote(stdin)}, "timeout": {float(timeout)!r}}}'.encode("ascii")


# -- one round trip ---------------------------------------------------------------------------------


def _connect(path: str, timeout: float) -> "_socket.socket":
    if _socket is None:
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def exchange(path: str, request: bytes, timeout: float) -> "tuple[int, str]":
    """One request/answer with the agent; AgentUnavailable(retry=...) when there is none."""
    try:
        sock = _connect(path, timeout)
    except (FileNotFoundError, ConnectionRefusedError, BlockingIOError) as exc:
        # away (not listening yet, or a stale socket file), or its backlog is full: worth a repeat
        raise AgentUnavailable(f"{type(exc).__name__}: {exc}", retry=True) from None
    except OSError as exc:
        raise AgentUnavailable(f"{type(exc).__name__}: {exc}", retry=False) from None
    chunks: list[bytes] = []
    try:
        sock.sendall(request + b"\n")
        sock.shutdown(1)  # SHUT_WR: the request is complete
        size = 0
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REPLY:
                raise AgentUnavailable("agent reply too large", retry=False)
    except TimeoutError as exc:  # the agent is there but slow: a repeat would only wait again
        raise AgentUnavailable(f"{type(exc).__name__}: {exc}", retry=False) from None
    except OSError as exc:  # reset or broken pipe: the agent went away mid-call
        raise AgentUnavailable(f"{type(exc).__name__}: {exc}", retry=True) from None
    finally:
        sock.close()
    if not chunks:  # closed without an answer: the agent stopped (or refused the request)
        raise AgentUnavailable("the agent closed the connection without an answer", retry=True)
    try:
        reply = _loads(b"".join(chunks))
        if not isinstance(reply, dict):
            raise ValueError("agent reply is not an object")
        code, stdout = reply["code"], reply["stdout"]
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise AgentUnavailable(f"malformed agent reply: {exc}", retry=False) from None
    if not isinstance(code, int) or not isinstance(stdout, str):
        raise AgentUnavailable("malformed agent reply", retry=False)
    return code, stdout


def _seen_within(path: str, seconds: float) -> bool:
    """True when the agent's heartbeat file was touched less than `seconds` ago."""
    try:
        mtime = posix.stat(heartbeat_path(path)).st_mtime
    except OSError:
        return False
    import time

    return time.time() - mtime < seconds


def _log_unavailable(path: str, error: str, waited: float) -> None:
    from .log import log

    log.info("agent.unavailable", socket=path, error=error, waited_s=round(waited, 3), fallback="direct mode")


def forward(
    env: "Mapping[str, str]", stdin: bytes, path: str, timeout: float, wait: float = 0.0
) -> "tuple[int, str] | None":
    """(exit code, stdout) from the agent, or None when it could not answer.

    While the agent is away (socket missing or refusing, connection closed unanswered) and its
    heartbeat is younger than `wait` seconds, the call is repeated every RETRY_INTERVAL until
    `wait` seconds have passed: a repeated ADD is idempotent, so a call the old agent may already
    have served gets the same lease from the new one.
    """
    if not path:
        return None
    forwarded = {k: v for k, v in env.items() if k.startswith(FORWARDED)}
    request = _dumps_request(forwarded, stdin.decode("utf-8", errors="surrogateescape"), timeout)
    if len(request) >= MAX_REQUEST:  # the newline ends it within the agent's limit
        _log_unavailable(path, f"request of {len(request)} bytes is over the agent's {MAX_REQUEST}", 0.0)
        return None
    started = None
    while True:
        try:
            answer = exchange(path, request, timeout)
            if started is not None:
                from .log import log

                log.info("agent.back", socket=path, waited_s=round(_now() - started, 3))
            return answer
        except AgentUnavailable as exc:
            error = str(exc)
            if not exc.retry or wait <= 0 or not _seen_within(path, wait):
                if started is not None or _exists(path) or _exists(heartbeat_path(path)):
                    _log_unavailable(path, error, 0.0 if started is None else _now() - started)
                return None  # no agent here at all: direct mode without a word
        if started is None:
            started = _now()
            from .log import log

            log.info("agent.waiting", socket=path, error=error, wait_s=wait)
        elif _now() - started >= wait:
            _log_unavailable(path, error, _now() - started)
            return None
        _sleep(RETRY_INTERVAL)


def _exists(path: str) -> bool:
    try:
        posix.stat(path)
    except (OSError, ValueError):
        return False
    return True


def environ() -> "dict[str, str]":
    """os.environ's contents without importing os (decoded as os.environ decodes them)."""
    encoding = sys.getfilesystemencoding()
    return {
        k.decode(encoding, "surrogateescape"): v.decode(encoding, "surrogateescape")
        for k, v in posix.environ.items()
    }


def _now() -> float:
    import time

    return time.monotonic()


def _sleep(seconds: float) -> None:
    import time

    time.sleep(seconds)


def _seconds(env: "Mapping[str, str]", name: str, default: float, cap: float) -> float:
    try:
        value = float(env.get(name) or default)
    except ValueError:
        return default
    return min(max(value, 0.0), cap) if value == value else default  # NaN: the default


def try_agent(env: "Mapping[str, str]", stdin: bytes) -> "tuple[int, str] | None":
    if env.get("CNI_COMMAND", "") in ("", "VERSION") or env.get("WHEREABOUTS_PY_DIRECT"):
        return None  # answered locally (or direct mode asked for): no agent round trip
    timeout = _seconds(env, "WHEREABOUTS_PY_AGENT_TIMEOUT", DEFAULT_TIMEOUT, DEFAULT_TIMEOUT * 10)
    wait = _seconds(env, "WHEREABOUTS_PY_AGENT_WAIT", DEFAULT_WAIT, MAX_WAIT)
    return forward(env, stdin, socket_path(env, stdin), timeout, wait)


def read_stdin() -> bytes:
    stdin = sys.stdin
    if stdin is None or stdin.isatty():
        return b""
    return stdin.buffer.read()


def dumps_str(text: str) -> str:
    """json.dumps of one string (ASCII, \\u escapes)."""
    if _json is None:
        import json

        return json.dumps(text)
    return str(_json.encode_basestring_ascii(text))
