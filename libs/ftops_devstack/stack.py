"""Start the five services as separate processes, wired to NATS and Redis, and wait until
each answers grpc.health.v1 with SERVING. Used by ``ftops-dev up``, the end-to-end tests and
the benchmarks.

A service may run as several replicas (``replicas={"gateway": 2}``): the first keeps the
service's name, the others are ``gateway-2``, ``gateway-3``, ... each with its own port,
instance id and (for inference) adapter cache. ``restart(name)`` stops one process the way
an orchestrator does (SIGTERM, then SIGKILL after the grace period) and starts it again on
the same port."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ftops_devstack.servers import free_port, port_open

SERVICES = ("registry", "inference", "trainer", "monitor", "gateway")
# Ports the stack prefers so that a developer's tools find it; taken ones are replaced.
PREFERRED_PORTS = {
    "registry": 50051,
    "inference": 50052,
    "trainer": 50053,
    "monitor": 50054,
    "gateway": 50055,
    # The gateway's OpenAI-compatible HTTP API and the monitor's Prometheus endpoint.
    "gateway-http": 8080,
    "monitor-metrics": 9464,
}


@dataclass
class ServiceProcess:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Stack:
    workdir: Path
    nats_url: str
    redis_url: str
    model_dir: Path
    base_model_name: str = "tiny-llama"
    prefer_fixed_ports: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    replicas: dict[str, int] = field(default_factory=dict)
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    _ports: dict[str, int] = field(default_factory=dict)

    def address(self, name: str) -> str:
        return self.processes[name].address

    def names(self, service: str) -> list[str]:
        """Process names of a service's replicas, the first being the service's own name."""
        count = max(1, self.replicas.get(service, 1))
        return [service] + [f"{service}-{i}" for i in range(2, count + 1)]

    def addresses(self, service: str) -> list[str]:
        return [self.address(name) for name in self.names(service)]

    def http_url(self, name: str = "gateway") -> str:
        """Base URL of a gateway's OpenAI-compatible API."""
        return f"http://127.0.0.1:{self._ports[name + '-http']}/v1"

    def metrics_url(self, name: str = "monitor") -> str:
        """The monitor's Prometheus scrape endpoint."""
        return f"http://127.0.0.1:{self._ports[name + '-metrics']}/metrics"

    def _port(self, name: str) -> int:
        preferred = PREFERRED_PORTS.get(name)
        if preferred and self.prefer_fixed_ports and not port_open("127.0.0.1", preferred):
            return preferred
        return free_port()

    def _env(self, name: str, ports: dict[str, int]) -> dict[str, str]:
        service = name.split("-")[0]
        instance = name if "-" in name else f"{name}-1"
        inference = ",".join(f"127.0.0.1:{ports[n]}" for n in self.names("inference"))
        env = dict(os.environ)
        env.update(
            {
                "FTOPS_GRPC_HOST": "127.0.0.1",
                "FTOPS_GRPC_PORT": str(ports[name]),
                "FTOPS_INSTANCE_ID": instance,
                "FTOPS_NATS_URL": self.nats_url,
                "FTOPS_DEV_MODE": "true",
                "FTOPS_REGISTRY_ADDRESS": f"127.0.0.1:{ports['registry']}",
                "FTOPS_DATABASE_URL": f"sqlite:///{self.workdir / 'registry.db'}",
                "FTOPS_ARTIFACT_DIR": str(self.workdir / "artifacts"),
                "FTOPS_BASE_MODEL_PATH": str(self.model_dir),
                "FTOPS_BASE_MODEL_NAME": self.base_model_name,
                "FTOPS_ADAPTER_CACHE_DIR": str(
                    self.workdir / ("adapter-cache" if service == name else f"adapter-cache-{name}")
                ),
                "FTOPS_WORK_DIR": str(self.workdir / "trainer"),
                "FTOPS_REDIS_URL": self.redis_url,
                "FTOPS_INFERENCE_ENDPOINTS": inference,
                "PYTHONUNBUFFERED": "1",
            }
        )
        if service == "gateway":
            env["FTOPS_HTTP_PORT"] = str(ports[f"{name}-http"])
        if service == "monitor":
            env["FTOPS_METRICS_PORT"] = str(ports[f"{name}-metrics"])
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self._ports = {name: self._port(name) for svc in SERVICES for name in self.names(svc)}
        for name in self.names("gateway"):
            self._ports[f"{name}-http"] = self._port(f"{name}-http")
        for name in self.names("monitor"):
            self._ports[f"{name}-metrics"] = self._port(f"{name}-metrics")
        for svc in SERVICES:
            for name in self.names(svc):
                self._spawn(name)

    def _spawn(self, name: str) -> None:
        service = name.split("-")[0]
        log_path = self.workdir / "logs" / f"{name}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"ftops_{service}"],
                env=self._env(name, self._ports),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes[name] = ServiceProcess(name, self._ports[name], proc, log_path)

    def terminate(self, name: str, grace: float = 10.0) -> int:
        """SIGTERM one process (it drains), SIGKILL it after ``grace``; its exit code."""
        proc = self.processes[name].proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return int(proc.returncode)

    async def restart(self, name: str, grace: float = 10.0, timeout: float = 180.0) -> None:
        """Stop one process gracefully and start it again on the same port, SERVING."""
        await asyncio.to_thread(self.terminate, name, grace)
        self._spawn(name)
        await self.wait_serving(timeout, only=[name])

    async def wait_serving(self, timeout: float = 180.0, only: list[str] | None = None) -> None:
        """Wait until every service (or those named) reports SERVING; fail early if one
        exits."""
        deadline = time.monotonic() + timeout
        pending = set(only if only is not None else self.processes)
        while pending:
            for name in sorted(pending):
                sp = self.processes[name]
                if sp.proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with code {sp.proc.returncode}:\n{sp.log_tail()}"
                    )
                if await health_status(sp.address) == health_pb2.HealthCheckResponse.SERVING:
                    pending.discard(name)
            if not pending:
                return
            if time.monotonic() > deadline:
                details = "\n".join(
                    f"--- {n} ---\n{self.processes[n].log_tail()}" for n in sorted(pending)
                )
                raise TimeoutError(f"not SERVING after {timeout}s: {sorted(pending)}\n{details}")
            await asyncio.sleep(0.25)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every service (they drain gracefully), SIGKILL stragglers."""
        for sp in self.processes.values():
            if sp.proc.poll() is None:
                sp.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for sp in self.processes.values():
            remaining = max(0.1, deadline - time.monotonic())
            try:
                sp.proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                sp.proc.kill()
                sp.proc.wait()


async def health_status(address: str, service: str = "") -> int:
    try:
        async with grpc.aio.insecure_channel(address) as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1
            )
            return int(resp.status)
    except grpc.aio.AioRpcError:
        return int(health_pb2.HealthCheckResponse.UNKNOWN)
