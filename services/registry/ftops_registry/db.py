"""Engine, migrations and transactions.

All database work is synchronous SQLAlchemy on a small thread pool (``Database.run``), so
the asyncio gRPC server never blocks on I/O. Every mutation is one transaction
(``Database.write``); on SQLite a write transaction starts with ``BEGIN IMMEDIATE`` so
writers serialize instead of failing half way, and on Postgres the code locks the rows it
bumps (``SELECT ... FOR UPDATE``). Races that still end in a unique violation (two
replicas creating the same adapter) are retried from the start of the transaction.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy.exc
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.orm import Session, sessionmaker

from ftops_runtime.errors import Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant: serializes migrations when several replicas start at once on Postgres.
MIGRATION_LOCK_KEY = 0x6674_6F70_7372_6567  # "ftopsreg"
WRITE_OPTION = "ftops_write"
WRITE_ATTEMPTS = 5


class Database:
    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if self.is_sqlite:
            if self.url.database and self.url.database != ":memory:":
                Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        else:
            kwargs.update(
                pool_size=pool_size,
                max_overflow=2,
                pool_timeout=10,
                connect_args={"connect_timeout": 5},
            )
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        self._read_sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(
            self.engine.execution_options(**{WRITE_OPTION: True}), expire_on_commit=False
        )
        self._executor = ThreadPoolExecutor(pool_size, thread_name_prefix="registry-db")
        self.ready = False

    # -- lifecycle -------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest revision (idempotent; safe across replicas)."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.engine.connect() as conn:
            if not self.is_sqlite:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
                conn.commit()
            try:
                config.attributes["connection"] = conn
                command.upgrade(config, "head")
                conn.commit()
            finally:
                if not self.is_sqlite:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
                    conn.commit()
        self.ready = True

    def ping(self) -> bool:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.engine.dispose()

    # -- transactions ----------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read_sessions() as session, session.begin():
            yield session

    def write(self, work: Callable[[Session], T]) -> T:
        """Run ``work`` in one write transaction, retried when a concurrent writer won a
        unique-constraint race (the retry then sees the winner's row)."""
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with self._write_sessions() as session, session.begin():
                    return work(session)
            except sqlalchemy.exc.IntegrityError as exc:
                if attempt == WRITE_ATTEMPTS:
                    raise
                log.debug("write conflict (attempt %d), retrying: %s", attempt, exc.orig)
        raise AssertionError("unreachable")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking database code on the pool; database outages become UNAVAILABLE."""
        if not self.ready:
            raise Unavailable("the registry database is not ready yet (starting or migrating)")
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, fn, *args)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as exc:
            if _is_lock_timeout(exc):
                raise Unavailable("the registry database is busy; retry") from exc
            raise Unavailable(f"the registry database is unreachable: {exc.orig}") from exc
        except sqlalchemy.exc.TimeoutError as exc:
            raise Unavailable("no free registry database connection; retry") from exc

    async def run_unchecked(self, fn: Callable[..., T], *args: Any) -> T:
        """Like ``run`` but before migrations are done (startup, health checks)."""
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)


def _is_lock_timeout(exc: sqlalchemy.exc.DBAPIError) -> bool:
    return "database is locked" in str(exc.orig)


def _configure_sqlite(engine: Engine) -> None:
    """pysqlite's own transaction handling is off so we can say BEGIN IMMEDIATE ourselves."""

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn: Connection) -> None:
        # Take the write lock up front: a deferred transaction that reads then writes can
        # fail with "database is locked" instead of waiting its turn.
        immediate = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
