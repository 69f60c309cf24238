"""Tokens and roles. Tokens are stored hashed; a request's role decides what it may do."""

from __future__ import annotations

import hashlib
import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum

from sqlalchemy import select

from vmferry.errors import AuthError, ConflictError, ForbiddenError, InputError, NotFoundError
from vmferry.store.db import Store
from vmferry.store.schema import HostRow, TokenRow
from vmferry.web import RateLimitedLog

log = logging.getLogger(__name__)


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


MAX_LIMITED_ACTORS = 1000     # refusal budgets kept at once (one per actor)


class RefusalLog:
    """Records refused requests (401/403) in the audit log from a worker thread, at most
    ``burst`` rows per ``period`` seconds (the rest are counted and summarized in one row):
    a flood of bad tokens must not block the event loop on store writes or grow the log
    without bound. The budget is per actor. ``submit`` never blocks; a full queue drops (and
    counts) the refusal."""

    def __init__(self, store: Store, *, burst: int = 20, period: float = 10.0,
                 queue_size: int = 1000) -> None:
        self.store = store
        self._queue: queue.Queue[tuple[str, str, str, str, str]] = queue.Queue(queue_size)
        # One budget per actor: a flood from one token (or from anonymous callers) must not
        # hide another caller's refusals from the audit log.
        self._burst, self._period = burst, period
        self._limits: dict[str, RateLimitedLog] = {}
        self._limits_lock = threading.Lock()
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="refusal-log", daemon=True)
        self._thread.start()

    def _limit(self, actor: str) -> RateLimitedLog:
        with self._limits_lock:
            limit = self._limits.get(actor)
            if limit is None:
                if len(self._limits) >= MAX_LIMITED_ACTORS:
                    self._limits.pop(next(iter(self._limits)))     # the oldest budget goes
                limit = self._limits[actor] = RateLimitedLog(log, burst=self._burst,
                                                             period=self._period)
            return limit

    def submit(self, actor: str, action: str, target: str, outcome: str, reason: str) -> None:
        if not self._limit(actor).allow():
            self.dropped += 1
            return
        try:
            self._queue.put_nowait((actor, action, target, outcome, reason))
        except queue.Full:
            self.dropped += 1

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every submitted refusal is written (tests)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _run(self) -> None:
        from vmferry.controller import events
        while True:
            actor, action, target, outcome, reason = self._queue.get()
            try:
                dropped, self.dropped = self.dropped, 0
                events.record(self.store, actor, action, target, outcome, reason=reason,
                              **({"not_recorded_before": dropped} if dropped else {}))
            except Exception:   # the store may be down: refusals are not worth a crash
                log.warning("could not record a refused request", exc_info=True)
            finally:
                self._queue.task_done()
