"""ipam-controller's admission webhook (ipam.webhook), served by every replica, leader or not: its flags,
its certificate kept in the Secret and the caBundle (ipam.webhook_certs.CertKeeper), its server."""

from __future__ import annotations

import argparse
import ipaddress
import os
import tempfile
import threading

from ..store.kubernetes import KubernetesStore


def webhook_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("admission webhook (every replica serves it, leader or not)")
    group.add_argument(
        "--webhook-bind-address",
        default="",
        help="host:port of the validating admission webhook (ipam.webhook), e.g. :9443; default: off",
    )
    group.add_argument(
        "--webhook-cert-dir",
        help="writable directory for the serving certificate's tls.crt and tls.key (default: "
        "whereabouts-py-webhook in the temporary directory)",
    )
    group.add_argument(
        "--webhook-allow-node-only-keys",
        action="store_true",
        help="admit NADs whose ipam block sets node-only keys (the cluster's nodes are trusted to "
        "agree with them); default: refused, as the plugin refuses them at ADD",
    )
    group.add_argument(
        "--webhook-service",
        default="whereabouts-py-controller",
        help="the Service the API server calls: the serving certificate names it in --namespace",
    )
    group.add_argument(
        "--webhook-cert-names",
        default="",
        metavar="NAME,...",
        help="DNS names and IP addresses for the serving certificate instead of the Service's "
        "(a `url` clientConfig)",
    )
    group.add_argument(
        "--webhook-config",
        default="whereabouts-py",
        help="the ValidatingWebhookConfiguration whose caBundle the controller keeps",
    )


class Webhook:
    """The webhook in this process: its certificate kept (CertKeeper) and its server."""

    def __init__(self, args: argparse.Namespace, store: KubernetesStore) -> None:
        from ..webhook import Policy, project_identities, serve_webhook
        from ..webhook_certs import CertKeeper

        certdir = args.webhook_cert_dir or os.path.join(tempfile.gettempdir(), "whereabouts-py-webhook")
        names = [n.strip() for n in args.webhook_cert_names.split(",") if n.strip()]
        ips = tuple(n for n in names if _is_address(n))
        os.makedirs(certdir, mode=0o700, exist_ok=True)
        self.keeper = CertKeeper(
            store.client,
            store.namespace,
            certdir,
            service=args.webhook_service,
            ips=ips,
            hosts=tuple(n for n in names if n not in ips),
            config=args.webhook_config,
        )
        self.keeper.refresh()
        policy = Policy(
            allow_node_only_keys=args.webhook_allow_node_only_keys,
            trusted_users=project_identities(store.namespace),
        )
        self.server = serve_webhook(
            args.webhook_bind_address, self.keeper.certfile, self.keeper.keyfile, policy
        )
        self.stopping = threading.Event()
        threading.Thread(
            target=self.keeper.run, args=(self.server, self.stopping), name="webhook-certs", daemon=True
        ).start()

    def stop(self) -> None:
        self.stopping.set()
        self.server.stop()


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
