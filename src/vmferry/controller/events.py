"""The audit log: every change, who made it, and how it ended."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from vmferry.store.db import Store
from vmferry.store.schema import EventRow


def record(store: Store, actor: str, action: str, target: str, outcome: str,
           **detail: Any) -> None:
    with store.session() as session:
        session.add(EventRow(actor=actor, action=action, target=target, outcome=outcome,
                             detail=_jsonable(detail)))


def recent(store: Store, limit: int = 100, after_id: int = 0) -> list[EventRow]:
    with store.session() as session:
        rows = session.scalars(select(EventRow).where(EventRow.id > after_id)
                               .order_by(EventRow.id.desc()).limit(limit))
        return list(reversed(list(rows)))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
