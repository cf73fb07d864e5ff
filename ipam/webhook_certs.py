"""The webhook's certificates: a CA and a serving certificate the controller makes itself, keeps in a
Secret, and whose CA it writes into its own ValidatingWebhookConfiguration's caBundle.

The Secret (`whereabouts-py-webhook-cert`) ships empty with the manifests, so the controller needs
only get + update on it and get + update on its one ValidatingWebhookConfiguration, both limited by
`resourceNames` (deploy/base/webhook.yaml). Two replicas starting at once both make certificates; the
Secret's update is conditional (resourceVersion), the loser re-reads and uses the winner's.

`api` is anything with `request(method, path, body=None, params=None) -> decoded JSON` that raises an
exception carrying the HTTP `status` (ipam.store.kubeclient.KubeClient).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .log import log

SECRET_NAME = "whereabouts-py-webhook-cert"
WEBHOOK_CONFIG_NAME = "whereabouts-py"
CA_DAYS = 3650
SERVING_DAYS = 365
RENEW_BEFORE = datetime.timedelta(days=30)
_KEYS = ("ca.crt", "ca.key", "tls.crt", "tls.key")


class Api(Protocol):
    def request(
        self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None
    ) -> Any: ...


class CertError(Exception):
    """The Secret or the webhook configuration cannot be kept (missing, or refused)."""


@dataclass(frozen=True)
class Certificates:
    """PEM bytes: the CA (its key signs renewals) and the serving pair."""

    ca_cert: bytes
    ca_key: bytes
    cert: bytes
    key: bytes


def service_names(service: str, namespace: str) -> list[str]:
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _builder(
    subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, now: datetime.datetime, days: int
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks of the API server may lag
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def make_ca(now: datetime.datetime | None = None) -> tuple[bytes, bytes]:
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "whereabouts-py-webhook-ca")])
    cert = (
        _builder("whereabouts-py-webhook-ca", name, key, now, CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def make_serving(
    ca_cert: bytes,
    ca_key: bytes,
    names: list[str],
    ips: tuple[str, ...] = (),
    now: datetime.datetime | None = None,
) -> tuple[bytes, bytes]:
    now = now or _now()
    ca = x509.load_pem_x509_certificate(ca_cert)
    signer = serialization.load_pem_private_key(ca_key, None)
    if not isinstance(signer, ec.EllipticCurvePrivateKey):
        raise CertError("the CA key in the Secret is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        _builder(names[0] if names else "whereabouts-py-webhook", ca.subject, key, now, SERVING_DAYS)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(signer, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def make_certificates(
    names: list[str], ips: tuple[str, ...] = (), now: datetime.datetime | None = None
) -> Certificates:
    ca_cert, ca_key = make_ca(now)
    return Certificates(ca_cert, ca_key, *make_serving(ca_cert, ca_key, names, ips, now))


def usable(
    certs: Certificates, names: list[str], ips: tuple[str, ...] = (), now: datetime.datetime | None = None
) -> bool:
    """The serving certificate is signed by the CA, names every name and address, and is not near
    its end (nor is the CA)."""
    now = now or _now()
    try:
        ca = x509.load_pem_x509_certificate(certs.ca_cert)
        cert = x509.load_pem_x509_certificate(certs.cert)
        key = serialization.load_pem_private_key(certs.key, None)
        cert.verify_directly_issued_by(ca)
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    if key.public_key() != cert.public_key():
        return False
    covered = set(alt.get_values_for_type(x509.DNSName)) >= set(names) and {
        str(a) for a in alt.get_values_for_type(x509.IPAddress)
    } >= {str(ipaddress.ip_address(i)) for i in ips}
    ends = min(ca.not_valid_after_utc, cert.not_valid_after_utc)
    return covered and ends - now > RENEW_BEFORE


def _decode(secret: dict[str, Any]) -> Certificates | None:
    data = secret.get("data") or {}
    if not all(data.get(k) for k in _KEYS):
        return None
    try:
        ca_cert, ca_key, cert, key = (base64.b64decode(data[k], validate=True) for k in _KEYS)
    except ValueError:
        return None
    return Certificates(ca_cert, ca_key, cert, key)


def _renewed(
    old: Certificates | None, names: list[str], ips: tuple[str, ...], now: datetime.datetime
) -> Certificates:
    """A new serving pair under the old CA while that CA has years left; otherwise a new CA too."""
    if old is not None:
        try:
            ca = x509.load_pem_x509_certificate(old.ca_cert)
            if ca.not_valid_after_utc - now > datetime.timedelta(days=SERVING_DAYS) + RENEW_BEFORE:
                return Certificates(
                    old.ca_cert, old.ca_key, *make_serving(old.ca_cert, old.ca_key, names, ips, now)
                )
        except (ValueError, TypeError, CertError):
            pass
    return make_certificates(names, ips, now)


def _status(exc: Exception) -> int:
    return int(getattr(exc, "status", 0) or 0)


def ensure_secret(
    api: Api, namespace: str, names: list[str], ips: tuple[str, ...] = (), secret: str = SECRET_NAME,
    now: datetime.datetime | None = None,
) -> Certificates:  # fmt: skip
    """The certificates in the Secret, made (or renewed) and stored first when they are not usable."""
    now = now or _now()
    path = f"/api/v1/namespaces/{namespace}/secrets/{secret}"
    for _ in range(5):
        try:
            obj = api.request("GET", path)
        except Exception as exc:
            raise CertError(
                f"cannot read Secret {namespace}/{secret} (it ships with the manifests): {exc}"
            ) from exc
        old = _decode(obj)
        if old is not None and usable(old, names, ips, now):
            return old
        certs = _renewed(old, names, ips, now)
        obj["data"] = {
            k: base64.b64encode(v).decode()
            for k, v in zip(_KEYS, (certs.ca_cert, certs.ca_key, certs.cert, certs.key), strict=True)
        }
        try:
            api.request("PUT", path, obj)  # conditional: obj carries the resourceVersion read
            return certs
        except Exception as exc:
            if _status(exc) != 409:
                raise CertError(f"cannot update Secret {namespace}/{secret}: {exc}") from exc
    raise CertError(f"Secret {namespace}/{secret} kept changing under us")


def ensure_ca_bundle(api: Api, ca_cert: bytes, config: str = WEBHOOK_CONFIG_NAME) -> bool:
    """Write the CA into every webhook of the ValidatingWebhookConfiguration; True when it changed.
    Call it at start and now and then: a re-apply of the manifests empties the caBundle."""
    path = f"/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/{config}"
    bundle = base64.b64encode(ca_cert).decode()
    for _ in range(5):
        try:
            obj = api.request("GET", path)
        except Exception as exc:
            raise CertError(f"cannot read ValidatingWebhookConfiguration {config}: {exc}") from exc
        hooks = obj.get("webhooks") or []
        if all(h.get("clientConfig", {}).get("caBundle") == bundle for h in hooks):
            return False
        for hook in hooks:
            hook.setdefault("clientConfig", {})["caBundle"] = bundle
        try:
            api.request("PUT", path, obj)
            return True
        except Exception as exc:
            if _status(exc) != 409:
                raise CertError(f"cannot update ValidatingWebhookConfiguration {config}: {exc}") from exc
    raise CertError(f"ValidatingWebhookConfiguration {config} kept changing under us")


def write_files(certs: Certificates, directory: str) -> tuple[str, str]:
    """tls.crt and tls.key (mode 0600) for WebhookServer; returns their paths."""
    paths = []
    for name, data in (("tls.crt", certs.cert), ("tls.key", certs.key)):
        path = os.path.join(directory, name)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]


class Reloadable(Protocol):
    def reload_certificate(self, certfile: str, keyfile: str) -> None: ...


@dataclass
class CertKeeper:
    """What the controller runs: `refresh()` once before serving, then `run()` in a thread, which
    renews the certificate, follows another replica's renewal and restores an emptied caBundle."""

    api: Api
    namespace: str
    directory: str
    service: str = "whereabouts-py-controller"
    ips: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()  # DNS names to certify instead of the Service's (tests: localhost)
    config: str = WEBHOOK_CONFIG_NAME
    secret: str = SECRET_NAME
    current: Certificates | None = None

    @property
    def certfile(self) -> str:
        return os.path.join(self.directory, "tls.crt")

    @property
    def keyfile(self) -> str:
        return os.path.join(self.directory, "tls.key")

    def names(self) -> list[str]:
        return list(self.hosts) or service_names(self.service, self.namespace)

    def refresh(self) -> bool:
        """True when the serving certificate changed (written to certfile/keyfile)."""
        made = ensure_secret(self.api, self.namespace, self.names(), self.ips, self.secret)
        changed = made != self.current
        if changed:
            write_files(made, self.directory)
            self.current = made
        ensure_ca_bundle(self.api, made.ca_cert, self.config)
        return changed

    def run(self, server: Reloadable, stop: threading.Event, interval: float = 300.0) -> None:
        while not stop.wait(interval):
            try:
                if self.refresh():
                    server.reload_certificate(self.certfile, self.keyfile)
                    log.info("webhook.certificate_reloaded", secret=f"{self.namespace}/{self.secret}")
            except (CertError, OSError) as exc:  # the old certificate serves on; next round retries
                log.log("warning", "webhook.certificate_refresh_failed", error=str(exc))
