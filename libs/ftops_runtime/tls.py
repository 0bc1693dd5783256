"""Transport security from settings: TLS (optionally mutual) for gRPC and HTTP, and the
NATS connection's credentials and TLS.

Everything is read from files named by ``FTOPS_TLS_*`` / ``FTOPS_NATS_*`` settings when a
service starts; a file that cannot be read, or a certificate without its key, stops the
service with the setting named (``transport_problems``). Nothing here logs key material:
errors name settings and paths, never contents.

Roles of the files:

- ``tls_cert_file`` + ``tls_key_file``: what this service's gRPC and HTTP servers present.
- ``tls_ca_file``: the CA bundle the peers' certificates are checked against: servers this
  service calls (empty: the system's roots) and, with ``tls_require_client_cert``, callers.
- ``tls_client_cert_file`` + ``tls_client_key_file``: what this service presents to a
  server that asks for a client certificate (default: its server certificate).

A service's outgoing channels use TLS as soon as any ``tls_*`` file is set.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


class TlsConfigError(ValueError):
    """A transport setting that cannot be used; the message names the setting."""


def _env(name: str) -> str:
    return f"FTOPS_{name.upper()}"


def _read(settings: Any, name: str) -> bytes:
    path = str(getattr(settings, name, "") or "")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{_env(name)}={path}: cannot read it: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise TlsConfigError(f"{_env(name)}={path}: not a PEM file")
    return data


def _pair(settings: Any, cert_field: str, key_field: str) -> tuple[str, str] | None:
    """The (cert, key) paths of a pair, None when neither is set; half a pair is refused."""
    cert = str(getattr(settings, cert_field, "") or "")
    key = str(getattr(settings, key_field, "") or "")
    if not cert and not key:
        return None
    if not cert or not key:
        given, missing = (cert_field, key_field) if cert else (key_field, cert_field)
        raise TlsConfigError(
            f"{_env(given)} is set but {_env(missing)} is not: set both or neither"
        )
    return cert, key


def _check_chain(cert: str, key: str, cert_field: str, key_field: str) -> None:
    """Refuses a key that does not belong to the certificate (or is encrypted)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        # A password callback that answers nothing: an encrypted key fails here instead of
        # prompting on the terminal.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(
            f"{_env(cert_field)}={cert} and {_env(key_field)}={key} are not a certificate "
            f"and its unencrypted private key: {exc}"
        ) from None


def _check_ca(path: str, name: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"{_env(name)}={path}: not a CA bundle: {exc}") from None


def _read_ca(settings: Any, name: str) -> bytes:
    data = _read(settings, name)
    _check_ca(str(getattr(settings, name)), name)
    return data


def _read_chain(settings: Any, cert_field: str, key_field: str) -> tuple[bytes, bytes]:
    """The certificate and key of a pair, read (each error naming its setting) and
    checked to belong together."""
    cert, key = _read(settings, cert_field), _read(settings, key_field)
    _check_chain(
        str(getattr(settings, cert_field)), str(getattr(settings, key_field)), cert_field, key_field
    )
    return cert, key


@dataclass(frozen=True)
class ClientTls:
    """What a TLS client needs: the CA to check the server with (None: system roots) and
    the certificate it presents when the server asks for one (mutual TLS).
    ``server_name``: the name the server's certificate must carry when it is not the host
    dialled (inference replicas dialled by pod IP carry their Service's name)."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = dataclasses.field(default=None, repr=False)  # never in a log line
    ca_file: str = ""
    server_name: str = ""

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    @classmethod
    def from_files(cls, ca_file: str = "", cert_file: str = "", key_file: str = "") -> ClientTls:
        """For clients configured by hand (the CLI): the same checks as the settings'."""
        files = _Files(ca_file, cert_file, key_file)
        pair = _pair(files, "tls_client_cert_file", "tls_client_key_file")
        ca = _read_ca(files, "tls_ca_file") if ca_file else None
        cert = key = None
        if pair is not None:
            cert, key = _read_chain(files, "tls_client_cert_file", "tls_client_key_file")
        return cls(ca=ca, cert=cert, key=key, ca_file=ca_file)


@dataclass(frozen=True)
class _Files:
    tls_ca_file: str
    tls_client_cert_file: str
    tls_client_key_file: str


@dataclass(frozen=True)
class ServerTls:
    """What a TLS server needs: its certificate and key and, for mutual TLS, the CA its
    callers' certificates must chain to."""

    cert_file: str
    key_file: str
    cert: bytes
    key: bytes = dataclasses.field(repr=False)  # never in a log line
    ca_file: str = ""
    ca: bytes | None = None
    require_client_cert: bool = False

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.ca if self.require_client_cert else None,
            require_client_auth=self.require_client_cert,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """For the HTTP servers (aiohttp). They never ask for a client certificate: their
        callers (OpenAI SDKs, browsers, Prometheus) authenticate with API keys."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


@dataclass(frozen=True)
class TransportSecurity:
    """A service's TLS material, read once at start. ``server``/``client`` are None when
    that side runs in plaintext."""

    server: ServerTls | None = None
    client: ClientTls | None = None


def load(settings: Any) -> TransportSecurity:
    """Reads and checks the ``tls_*`` settings; raises ``TlsConfigError`` naming the
    setting at fault."""
    server_pair = _pair(settings, "tls_cert_file", "tls_key_file")
    client_pair = _pair(settings, "tls_client_cert_file", "tls_client_key_file")
    ca_file = str(getattr(settings, "tls_ca_file", "") or "")
    require = bool(getattr(settings, "tls_require_client_cert", False))
    if require and server_pair is None:
        raise TlsConfigError(
            "FTOPS_TLS_REQUIRE_CLIENT_CERT=true needs FTOPS_TLS_CERT_FILE and "
            "FTOPS_TLS_KEY_FILE (a server without TLS cannot ask for client certificates)"
        )
    if require and not ca_file:
        raise TlsConfigError(
            "FTOPS_TLS_REQUIRE_CLIENT_CERT=true needs FTOPS_TLS_CA_FILE: the CA that "
            "callers' certificates are checked against"
        )
    ca = _read_ca(settings, "tls_ca_file") if ca_file else None
    server = None
    if server_pair is not None:
        cert, key = _read_chain(settings, "tls_cert_file", "tls_key_file")
        server = ServerTls(
            cert_file=server_pair[0],
            key_file=server_pair[1],
            cert=cert,
            key=key,
            ca_file=ca_file,
            ca=ca,
            require_client_cert=require,
        )
    client = None
    if client_pair is not None:
        cert, key = _read_chain(settings, "tls_client_cert_file", "tls_client_key_file")
        client = ClientTls(ca=ca, cert=cert, key=key, ca_file=ca_file)
    elif server is not None or ca is not None:
        # Presents its server certificate when a peer asks (it needs the clientAuth use).
        client = ClientTls(
            ca=ca,
            cert=server.cert if server else None,
            key=server.key if server else None,
            ca_file=ca_file,
        )
    return TransportSecurity(server=server, client=client)


# -- NATS -----------------------------------------------------------------------------


def nats_connect_options(settings: Any) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect``: credentials (user/password or an NKEY seed
    file) and a TLS context. Empty when none of the ``nats_*`` settings is set (the dev
    stack's plaintext server on loopback). Raises ``TlsConfigError``."""
    options: dict[str, Any] = {}
    user = str(getattr(settings, "nats_user", "") or "")
    password = _secret(getattr(settings, "nats_password", ""))
    seed_file = str(getattr(settings, "nats_nkey_seed_file", "") or "")
    if password and not user:
        raise TlsConfigError("FTOPS_NATS_PASSWORD is set but FTOPS_NATS_USER is not")
    if user and not password:
        raise TlsConfigError("FTOPS_NATS_USER is set but FTOPS_NATS_PASSWORD is not")
    if user and seed_file:
        raise TlsConfigError(
            "FTOPS_NATS_USER and FTOPS_NATS_NKEY_SEED_FILE are both set: use one of them"
        )
    if user:
        options.update(user=user, password=password)
    if seed_file:
        _check_seed(seed_file)
        options["nkeys_seed"] = seed_file  # nats-py reads it itself, when it signs
    context = _nats_tls(settings)
    if context is not None:
        options["tls"] = context
    return options


def _secret(value: Any) -> str:
    getter = getattr(value, "get_secret_value", None)
    return str(getter() if callable(getter) else value or "")


def _check_seed(path: str) -> None:
    try:
        text = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise TlsConfigError(
            f"FTOPS_NATS_NKEY_SEED_FILE={path}: cannot read it: {reason}"
        ) from None
    # A user seed is "SU" + base32; said without echoing any of it.
    if not text.startswith("SU"):
        raise TlsConfigError(f"FTOPS_NATS_NKEY_SEED_FILE={path}: not an NKEY user seed (SU...)")
    if importlib.util.find_spec("nkeys") is None:  # nats-py signs with it; say so at start
        raise TlsConfigError(
            "FTOPS_NATS_NKEY_SEED_FILE needs the nkeys package (pip install nkeys)"
        )


def _nats_tls(settings: Any) -> ssl.SSLContext | None:
    ca_file = str(getattr(settings, "nats_tls_ca_file", "") or "")
    pair = _pair(settings, "nats_tls_cert_file", "nats_tls_key_file")
    if not ca_file and pair is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file:
        _read_ca(settings, "nats_tls_ca_file")
        context.load_verify_locations(cafile=ca_file)
    if pair is not None:
        _read_chain(settings, "nats_tls_cert_file", "nats_tls_key_file")
        context.load_cert_chain(*pair)
    return context


def transport_problems(settings: Any) -> list[str]:
    """What stops a service from starting with these transport settings (each naming its
    setting); checked by the process entry point next to the auth settings."""
    problems = []
    for check in (load, nats_connect_options):
        try:
            check(settings)
        except TlsConfigError as exc:
            problems.append(str(exc))
    return problems
