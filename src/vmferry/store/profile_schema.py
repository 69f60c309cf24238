"""Tables of port profiles and of which profile version each VM's port carries."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from vmferry.store.schema import Base, utcnow


class ProfileRow(Base):
    """A port profile. ``version`` is bumped on every change of ``spec``."""

    __tablename__ = "profiles"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(default=1)
    spec: Mapped[dict[str, Any]]                  # PortProfile without name and version
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PortRealizationRow(Base):
    """What a VM's port carries: the version last realized (``version``), and the outcome of
    the last attempt (``wanted``, ``ok``, ``error``). A failed attempt keeps ``version``."""

    __tablename__ = "port_realizations"
    vm: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(64))
    profile: Mapped[str] = mapped_column(String(64))
    version: Mapped[int | None]
    wanted: Mapped[int]
    ok: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
