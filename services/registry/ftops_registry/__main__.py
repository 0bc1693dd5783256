"""``ftops-registry``: serve the registry until SIGTERM.

``ftops-registry bootstrap-admin`` creates a platform-admin API key in the configured
database (migrating it first) and prints it once; ``--print-only`` just generates a key
for ``FTOPS_BOOTSTRAP_ADMIN_KEY`` without touching any database.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from ftops_registry.app import RegistryApp
from ftops_registry.db import Database
from ftops_registry.keys import Keys
from ftops_registry.settings import RegistrySettings
from ftops_runtime.app import run_service
from ftops_runtime.auth import new_api_key
from ftops_runtime.errors import FtopsError
from ftops_runtime.heap import freeze_startup_heap


async def serve(settings: RegistrySettings, stop: asyncio.Event) -> None:
    app = RegistryApp(settings)
    # Before serving: the one collection it takes then pauses no request.
    freeze_startup_heap()
    await app.start()
    try:
        await stop.wait()
    finally:
        await app.stop()


def bootstrap_admin(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ftops-registry bootstrap-admin",
        description="Create a platform-admin API key and print it (shown only this once).",
    )
    parser.add_argument("--name", default="bootstrap-admin", help="who holds the key")
    parser.add_argument(
        "--print-only",
        action="store_true",
        help="only generate a key (for FTOPS_BOOTSTRAP_ADMIN_KEY); no database",
    )
    args = parser.parse_args(argv)
    if args.print_only:
        print(new_api_key()[1])
        return 0
    settings = RegistrySettings()
    db = Database(settings.database_url, pool_size=1)
    try:
        db.migrate()
        key, _ = Keys(db).bootstrap_admin(name=args.name)
    except FtopsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        db.close()
    print(key)
    return 0


def main() -> None:
    if sys.argv[1:2] == ["bootstrap-admin"]:
        raise SystemExit(bootstrap_admin(sys.argv[2:]))
    run_service("registry", RegistrySettings, serve)


if __name__ == "__main__":
    main()
