"""Typed settings from environment variables.

Every variable is ``FTOPS_<FIELD>`` (e.g. ``FTOPS_NATS_URL``). Each service has its own
subclass adding only its fields; a process runs one service, so one flat namespace per
process is unambiguous. The full list is in docs/configuration.md.
"""

from __future__ import annotations

import socket
import uuid

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ftops_runtime.namespace import Namespace, namespace_problem


def _default_instance() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


class ServiceSettings(BaseSettings):
    """Fields every service has."""

    model_config = SettingsConfigDict(env_prefix="FTOPS_", extra="ignore")

    grpc_host: str = Field("127.0.0.1", description="Interface the gRPC server binds.")
    grpc_port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    instance_id: str = Field(default_factory=_default_instance, description="Replica name.")
    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server(s), comma separated.")
    namespace: str = Field(
        "",
        description="Installation namespace: prefixes JetStream streams, consumers and "
        "subjects, object-store buckets and Redis keys, so installations sharing one NATS "
        "and one Redis never see each other; letters, digits, '-', '_', at most 32. Every "
        "service of an installation needs the same one; empty = the unprefixed names.",
    )
    dev_mode: bool = Field(False, description="Development mode: relaxed auth.")
    api_keys: str = Field(
        "", description="Comma separated API keys accepted by the auth hook; empty = no auth."
    )
    otlp_endpoint: str = Field("", description="OTLP gRPC endpoint; empty disables export.")
    log_level: str = Field("INFO")
    shutdown_grace_s: float = Field(5.0, ge=0, description="Drain time on SIGTERM.")
    health_interval_s: float = Field(1.0, gt=0, description="Dependency probe interval.")
    max_message_mb: int = Field(64, gt=0, description="Largest gRPC message accepted.")
    event_max_deliver: int = Field(5, ge=1, description="Deliveries before dead-lettering.")
    event_nak_delay_s: float = Field(1.0, ge=0, description="Redelivery delay after failure.")
    event_stream_replicas: int = Field(
        1,
        ge=1,
        le=5,
        description="Replicas of each JetStream stream ftops creates or updates: 3 on a "
        "3-node NATS cluster (events survive a node), 1 on a single server.",
    )

    # Transport security (ftops_runtime.tls, docs/security.md): PEM file paths, read at
    # start; empty = plaintext (the dev stack on loopback).
    tls_cert_file: str = Field("", description="Certificate the gRPC and HTTP servers present.")
    tls_key_file: str = Field("", description="Private key of tls_cert_file.")
    tls_ca_file: str = Field(
        "", description="CA bundle peers are verified against (empty: system roots)."
    )
    tls_client_cert_file: str = Field(
        "", description="Client certificate for mutual TLS; empty: tls_cert_file."
    )
    tls_client_key_file: str = Field("", description="Private key of tls_client_cert_file.")
    tls_require_client_cert: bool = Field(
        False, description="Mutual TLS: gRPC callers must present a certificate of tls_ca_file."
    )
    nats_user: str = Field("", description="NATS user (with nats_password).")
    nats_password: SecretStr = Field(SecretStr(""), description="NATS password.")
    nats_nkey_seed_file: str = Field("", description="NATS NKEY user seed file (SU...).")
    nats_tls_ca_file: str = Field("", description="CA bundle the NATS server is verified against.")
    nats_tls_cert_file: str = Field("", description="Client certificate for NATS (verify mode).")
    nats_tls_key_file: str = Field("", description="Private key of nats_tls_cert_file.")

    @field_validator("namespace")
    @classmethod
    def _valid_namespace(cls, value: str) -> str:
        problem = namespace_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    def installation(self) -> Namespace:
        """This installation's names on the shared NATS and Redis."""
        return Namespace(self.namespace)

    def api_key_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())
