"""Cookies of make-before-break switchover rules: one per migration, recognisable anywhere.

Pure helpers (no I/O) shared by the controller's switchover and the agent's host rules."""

from __future__ import annotations

# "mbb" in the top 24 bits, the migration id below: a cookie of its own per migration.
COOKIE_PREFIX = 0x6D6262 << 40
COOKIE_MASK = 0xFFFFFF << 40


def mbb_cookie(migration_id: int) -> int:
    """The cookie of one migration's temporary rules."""
    if not 0 < migration_id < 1 << 40:
        raise ValueError(f"migration id {migration_id} does not fit a switchover cookie")
    return COOKIE_PREFIX | migration_id


def is_mbb_cookie(cookie: int) -> bool:
    return cookie & COOKIE_MASK == COOKIE_PREFIX and cookie != COOKIE_PREFIX


def migration_of(cookie: int) -> int:
    return cookie & ~COOKIE_MASK
