"""Shared fixtures: real servers started on free ports for the whole session.

Tests that do not ask for a server stay pure unit tests. Postgres cannot come from PyPI,
so the Postgres fixture uses ``FTOPS_TEST_POSTGRES_URL`` or a server on 127.0.0.1:5432
and creates a throwaway database there; without one those tests are skipped (CI has one).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ftops_devstack.servers import ManagedServer, port_open, start_nats, start_redis


@pytest.fixture(scope="session")
def nats_server() -> Iterator[ManagedServer]:
    server = start_nats()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: ManagedServer) -> str:
    return nats_server.url


@pytest.fixture(scope="session")
def redis_server() -> Iterator[ManagedServer]:
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: ManagedServer) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    url = os.environ.get("FTOPS_TEST_POSTGRES_URL", "")
    if url:
        return url
    if port_open("127.0.0.1", 5432):
        return "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    pytest.skip("no Postgres reachable: set FTOPS_TEST_POSTGRES_URL or run one on :5432")


@pytest.fixture
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"ftops_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres_admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The project's tiny Llama model, built once and cached on disk."""
    from ftops_tinymodel import build

    return build()
