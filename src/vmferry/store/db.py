"""Opening the store: one engine per controller, SQLite in WAL mode or PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from vmferry.errors import InputError
from vmferry.store.upgrade import upgrade_to_head


class Store:
    def __init__(self, url: str) -> None:
        try:
            if url.startswith("sqlite"):
                self.engine: Engine = create_engine(
                    url, connect_args={"check_same_thread": False, "timeout": 30})
                event.listen(self.engine, "connect", _sqlite_pragmas)
            else:
                self.engine = create_engine(url, pool_pre_ping=True)
        except (ArgumentError, ImportError) as exc:
            raise InputError("db", f"cannot use database URL {url!r}: {exc}") from exc
        self.url = url
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> None:
        """Bring the database to the current schema (Alembic ``upgrade head``).

        Raises SetupError when the database refuses."""
        upgrade_to_head(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on any error."""
        with self._sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
