"""Schema migrations of the controller's store: Alembic, run programmatically.

``upgrade_to_head`` brings any database (new, old, or made by ``create_all`` before vmferry had
migrations) to the current schema. The revisions live in ``store/alembic/versions``.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect
from sqlalchemy.exc import SQLAlchemyError

from vmferry.errors import SetupError

HERE = Path(__file__).resolve().parent
# The revision whose tables ``Base.metadata.create_all`` made before migrations existed.
BASELINE = "0001"


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config(str(HERE / "alembic.ini"))
    config.set_main_option("script_location", str(HERE / "alembic"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revisions() -> set[str]:
    """The newest revision of each branch (one, once parallel work is merged)."""
    return set(ScriptDirectory.from_config(alembic_config()).get_heads())


def current_revisions(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return set(MigrationContext.configure(connection).get_current_heads())


def upgrade_to_head(engine: Engine) -> None:
    """Run every pending revision; raises SetupError when the database refuses."""
    try:
        with engine.begin() as connection:
            config = alembic_config(connection)
            tables = set(inspect(connection).get_table_names())
            if "alembic_version" not in tables and "inventory" in tables:
                # Made by create_all before vmferry had migrations: it holds the baseline.
                command.stamp(config, BASELINE)
            command.upgrade(config, "heads")
    except SQLAlchemyError as exc:
        raise SetupError(f"cannot bring the store at {engine.url!r} to the current schema: "
                         f"{exc}", cause=str(exc)) from exc
