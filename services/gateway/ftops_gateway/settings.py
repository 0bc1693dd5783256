"""Gateway settings (env vars ``FTOPS_<FIELD>``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ftops_runtime.auth import AuthSettings
from ftops_runtime.settings import ServiceSettings


class GatewaySettings(ServiceSettings, AuthSettings):
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Routing tables live here.")
    registry_address: str = Field("127.0.0.1:50051", description="RegistryService host:port.")
    registry_api_key: str = Field(
        "",
        description="The gateway's own key for registry calls: viewer in every team it routes "
        "(or a platform-admin service key).",
    )
    inference_endpoints: str = Field(
        "", description="Comma separated inference host:port list (static fallback)."
    )
    inference_transport: Literal["multiplex", "unary"] = Field(
        "multiplex",
        description="How requests reach inference: 'multiplex' (one long-lived stream per "
        "replica, each request a message on it) or 'unary' (a gRPC call per request).",
    )
    inference_tls_server_name: str = Field(
        "",
        description="With TLS: the name inference replicas' certificates carry when they "
        "are dialled by address (pod IPs announced): e.g. their Service's name; empty = the "
        "host dialled.",
    )
    metrics_flush_s: float = Field(0.5, gt=0, description="Request-result batch interval.")
    metrics_batch_max: int = Field(64, ge=1, description="Flush early at this many results.")
    metrics_queue_max: int = Field(
        10_000, ge=1, description="Results kept while NATS is down; the oldest are dropped."
    )
    route_refresh_s: float = Field(1.0, gt=0, description="Periodic routing-table reload.")
    redis_timeout_s: float = Field(1.0, gt=0, description="Redis socket timeout.")
    releases_durable: str = Field(
        "gateway-releases",
        description="Durable prefix shared by all replicas for release decisions.",
    )
    endpoint_inactive_s: float = Field(
        300.0, gt=0, description="A stopped replica's adapter.loaded consumer vanishes after this."
    )
    event_dedupe_ttl_s: int = Field(7 * 24 * 3600, ge=1, description="Decision dedupe key TTL.")
    shadow_max_in_flight: int = Field(
        64, ge=0, description="Mirrored requests in flight at most; more are dropped, not queued."
    )
    mirror_max_per_replica: int = Field(
        1,
        ge=0,
        description="Mirrored requests this gateway has in flight on one inference replica at "
        "most (0 = no bound); more are not sent. A replica runs max_best_effort_running "
        "mirrors at once and refuses the rest, so sending more only costs CPU under load.",
    )
    retire_interval_s: float = Field(
        1.0, gt=0, description="How often held versions are checked for retirement."
    )
    http_port: int = Field(
        -1,
        ge=-1,
        le=65535,
        description="OpenAI-compatible HTTP port on grpc_host; -1 = off, 0 = a free port.",
    )

    rate_limit_rps: float = Field(
        0.0,
        ge=0,
        description="Generate calls per second per API key, shared by all gateway replicas "
        "(Redis token bucket); 0 = no limit.",
    )
    rate_limit_burst: int = Field(
        0, ge=0, description="Calls a key may make at once above the rate; 0 = the rate (min 1)."
    )
    rate_limit_teams: str = Field(
        "",
        description="Per-team overrides 'team=rps[:burst],...'; a key in several teams gets "
        "the highest.",
    )

    def inference_endpoint_list(self) -> list[str]:
        return [e.strip() for e in self.inference_endpoints.split(",") if e.strip()]
