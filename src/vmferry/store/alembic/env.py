"""Alembic environment of the controller's store.

Run programmatically by :mod:`vmferry.store.migrations` with a live connection in
``config.attributes["connection"]``; or by hand with ``-x url=...``.
"""

from __future__ import annotations

import importlib.util

from alembic import context
from sqlalchemy import create_engine

from vmferry.store.schema import Base

# Tables other modules register on Base.metadata must be imported before autogenerate compares.
if importlib.util.find_spec("vmferry.store.profile_schema") is not None:
    importlib.import_module("vmferry.store.profile_schema")

target_metadata = Base.metadata
config = context.config


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: batch mode rebuilds the table instead.
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") \
        or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("give the database: alembic -x url=sqlite:///path upgrade head")
    engine = create_engine(url)
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("vmferry's store migrations run online only")
run_migrations_online()
