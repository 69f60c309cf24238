"""The one exception tree of vmferry.

    VmferryError                      base; every error a user can see
    ├── InputError                    bad input: names the field and the reason (HTTP 422, exit 2)
    │   ├── NotFoundError             an unknown VM, host, profile, migration... (HTTP 404)
    │   ├── ConflictError             name clash, resource busy or in use (HTTP 409)
    │   └── TooManyRequests           a caller's share of waits or streams is used up (429)
    ├── CapacityError                 not enough memory / slots on a host (HTTP 409)
    ├── AuthError                     missing or wrong credentials (HTTP 401)
    │   └── ForbiddenError            valid token, role not allowed (HTTP 403)
    ├── DriverError                   a real component failed; carries host and cause
    │   ├── HypervisorError           QEMU / QMP
    │   ├── SoftswitchError           Open vSwitch (OVSDB, OpenFlow)
    │   ├── FabricError               switches and trunks between hosts
    │   └── PrivilegedError           namespaces, veths, taps, processes
    ├── WaitTimeout                   a bounded wait gave up; says what it waited for
    ├── AgentError                    a host agent answered with an error (HTTP 502)
    │   └── HostUnavailableError      a host agent cannot be reached: the host is down (409)
    ├── MigrationError                a migration failed; carries vm, phase, cause
    └── SetupError                    the machine lacks something vmferry needs

Library errors are translated at the driver boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import Any


class VmferryError(Exception):
    """Base of every vmferry error. ``http_status`` is what the API answers with."""

    http_status = 500

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = {k: v for k, v in fields.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return {"error": type(self).__name__, "message": self.message, **self.fields}


class InputError(VmferryError):
    """Bad input. ``field`` is the dotted path of the offending field."""

    http_status = 422

    def __init__(self, field: str, reason: str, **fields: Any) -> None:
        super().__init__(f"{field}: {reason}", field=field, reason=reason, **fields)
        self.field = field
        self.reason = reason


class NotFoundError(InputError):
    http_status = 404


class ConflictError(InputError):
    http_status = 409


class TooManyRequests(InputError):
    http_status = 429


class CapacityError(VmferryError):
    http_status = 409


class AuthError(VmferryError):
    http_status = 401


class ForbiddenError(AuthError):
    http_status = 403


class DriverError(VmferryError):
    http_status = 502

    def __init__(self, message: str, *, host: str | None = None, cause: str | None = None,
                 **fields: Any) -> None:
        super().__init__(message, host=host, cause=cause, **fields)
        self.host = host


class HypervisorError(DriverError):
    pass


class SoftswitchError(DriverError):
    pass


class FabricError(DriverError):
    pass


class PrivilegedError(DriverError):
    pass


class WaitTimeout(VmferryError):
    http_status = 504

    def __init__(self, waited_for: str, seconds: float, **fields: Any) -> None:
        super().__init__(f"gave up after {seconds:g}s waiting for {waited_for}",
                         waited_for=waited_for, seconds=seconds, **fields)


class AgentError(VmferryError):
    http_status = 502


class HostUnavailableError(AgentError):
    """The host's agent does not answer: the request conflicts with the host's state."""

    http_status = 409


class MigrationError(VmferryError):
    http_status = 409

    def __init__(self, message: str, *, vm: str | None = None, phase: str | None = None,
                 cause: str | None = None, **fields: Any) -> None:
        super().__init__(message, vm=vm, phase=phase, cause=cause, **fields)
        self.vm = vm
        self.phase = phase


class SetupError(VmferryError):
    pass
