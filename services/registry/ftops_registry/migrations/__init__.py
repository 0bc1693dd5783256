"""Alembic migrations, run programmatically at start (see ``db.Database.migrate``)."""
