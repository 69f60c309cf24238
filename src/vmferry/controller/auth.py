"""Tokens and roles. Tokens are stored hashed; a request's role decides what it may do."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum

from sqlalchemy import select

from vmferry.errors import AuthError, ConflictError, ForbiddenError, InputError, NotFoundError
from vmferry.store.db import Store
from vmferry.store.schema import HostRow, TokenRow


class Role(str, Enum):
    VIEWER = "viewer"
    SERVER_ADMIN = "server-admin"
    NETWORK_ADMIN = "network-admin"
    ADMIN = "admin"
    AGENT = "agent"


# What each kind of action needs. Admin may do everything; viewers only read.
READ = {Role.VIEWER, Role.SERVER_ADMIN, Role.NETWORK_ADMIN, Role.ADMIN}
SERVERS = {Role.SERVER_ADMIN, Role.ADMIN}
NETWORK = {Role.NETWORK_ADMIN, Role.ADMIN}
ADMIN = {Role.ADMIN}


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role
    host: str | None = None      # for agents: the host they may report for


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def authenticate(store: Store, token: str | None) -> Principal:
    """Who presents ``token``; raises AuthError when nobody (or a revoked token)."""
    if not token:
        raise AuthError("missing bearer token (Authorization: Bearer TOKEN)")
    digest = hash_token(token)
    with store.session() as session:
        row = session.scalar(select(TokenRow).where(TokenRow.token_hash == digest))
        if row is not None:
            if row.revoked_at is not None:
                raise AuthError(f"token {row.name!r} was revoked")
            if row.expires_at is not None and _aware(row.expires_at) <= datetime.now(UTC):
                raise AuthError(f"token {row.name!r} expired at {_aware(row.expires_at)}")
            return Principal(name=row.name, role=Role(row.role))
        host = session.scalar(select(HostRow).where(HostRow.agent_token_hash == digest))
        if host is not None:
            return Principal(name=f"agent:{host.name}", role=Role.AGENT, host=host.name)
    raise AuthError("unknown token")


def require(principal: Principal, allowed: set[Role], action: str) -> None:
    if principal.role not in allowed:
        needed = " or ".join(sorted(r.value for r in allowed))
        raise ForbiddenError(f"{principal.name} ({principal.role.value}) may not {action}; "
                             f"needs {needed}", actor=principal.name, action=action)


def create_token(store: Store, name: str, role: str, token: str | None = None,
                 expires_in_s: float | None = None) -> str:
    """Create a named token and return it (only its hash is kept). It expires after
    ``expires_in_s`` seconds when given."""
    try:
        parsed = Role(role)
    except ValueError:
        raise InputError("role", f"unknown role {role!r}; one of viewer, server-admin, "
                         "network-admin, admin") from None
    if parsed is Role.AGENT:
        raise InputError("role", "agent credentials come from the inventory")
    if not name or len(name) > 64:
        raise InputError("name", "must be 1-64 characters")
    token = token or secrets.token_urlsafe(32)
    with store.session() as session:
        if session.scalar(select(TokenRow).where(TokenRow.name == name)) is not None:
            raise ConflictError("name", f"a token named {name!r} exists")
        expires = datetime.now(UTC) + timedelta(seconds=expires_in_s) \
            if expires_in_s is not None else None
        session.add(TokenRow(name=name, role=parsed.value, token_hash=hash_token(token),
                             expires_at=expires))
    return token


def ensure_bootstrap_token(store: Store, token: str) -> None:
    """The lab's (or installer's) admin token, registered once."""
    with store.session() as session:
        digest = hash_token(token)
        if session.scalar(select(TokenRow).where(TokenRow.token_hash == digest)) is None:
            existing = session.scalar(select(TokenRow).where(TokenRow.name == "bootstrap-admin"))
            if existing is not None:
                existing.token_hash = digest
                existing.revoked_at = None
            else:
                session.add(TokenRow(name="bootstrap-admin", role=Role.ADMIN.value,
                                     token_hash=digest))


def revoke_token(store: Store, name: str) -> None:
    with store.session() as session:
        row = session.scalar(select(TokenRow).where(TokenRow.name == name))
        if row is None:
            raise NotFoundError("name", f"no token named {name!r}")
        row.revoked_at = row.revoked_at or datetime.now(UTC)


def list_tokens(store: Store) -> list[dict[str, object]]:
    with store.session() as session:
        return [{"name": r.name, "role": r.role, "created_at": r.created_at.isoformat(),
                 "revoked": r.revoked_at is not None,
                 "expires_at": _aware(r.expires_at).isoformat() if r.expires_at else None}
                for r in session.scalars(select(TokenRow).order_by(TokenRow.id))]


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
