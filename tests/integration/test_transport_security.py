"""Transport security over real sockets, with a CA and certificates made for the test:

- a registry serving gRPC with mutual TLS required, its event bus on a nats-server that
  wants a user/password over TLS: a client with a certificate of the CA is served; a
  plaintext client, a TLS client without a certificate, one with a certificate of another
  CA and one that does not trust the server's CA are all refused;
- the CLI with a client certificate (flags or environment), and refused without one;
- NATS refuses a wrong password and a client without the CA; NKEY authentication;
- a gateway over TLS: its gRPC API, its OpenAI HTTP API over HTTPS, and its calls to an
  inference replica that requires client certificates;
- the monitor's /metrics over HTTPS.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import grpc
import nats
import nats.errors
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ftops.common.v1 import common_pb2
from ftops.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ftops.inference.v1 import inference_pb2, inference_pb2_grpc
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops_devstack.certs import CertificateAuthority, IssuedCert
from ftops_devstack.servers import ManagedServer, start_nats
from ftops_registry.app import RegistryApp
from ftops_registry.settings import RegistrySettings
from ftops_runtime import tls
from ftops_runtime.client import channel
from ftops_runtime.server import GrpcServer
from ftops_runtime.settings import ServiceSettings
from ftops_runtime.tls import ClientTls

pytestmark = pytest.mark.integration

NATS_USER, NATS_PASSWORD = "ftops", "nats-s3cret"
REFUSED = grpc.StatusCode.UNAVAILABLE  # a failed handshake never reaches a handler


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    rogue_ca: CertificateAuthority
    service: IssuedCert  # server and client use: what every ftops service gets
    client: IssuedCert  # client use only: an operator's CLI
    rogue_client: IssuedCert
    nats: IssuedCert
    inference: IssuedCert  # names only its Service, as replicas dialled by pod IP do

    def client_tls(self, cert: IssuedCert | None = None) -> ClientTls:
        return ClientTls.from_files(
            str(self.ca.cert_file),
            str(cert.cert_file) if cert else "",
            str(cert.key_file) if cert else "",
        )

    def tls_settings(self, *, require_client_cert: bool) -> dict[str, Any]:
        return {
            "tls_cert_file": str(self.service.cert_file),
            "tls_key_file": str(self.service.key_file),
            "tls_ca_file": str(self.ca.cert_file),
            "tls_require_client_cert": require_client_cert,
        }

    def https_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca.cert_file))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = CertificateAuthority.create(tmp_path_factory.mktemp("pki"))
    rogue = CertificateAuthority.create(tmp_path_factory.mktemp("rogue"), name="rogue CA")
    return Pki(
        ca=ca,
        rogue_ca=rogue,
        service=ca.issue("service"),
        client=ca.issue("operator", hosts=(), server=False),
        rogue_client=rogue.issue("intruder", hosts=(), server=False),
        nats=ca.issue("nats", client=False),
        inference=ca.issue("inference", hosts=("inference",)),
    )


@pytest.fixture(scope="module")
def secure_nats(pki: Pki) -> Iterator[ManagedServer]:
    server = start_nats(
        extra_args=[
            "--user",
            NATS_USER,
            "--pass",
            NATS_PASSWORD,
            "--tls",
            "--tlscert",
            str(pki.nats.cert_file),
            "--tlskey",
            str(pki.nats.key_file),
        ],
        scheme="tls",
    )
    try:
        yield server
    finally:
        server.stop()


def _nats_settings(pki: Pki, server: ManagedServer) -> dict[str, Any]:
    return {
        "nats_url": server.url,
        "nats_user": NATS_USER,
        "nats_password": NATS_PASSWORD,
        "nats_tls_ca_file": str(pki.ca.cert_file),
    }


@pytest.fixture
async def registry(
    pki: Pki, secure_nats: ManagedServer, tmp_path: Path
) -> AsyncIterator[RegistryApp]:
    settings = RegistrySettings(
        grpc_port=0,
        database_url=f"sqlite:///{tmp_path}/registry.db",
        artifact_dir=tmp_path / "artifacts",
        health_interval_s=0.1,
        shutdown_grace_s=1,
        instance_id=f"test-{uuid.uuid4().hex[:6]}",
        auth_mode="disabled",  # keys have their own tests; this is about the transport
        **_nats_settings(pki, secure_nats),
        **pki.tls_settings(require_client_cert=True),
    )
    app = RegistryApp(settings, durable=f"registry-tls-{uuid.uuid4().hex[:8]}")
    await app.start()
    await app.wait_ready()
    yield app
    await app.stop()


async def _serving(ch: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


async def _code(ch: grpc.aio.Channel) -> grpc.StatusCode:
    async with ch:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _serving(ch)
        return cast("grpc.StatusCode", refused.value.code())


async def test_registry_serves_only_clients_with_a_certificate_of_its_ca(
    registry: RegistryApp, pki: Pki
) -> None:
    # Served: the registry's own bus reached the TLS + password NATS (it is ready), and
    # a client with a certificate of the CA calls it.
    assert registry.bus.ready
    async with channel(registry.address, tls=pki.client_tls(pki.client)) as ch:
        stub = registry_pb2_grpc.RegistryServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetBaseModel(registry_pb2.GetBaseModelRequest(name="nope"), timeout=5)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # reached the servicer

    # Refused: plaintext, no client certificate, another CA's, not trusting the server.
    assert await _code(channel(registry.address)) == REFUSED
    assert await _code(channel(registry.address, tls=pki.client_tls())) == REFUSED
    assert await _code(channel(registry.address, tls=pki.client_tls(pki.rogue_client))) == REFUSED
    untrusting = ClientTls.from_files(
        str(pki.rogue_ca.cert_file), str(pki.client.cert_file), str(pki.client.key_file)
    )
    assert await _code(channel(registry.address, tls=untrusting)) == REFUSED


async def test_the_cli_talks_tls_with_a_client_certificate(registry: RegistryApp, pki: Pki) -> None:
    from typer.testing import CliRunner, Result

    from ftops_cli.app import app

    async def cli(*tls_args: str, env: dict[str, str] | None = None) -> Result:
        argv = [f"--registry={registry.address}", *tls_args, "versions", "nope"]
        # The CLI runs its own event loop: keep it off this one, which serves the registry.
        return await asyncio.to_thread(
            CliRunner().invoke, app, [*argv, "--output", "json"], env=env
        )

    client = pki.client
    ca = ("--tls-ca", str(pki.ca.cert_file))
    flags = (*ca, "--tls-cert", str(client.cert_file), "--tls-key", str(client.key_file))
    # Served: the registry's own answer (no such adapter) came back over mTLS.
    served = await cli(*flags)
    assert "NOT_FOUND: adapter 'nope' has no versions" in served.output
    from_env = await cli(
        env={
            "FTOPS_TLS_CA_FILE": str(pki.ca.cert_file),
            "FTOPS_TLS_CLIENT_CERT_FILE": str(client.cert_file),
            "FTOPS_TLS_CLIENT_KEY_FILE": str(client.key_file),
        }
    )
    assert "NOT_FOUND" in from_env.output
    refused = await cli("--tls-ca", str(pki.ca.cert_file))  # no client certificate
    assert refused.exit_code != 0
    assert "UNAVAILABLE" in refused.output
    bad = await cli("--tls-ca", str(client.key_file))
    assert bad.exit_code != 0
    assert "FTOPS_TLS_CA_FILE" in bad.output


async def test_nats_refuses_a_wrong_password_and_plaintext(
    pki: Pki, secure_nats: ManagedServer
) -> None:
    good = tls.nats_connect_options(ServiceSettings(**_nats_settings(pki, secure_nats)))
    nc = await nats.connect(secure_nats.url, allow_reconnect=False, connect_timeout=5, **good)
    await nc.close()

    wrong = {**good, "password": "guess"}
    with pytest.raises(nats.errors.Error, match=r"(?i)authorization"):
        await nats.connect(secure_nats.url, allow_reconnect=False, connect_timeout=5, **wrong)
    # The right password without the CA: the server demands TLS (the client upgrades)
    # and its certificate is not trusted.
    plain = {"user": NATS_USER, "password": NATS_PASSWORD}
    plain_url = f"nats://{secure_nats.host}:{secure_nats.port}"
    with pytest.raises((nats.errors.Error, OSError, ssl.SSLError)):
        await nats.connect(plain_url, allow_reconnect=False, connect_timeout=5, **plain)


def _user_seed() -> str:
    """A new NKEY user seed ("SU...")."""
    import nkeys

    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)).decode()


async def test_nats_nkey_authentication(tmp_path: Path) -> None:
    import nkeys

    seed, intruder = _user_seed(), _user_seed()
    public = nkeys.from_seed(bytearray(seed.encode())).public_key.decode()
    conf = tmp_path / "nats.conf"
    conf.write_text(f"authorization {{ users = [ {{ nkey: {public} }} ] }}\n")
    server = start_nats(extra_args=["-c", str(conf)])
    try:
        (tmp_path / "user.nk").write_text(seed + "\n")
        (tmp_path / "intruder.nk").write_text(intruder + "\n")
        settings = ServiceSettings(nats_nkey_seed_file=str(tmp_path / "user.nk"))
        options = tls.nats_connect_options(settings)
        nc = await nats.connect(server.url, allow_reconnect=False, connect_timeout=5, **options)
        await nc.close()
        other = ServiceSettings(nats_nkey_seed_file=str(tmp_path / "intruder.nk"))
        with pytest.raises(nats.errors.Error, match=r"(?i)authorization"):
            await nats.connect(
                server.url,
                allow_reconnect=False,
                connect_timeout=5,
                **tls.nats_connect_options(other),
            )
    finally:
        server.stop()


class EchoInference(inference_pb2_grpc.InferenceServiceServicer):
    async def Generate(self, request: Any, context: Any) -> inference_pb2.GenerateResponse:
        return inference_pb2.GenerateResponse(
            request_id=request.request_id,
            text="over mTLS",
            prompt_tokens=1,
            completion_tokens=2,
            finish_reason=common_pb2.FINISH_REASON_EOS,
        )


@pytest.fixture
async def mtls_inference(pki: Pki) -> AsyncIterator[GrpcServer]:
    settings = ServiceSettings(
        grpc_port=0,
        tls_cert_file=str(pki.inference.cert_file),
        tls_key_file=str(pki.inference.key_file),
        tls_ca_file=str(pki.ca.cert_file),
        tls_require_client_cert=True,
    )
    server = GrpcServer(settings, service_names=["ftops.inference.v1.InferenceService"])
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(
        EchoInference(),  # type: ignore[abstract]  # only Generate is called
        server.server,
    )
    await server.start()
    yield server
    await server.stop()


async def test_gateway_over_tls_to_an_inference_that_requires_client_certs(
    pki: Pki, mtls_inference: GrpcServer, nats_url: str, redis_url: str
) -> None:
    from ftops_gateway.service import GatewayService
    from ftops_gateway.settings import GatewaySettings

    settings = GatewaySettings(
        grpc_port=0,
        http_port=0,
        nats_url=nats_url,
        redis_url=redis_url,
        # Nothing is asked of the registry with access control off and the base model.
        registry_address="127.0.0.1:1",
        inference_endpoints=mtls_inference.address,
        inference_transport="unary",
        inference_tls_server_name="inference",  # dialled at 127.0.0.1
        instance_id=f"gw-{uuid.uuid4().hex[:6]}",
        releases_durable=f"gwrel-{uuid.uuid4().hex[:6]}",
        health_interval_s=0.2,
        shutdown_grace_s=0.5,
        auth_mode="disabled",
        # The gateway's API faces applications: TLS without client certificates; it
        # presents its (client-usable) certificate to the inference replica.
        **pki.tls_settings(require_client_cert=False),
    )
    gateway = GatewayService(settings)
    await gateway.start()
    try:
        async with channel(gateway.address, tls=pki.client_tls()) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            reply = await stub.Generate(
                gateway_pb2.GenerateRequest(model="base", prompt="hello"), timeout=10
            )
            assert reply.text == "over mTLS"
        assert await _code(channel(gateway.address)) == REFUSED

        base = f"https://127.0.0.1:{gateway.http.port}"
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{base}/v1/completions",
                json={"model": "base", "prompt": "hello", "max_tokens": 4},
                ssl=pki.https_context(),
            ) as response:
                assert response.status == 200, await response.text()
                body = await response.json()
            assert body["choices"][0]["text"] == "over mTLS"
            # Plain HTTP to the HTTPS port gets no answer; nor does a client that does not
            # trust the CA.
            with pytest.raises(aiohttp.ClientError):
                await session.get(f"http://127.0.0.1:{gateway.http.port}/v1/models")
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.get(f"{base}/v1/models", ssl=ssl.create_default_context())
    finally:
        await gateway.stop()


async def test_monitor_metrics_over_https(pki: Pki, nats_url: str) -> None:
    from ftops_monitor.service import MonitorService
    from ftops_monitor.settings import MonitorSettings

    monitor = MonitorService(
        MonitorSettings(
            grpc_port=0,
            metrics_port=0,
            nats_url=nats_url,
            registry_address="127.0.0.1:1",
            instance_id=f"mon-{uuid.uuid4().hex[:6]}",
            shutdown_grace_s=0.5,
            auth_mode="disabled",
            **pki.tls_settings(require_client_cert=True),
        )
    )
    await monitor.start()
    try:
        url = f"https://127.0.0.1:{monitor.metrics_port}/metrics"
        async with aiohttp.ClientSession() as session:
            async with session.get(url, ssl=pki.https_context()) as response:
                assert response.status == 200
                assert response.content_type == "text/plain"
            with pytest.raises(aiohttp.ClientError):
                await session.get(url.replace("https://", "http://"))
        # Its gRPC wants a client certificate, like every service with mTLS on.
        assert await _code(channel(monitor.address, tls=pki.client_tls())) == REFUSED
        async with channel(monitor.address, tls=pki.client_tls(pki.client)) as ch:
            await asyncio.wait_for(_serving(ch), 5)
    finally:
        await monitor.stop()
