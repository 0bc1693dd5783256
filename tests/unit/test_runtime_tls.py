"""Transport settings are checked when a service starts: a missing or unreadable file,
half a pair, a key that is not the certificate's, mutual TLS without a CA, NATS
credentials half given: each refused naming the setting, and never showing key material."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grpc
import pytest

from ftops_client.tls import client_tls
from ftops_devstack.certs import CertificateAuthority, IssuedCert
from ftops_runtime import tls
from ftops_runtime.app import run_service
from ftops_runtime.settings import ServiceSettings


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ca = CertificateAuthority.create(tmp_path_factory.mktemp("pki"))
    return {"ca": ca, "svc": ca.issue("svc"), "other": ca.issue("other")}


def _settings(**values: Any) -> ServiceSettings:
    return ServiceSettings(**values)


def _server(cert: IssuedCert, ca: CertificateAuthority, **extra: Any) -> ServiceSettings:
    values: dict[str, Any] = {
        "tls_cert_file": str(cert.cert_file),
        "tls_key_file": str(cert.key_file),
        "tls_ca_file": str(ca.cert_file),
    }
    return _settings(**(values | extra))


def _refusal(settings: ServiceSettings) -> str:
    problems = tls.transport_problems(settings)
    assert len(problems) == 1, problems
    return problems[0]


def test_nothing_configured_is_plaintext_and_fine() -> None:
    settings = _settings()
    assert tls.transport_problems(settings) == []
    assert tls.load(settings) == tls.TransportSecurity(None, None)
    assert tls.nats_connect_options(settings) == {}


def test_a_full_configuration_loads(pki: dict[str, Any]) -> None:
    security = tls.load(_server(pki["svc"], pki["ca"], tls_require_client_cert=True))
    assert security.server is not None
    assert security.server.require_client_cert
    assert security.server.cert == pki["svc"].cert_file.read_bytes()
    assert isinstance(security.server.grpc_credentials(), grpc.ServerCredentials)
    assert security.server.ssl_context() is not None
    # Without a client certificate of its own, the service presents its server one.
    assert security.client is not None
    assert security.client.cert == security.server.cert
    assert security.client.ca == pki["ca"].cert_file.read_bytes()


def test_half_a_pair_is_refused_naming_both_settings(pki: dict[str, Any]) -> None:
    message = _refusal(_settings(tls_cert_file=str(pki["svc"].cert_file)))
    assert "FTOPS_TLS_CERT_FILE is set but FTOPS_TLS_KEY_FILE is not" in message
    message = _refusal(_settings(tls_client_key_file=str(pki["svc"].key_file)))
    assert "FTOPS_TLS_CLIENT_KEY_FILE is set but FTOPS_TLS_CLIENT_CERT_FILE is not" in message
    message = _refusal(_settings(nats_tls_cert_file=str(pki["svc"].cert_file)))
    assert "FTOPS_NATS_TLS_CERT_FILE is set but FTOPS_NATS_TLS_KEY_FILE is not" in message


def test_a_missing_file_is_refused_naming_the_setting_and_path(
    pki: dict[str, Any], tmp_path: Path
) -> None:
    missing = tmp_path / "nope.pem"
    message = _refusal(_server(pki["svc"], pki["ca"], tls_ca_file=str(missing)))
    assert f"FTOPS_TLS_CA_FILE={missing}: cannot read it: No such file or directory" in message
    message = _refusal(_settings(nats_tls_ca_file=str(missing)))
    assert message.startswith(f"FTOPS_NATS_TLS_CA_FILE={missing}")


def test_an_unreadable_or_non_pem_file_is_refused(pki: dict[str, Any], tmp_path: Path) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("hello")
    message = _refusal(_server(pki["svc"], pki["ca"], tls_ca_file=str(garbage)))
    assert f"FTOPS_TLS_CA_FILE={garbage}: not a PEM file" in message
    locked = tmp_path / "locked.pem"
    locked.write_bytes(pki["ca"].cert_file.read_bytes())
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as root: every file is readable")
        message = _refusal(_server(pki["svc"], pki["ca"], tls_ca_file=str(locked)))
        assert f"FTOPS_TLS_CA_FILE={locked}: cannot read it: Permission denied" in message
    finally:
        locked.chmod(0o600)


def test_a_key_of_another_certificate_is_refused_without_showing_it(
    pki: dict[str, Any],
) -> None:
    settings = _settings(
        tls_cert_file=str(pki["svc"].cert_file), tls_key_file=str(pki["other"].key_file)
    )
    message = _refusal(settings)
    assert "FTOPS_TLS_CERT_FILE" in message
    assert "FTOPS_TLS_KEY_FILE" in message
    key_body = pki["other"].key_file.read_text().splitlines()[1]
    assert key_body not in message


def test_a_key_given_as_the_ca_is_refused_without_showing_it(pki: dict[str, Any]) -> None:
    message = _refusal(_server(pki["svc"], pki["ca"], tls_ca_file=str(pki["svc"].key_file)))
    assert message.startswith("FTOPS_TLS_CA_FILE=")
    assert pki["svc"].key_file.read_text().splitlines()[1] not in message


def test_mutual_tls_needs_a_server_certificate_and_a_ca(pki: dict[str, Any]) -> None:
    message = _refusal(_settings(tls_require_client_cert=True))
    assert "FTOPS_TLS_REQUIRE_CLIENT_CERT=true needs FTOPS_TLS_CERT_FILE" in message
    message = _refusal(
        _settings(
            tls_require_client_cert=True,
            tls_cert_file=str(pki["svc"].cert_file),
            tls_key_file=str(pki["svc"].key_file),
        )
    )
    assert "FTOPS_TLS_REQUIRE_CLIENT_CERT=true needs FTOPS_TLS_CA_FILE" in message


def test_nats_credentials(pki: dict[str, Any], tmp_path: Path) -> None:
    assert "FTOPS_NATS_USER is set but FTOPS_NATS_PASSWORD is not" in _refusal(
        _settings(nats_user="ftops")
    )
    assert "FTOPS_NATS_PASSWORD is set but FTOPS_NATS_USER is not" in _refusal(
        _settings(nats_password="s3cret")
    )
    seed = tmp_path / "user.nk"
    seed.write_text("not a seed")
    assert "both set" in _refusal(
        _settings(nats_user="ftops", nats_password="s3cret", nats_nkey_seed_file=str(seed))
    )
    message = _refusal(_settings(nats_nkey_seed_file=str(seed)))
    assert message == f"FTOPS_NATS_NKEY_SEED_FILE={seed}: not an NKEY user seed (SU...)"
    options = tls.nats_connect_options(
        _settings(
            nats_user="ftops", nats_password="s3cret", nats_tls_ca_file=str(pki["ca"].cert_file)
        )
    )
    assert options["user"] == "ftops"
    assert options["password"] == "s3cret"
    assert options["tls"].verify_mode.name == "CERT_REQUIRED"


def test_the_nats_password_is_not_in_the_settings_repr() -> None:
    settings = _settings(nats_user="ftops", nats_password="s3cret-value")
    assert "s3cret-value" not in repr(settings)
    assert "s3cret-value" not in str(settings.model_dump())


def test_a_service_refuses_to_start_naming_the_setting(
    pki: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTOPS_DEV_MODE", "true")
    monkeypatch.setenv("FTOPS_TLS_CERT_FILE", str(pki["svc"].cert_file))
    served: list[object] = []

    async def serve(settings: ServiceSettings, stop: object) -> None:
        served.append(settings)

    with pytest.raises(SystemExit) as refused:
        run_service("test", ServiceSettings, serve)
    assert "FTOPS_TLS_KEY_FILE is not" in str(refused.value.code)
    assert served == []


def test_client_tls_from_the_environment(
    pki: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("FTOPS_TLS", "FTOPS_TLS_CA_FILE", "FTOPS_TLS_CLIENT_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("FTOPS_TLS_CLIENT_KEY_FILE", raising=False)
    assert client_tls() is None
    monkeypatch.setenv("FTOPS_TLS", "true")
    assert client_tls() == tls.ClientTls()  # the system's roots
    monkeypatch.setenv("FTOPS_TLS_CA_FILE", str(pki["ca"].cert_file))
    monkeypatch.setenv("FTOPS_TLS_CLIENT_CERT_FILE", str(pki["svc"].cert_file))
    with pytest.raises(tls.TlsConfigError, match="FTOPS_TLS_CLIENT_KEY_FILE is not"):
        client_tls()
    monkeypatch.setenv("FTOPS_TLS_CLIENT_KEY_FILE", str(pki["svc"].key_file))
    loaded = client_tls()
    assert loaded is not None
    assert loaded.cert == pki["svc"].cert_file.read_bytes()
    assert client_tls(enabled=False, ca_file="", cert_file="", key_file="") is None
