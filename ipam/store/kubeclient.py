"""A small Kubernetes REST client on the standard library (http.client + ssl) for the datastore.

The `kubernetes` package costs ~0.4 s to import, paid by every direct-mode CNI call; the datastore
needs a handful of JSON requests, so it speaks HTTP itself: keep-alive connections (a small pool,
shared by the node agent's threads), connect/read timeouts, JSON in and out. Credentials come from a
kubeconfig (client certificate or token, inline or in files; CA inline or in a file) or the pod's
service account; exec and auth-provider plugins are refused with a message naming the kubeconfig.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlencode, urlsplit

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_REREAD_SECONDS = 60.0  # projected service-account tokens rotate; client-go re-reads once a minute
DEFAULT_TIMEOUT = (5.0, 15.0)  # connect, read


class KubeconfigError(ValueError):
    """The kubeconfig (or in-cluster environment) cannot give usable credentials."""


class CredentialPluginError(KubeconfigError):
    """The kubeconfig's user runs an exec or auth-provider plugin (`load_with_plugins` can, for tools)."""


class ApiError(Exception):
    """An HTTP error answer; `status` 0 for a connection failure."""

    def __init__(
        self, status: int, reason: str, body: str = "", headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"HTTP {status} {reason}")
        self.status = status
        self.reason = reason
        self.body = body
        self.headers = headers or {}

    def retry_after(self) -> float | None:
        value = self.headers.get("retry-after")
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None


@dataclass(frozen=True)
class KubeCredentials:
    """Where the API server is and how to prove who we are; all material inline (bytes/str).

    `token_file` is kept (besides `token`, its content at load time) so a long-running process can
    pick up a rotated token.
    """

    server: str
    ca_data: bytes | None = None
    client_cert_data: bytes | None = None
    client_key_data: bytes | None = None
    token: str | None = None
    token_file: str | None = None
    namespace: str | None = None
    insecure_skip_tls_verify: bool = False
    tls_server_name: str | None = None


class Credentials(Protocol):
    """What KubeClient reads: KubeCredentials here, or ipam.kubeconfig's (the node kubeconfig's)."""

    @property
    def server(self) -> str: ...
    @property
    def ca_data(self) -> bytes | None: ...
    @property
    def client_cert_data(self) -> bytes | None: ...
    @property
    def client_key_data(self) -> bytes | None: ...
    @property
    def token(self) -> str | None: ...
    @property
    def insecure_skip_tls_verify(self) -> bool: ...
    @property
    def tls_server_name(self) -> str | None: ...


# -- loading credentials ------------------------------------------------------------------------------


def _parse_document(text: str, path: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)  # what deploy/install.py writes: no YAML parser needed
    except ValueError:
        import yaml

        try:
            doc = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except yaml.YAMLError as exc:
            raise KubeconfigError(f"{path} is neither JSON nor YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise KubeconfigError(f"{path} is not a kubeconfig (not a mapping)")
    return doc


def _named(doc: dict[str, Any], kind: str, name: str, path: str) -> dict[str, Any]:
    key = kind[:-1]  # clusters -> cluster
    for item in doc.get(kind) or []:
        if isinstance(item, dict) and item.get("name") == name:
            value = item.get(key) or {}
            if not isinstance(value, dict):
                raise KubeconfigError(f"{path}: {key} {name!r} is not a mapping")
            return value
    raise KubeconfigError(f"{path}: no {key} named {name!r}")


def _b64(value: Any, field: str, path: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except ValueError:
        raise KubeconfigError(f"{path}: {field} is not valid base64") from None


def _file(value: Any, base_dir: str, field: str, path: str) -> bytes:
    target = os.path.join(base_dir, str(value))  # relative paths are relative to the kubeconfig
    try:
        with open(target, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise KubeconfigError(f"{path}: {field} {target}: {exc.strerror or exc}") from None


def _inline_or_file(section: dict[str, Any], key: str, base_dir: str, path: str) -> bytes | None:
    if section.get(f"{key}-data"):
        return _b64(section[f"{key}-data"], f"{key}-data", path)
    if section.get(key):
        return _file(section[key], base_dir, key, path)
    return None


def load_kubeconfig(path: str) -> KubeCredentials:
    """The current context's server, credentials and namespace from a kubeconfig file."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise KubeconfigError(f"cannot read {path}: {exc}") from None
    doc = _parse_document(text, path)
    current = doc.get("current-context")
    if not current:
        raise KubeconfigError(f"{path}: no current-context")
    context = _named(doc, "contexts", str(current), path)
    cluster = _named(doc, "clusters", str(context.get("cluster", "")), path)
    user = _named(doc, "users", str(context.get("user", "")), path) if context.get("user") else {}
    base_dir = os.path.dirname(os.path.abspath(path))
    for plugin in ("exec", "auth-provider"):
        if user.get(plugin):
            raise CredentialPluginError(
                f"{path}: user {context.get('user')!r} uses an {plugin} credential plugin, which the CNI "
                "plugin does not run; use a client certificate or a token"
            )
    server = str(cluster.get("server") or "")
    if not server:
        raise KubeconfigError(f"{path}: cluster {context.get('cluster')!r} has no server")
    token = user.get("token")
    token_file = None
    if not token and user.get("tokenFile"):
        token_file = os.path.join(base_dir, str(user["tokenFile"]))
        token = _file(user["tokenFile"], base_dir, "tokenFile", path).decode().strip()
    cert = _inline_or_file(user, "client-certificate", base_dir, path)
    key = _inline_or_file(user, "client-key", base_dir, path)
    if (cert is None) != (key is None):
        raise KubeconfigError(f"{path}: a client certificate needs both client-certificate and client-key")
    return KubeCredentials(
        server=server,
        ca_data=_inline_or_file(cluster, "certificate-authority", base_dir, path),
        client_cert_data=cert,
        client_key_data=key,
        token=str(token) if token else None,
        token_file=token_file,
        namespace=str(context["namespace"]) if context.get("namespace") else None,
        insecure_skip_tls_verify=bool(cluster.get("insecure-skip-tls-verify")),
        tls_server_name=str(cluster["tls-server-name"]) if cluster.get("tls-server-name") else None,
    )


def load_with_plugins(path: str) -> KubeCredentials:
    """Credentials from a kubeconfig whose user runs an exec or auth-provider plugin, obtained through
    the `kubernetes` package (imported only here). For tools an administrator runs with their own
    kubeconfig (ipam-reconcile --kubeconfig), never for the CNI path."""
    from kubernetes import client
    from kubernetes import config as untyped_config

    config: Any = untyped_config  # an untyped module
    configuration = client.Configuration()
    try:
        config.load_kube_config(config_file=path, client_configuration=configuration)
        _, active = config.list_kube_config_contexts(config_file=path)
    except Exception as exc:  # the package's ConfigException and whatever a plugin raised
        raise KubeconfigError(f"{path}: {exc}") from None

    def read(file: str | None) -> bytes | None:
        return _file(file, "", "credential file", path) if file else None

    auth = str(configuration.api_key.get("authorization") or configuration.api_key.get("BearerToken") or "")
    token = auth.split(" ", 1)[1] if auth.lower().startswith("bearer ") else auth or None
    namespace = (active or {}).get("context", {}).get("namespace")
    return KubeCredentials(
        server=str(configuration.host),
        ca_data=read(configuration.ssl_ca_cert),
        client_cert_data=read(configuration.cert_file),
        client_key_data=read(configuration.key_file),
        token=token,
        namespace=str(namespace) if namespace else None,
        insecure_skip_tls_verify=not configuration.verify_ssl,
    )


def in_cluster(sa_dir: str = SA_DIR, env: Mapping[str, str] | None = None) -> KubeCredentials:
    """The pod's service account, as client-go's rest.InClusterConfig reads it."""
    env = os.environ if env is None else env
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise KubeconfigError("not in a cluster: KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are not set")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    token_file = os.path.join(sa_dir, "token")
    token = _file(token_file, sa_dir, "token", "in-cluster service account").decode().strip()
    ca = _file(os.path.join(sa_dir, "ca.crt"), sa_dir, "ca.crt", "in-cluster service account")
    return KubeCredentials(server=f"https://{host}:{port}", ca_data=ca, token=token, token_file=token_file)


# -- the client ---------------------------------------------------------------------------------------


def _ssl_context(creds: Credentials) -> ssl.SSLContext:
    if creds.ca_data:
        context = ssl.create_default_context(cadata=creds.ca_data.decode("ascii", errors="replace"))
    else:
        context = ssl.create_default_context()
    if creds.insecure_skip_tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if creds.client_cert_data and creds.client_key_data:
        _load_client_cert(context, creds.client_cert_data, creds.client_key_data)
    return context


def _load_client_cert(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """ssl loads certificates only from files: hand it an anonymous in-memory one (no disk copy)."""
    fd = os.memfd_create("kube-client-cert", os.MFD_CLOEXEC)
    try:
        os.write(fd, cert.rstrip(b"\n") + b"\n" + key)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    except ssl.SSLError as exc:
        raise KubeconfigError(f"client certificate or key cannot be used: {exc}") from None
    finally:
        os.close(fd)


class _NamedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address whose certificate names another host (kubeconfig `tls-server-name`)."""

    def __init__(
        self, host: str, port: int, timeout: float, context: ssl.SSLContext, server_name: str
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self.server_name = server_name
        self.tls_context = context

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)  # TCP only
        self.sock = self.tls_context.wrap_socket(self.sock, server_hostname=self.server_name)


class KubeClient:
    """JSON requests to one API server over a small pool of keep-alive connections (thread-safe)."""

    def __init__(
        self, creds: Credentials, timeout: tuple[float, float] = DEFAULT_TIMEOUT, pool_size: int = 32
    ) -> None:
        url = urlsplit(creds.server)
        if url.scheme not in ("https", "http") or not url.hostname:
            raise KubeconfigError(f"server {creds.server!r} is not an http(s) URL")
        self.creds = creds
        self.https = url.scheme == "https"
        self.host = url.hostname
        self.port = url.port or (443 if self.https else 80)
        self.prefix = url.path.rstrip("/")
        self.timeout = timeout
        self.pool_size = pool_size
        self.context = _ssl_context(creds) if self.https else None
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._token = creds.token
        self._token_file: str | None = getattr(creds, "token_file", None)  # re-read: it rotates
        self._token_read = time.monotonic()
        #: the kubeconfig's token as the installer renews it (ipam.store.renewal), when set
        self.kubeconfig_token: Any = None

    def _new_connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self.https and self.context is not None and self.creds.tls_server_name:
            conn = _NamedHTTPSConnection(
                self.host, self.port, self.timeout[0], self.context, self.creds.tls_server_name
            )
        elif self.https:
            conn = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout[0], context=self.context
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout[0])
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(self.timeout[1])  # connected: from now on the read timeout applies
        return conn

    def warm(self) -> None:
        """Open one connection now (TCP + TLS handshake), e.g. before taking a node lock."""
        conn = self._new_connection()
        with self._lock:
            self._idle.append(conn)

    def _authorization(self) -> str | None:
        token_file = self._token_file
        if token_file and time.monotonic() - self._token_read > TOKEN_REREAD_SECONDS:
            try:
                with open(token_file, encoding="utf-8") as fh:
                    self._token = fh.read().strip() or self._token
            except OSError:
                pass  # keep the last token; the server says 401 if it expired
            self._token_read = time.monotonic()
        if self.kubeconfig_token is not None:
            self._token = self.kubeconfig_token.current() or self._token
        return f"Bearer {self._token}" if self._token else None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
        accept: str = "application/json",
        content_type: str = "application/json",
    ) -> Any:
        """The decoded JSON answer; ApiError for an HTTP error, OSError/HTTPException on the wire.
        `content_type`: of `body` (a PATCH names its kind of patch here)."""
        target = self.prefix + path + (f"?{urlencode(params)}" if params else "")
        headers = {"Accept": accept, "User-Agent": "whereabouts-py"}
        auth = self._authorization()
        if auth:
            headers["Authorization"] = auth
        payload = None
        if body is not None:
            payload = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = content_type
        for attempt in (0, 1):
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            reused = conn is not None
            if conn is None:
                conn = self._new_connection()
            try:
                conn.request(method, target, body=payload, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                # the server may have closed an idle keep-alive connection: a GET is asked again; a write
                # is not (it may have been carried out, its answer lost: the engine re-reads and decides)
                if reused and attempt == 0 and method == "GET":
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            self._release(conn, response)
            if response.status >= 400:
                raise ApiError(
                    response.status,
                    response.reason,
                    data.decode("utf-8", errors="replace"),
                    {k.lower(): v for k, v in response.getheaders()},
                )
            return json.loads(data) if data else {}
        raise AssertionError("unreachable")

    def stream(
        self, path: str, params: dict[str, Any], accept: str, read_timeout: float
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """A GET whose answer is read as it comes (a watch): its own connection, never pooled; the
        caller reads lines from the response and closes the connection."""
        headers = {"Accept": accept, "User-Agent": "whereabouts-py"}
        auth = self._authorization()
        if auth:
            headers["Authorization"] = auth
        conn = self._new_connection()
        try:
            assert conn.sock is not None
            conn.sock.settimeout(read_timeout)
            conn.request("GET", self.prefix + path + f"?{urlencode(params)}", headers=headers)
            response = conn.getresponse()
            if response.status >= 400:
                data = response.read()
                raise ApiError(response.status, response.reason, data.decode("utf-8", errors="replace"))
        except BaseException:
            conn.close()
            raise
        return conn, response

    def _release(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        if response.will_close:
            conn.close()
            return
        with self._lock:
            if len(self._idle) < self.pool_size:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def path_quote(name: str) -> str:
    return quote(name, safe="")
