"""TLS for the client library and the CLI, from arguments or the environment.

The variables are the services' own names, so a shell configured like a service works:
``FTOPS_TLS_CA_FILE`` (the CA the servers' certificates chain to), and for servers that
require client certificates ``FTOPS_TLS_CLIENT_CERT_FILE`` + ``FTOPS_TLS_CLIENT_KEY_FILE``.
``FTOPS_TLS=true`` alone turns TLS on with the system's CA roots (a public certificate).
"""

from __future__ import annotations

import os

from ftops_runtime.tls import ClientTls

TRUE = frozenset({"1", "true", "yes", "on"})


def client_tls(
    *,
    enabled: bool | None = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> ClientTls | None:
    """Explicit values first, then the environment; None = plaintext. Files are read and
    checked now (``TlsConfigError`` naming the variable)."""
    ca = ca_file if ca_file is not None else os.environ.get("FTOPS_TLS_CA_FILE", "")
    cert = cert_file if cert_file is not None else os.environ.get("FTOPS_TLS_CLIENT_CERT_FILE", "")
    key = key_file if key_file is not None else os.environ.get("FTOPS_TLS_CLIENT_KEY_FILE", "")
    if enabled is None:
        enabled = os.environ.get("FTOPS_TLS", "").strip().lower() in TRUE
    if not (enabled or ca or cert or key):
        return None
    return ClientTls.from_files(ca, cert, key)
