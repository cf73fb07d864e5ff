"""A long-lived Kubernetes client follows the node kubeconfig's token as the installer renews it.

deploy/install.py mints the plugin's token with a lifetime and replaces the kubeconfig (by rename)
with a third of it left. A CNI call reads the file afresh; the node agent keeps one client for its
lifetime, so that client must pick the new token up before the old one expires.

`KubeconfigToken` is the client-independent part (any HTTP client asks it before each request);
`follow_token_renewal` wires it into the kubernetes package's Configuration.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any


class KubeconfigToken:
    """The inline bearer token the kubeconfig at `path` holds now: one stat per call, and a re-read
    only when the file was replaced. Only an inline `token` of the current context's user is taken
    (nothing is executed, no other file is read); an unreadable or tokenless replacement keeps the
    last good one. None until the file has been replaced once (the client keeps what it loaded)."""

    def __init__(self, path: str, read: Callable[[str], str | None] | None = None) -> None:
        self.path = path
        self.read = read or kubeconfig_token
        self._seen = _file_identity(path)
        self._token: str | None = None
        self._lock = threading.Lock()

    def current(self) -> str | None:
        identity = _file_identity(self.path)
        if identity is not None and identity != self._seen:
            with self._lock:
                if identity != self._seen:
                    try:
                        token = self.read(self.path)
                    except Exception:  # a replacement the loader refuses: keep the last good token
                        token = None
                    if token:
                        self._token = token
                    self._seen = identity
        return self._token


def follow_token_renewal(
    configuration: Any, kubeconfig: str, read: Callable[[str], str | None] | None = None
) -> None:
    """Make a kubernetes-package `configuration` send the token `kubeconfig` holds now: the client
    asks `refresh_api_key_hook` before every request. `read` extracts the token from a replaced file
    (the CNI path passes its inline-only, root-owned-file loader); by default `kubeconfig_token`."""
    inner = configuration.refresh_api_key_hook
    source = KubeconfigToken(kubeconfig, read)

    def hook(conf: Any) -> None:
        if inner is not None:
            inner(conf)  # the loader's own hook: it re-sets the token it loaded, and itself as the hook
            conf.refresh_api_key_hook = hook
        token = source.current()
        if token is not None:
            conf.api_key["BearerToken"] = f"Bearer {token}"

    configuration.refresh_api_key_hook = hook


def kubeconfig_token(path: str) -> str | None:
    """The inline bearer token of the kubeconfig's current-context user; None when there is none."""
    import yaml

    try:
        with open(path, "rb") as f:
            doc = yaml.safe_load(f)
        context_name = doc["current-context"]
        context = next(c["context"] for c in doc["contexts"] if c["name"] == context_name)
        user = next(u["user"] for u in doc["users"] if u["name"] == context["user"])
        token = user.get("token")
    except (OSError, yaml.YAMLError, KeyError, TypeError, StopIteration, AttributeError):
        return None
    return token if isinstance(token, str) and token else None


def _file_identity(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
