"""A long-lived Kubernetes client follows the node kubeconfig's token as the installer renews it.

deploy/install.py mints the plugin's token with a lifetime and replaces the kubeconfig (by rename)
with a third of it left. A CNI call reads the file afresh; the node agent keeps one client for its
lifetime, so that client must pick the new token up before the old one expires.
"""

from __future__ import annotations

import os
import threading
from typing import Any


def follow_token_renewal(configuration: Any, kubeconfig: str) -> None:
    """Make `configuration` send the token the kubeconfig file holds now, not the one it held at load.

    The installer renews the node's token by replacing the kubeconfig (rename, so a new inode); a
    long-lived client (the node agent) must pick the new token up before the old one expires. The
    client asks `refresh_api_key_hook` before every request: one stat, and a re-read only when the
    file was replaced. Only an inline `token` of the current context's user is taken (nothing is
    executed, no other file is read); an unreadable or tokenless replacement keeps the last good one.
    """
    inner = configuration.refresh_api_key_hook
    lock = threading.Lock()
    state: dict[str, Any] = {"seen": _file_identity(kubeconfig), "token": None}

    def hook(conf: Any) -> None:
        if inner is not None:
            inner(conf)  # the loader's own hook: it re-sets the token it loaded, and itself as the hook
            conf.refresh_api_key_hook = hook
        identity = _file_identity(kubeconfig)
        if identity is not None and identity != state["seen"]:
            with lock:
                if identity != state["seen"]:
                    token = kubeconfig_token(kubeconfig)
                    if token:
                        state["token"] = token
                    state["seen"] = identity
        if state["token"] is not None:
            conf.api_key["BearerToken"] = f"Bearer {state['token']}"

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
