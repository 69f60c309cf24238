"""OpenAPI links of the controller's and the agents' APIs: which answer feeds which next call
(a host listed, then drained; a VM created, then migrated). Clients and the stateful API fuzz
(tests/functional/test_api_fuzz.py) follow them; schemathesis infers the plainer ones
(``POST /v1/vms`` then ``GET /v1/vms/{name}``, an agent's ``PUT /v1/guests/{name}`` then
its migration calls) by itself.

The targets are named by ``operationId``: routes that are linked to set theirs explicitly
(the ``OP_*`` constants), so that renaming a Python function does not break a link."""

from __future__ import annotations

from typing import Any

__all__ = ["OP_CANCEL_MIGRATION", "OP_CLOSE_SWITCHOVER", "OP_CREATE_VM", "OP_DRAIN",
           "OP_DRAIN_STATUS", "OP_GET_MIGRATION", "OP_MIGRATE", "OP_UNDRAIN", "OP_WHERE", "link",
           "links"]

OP_CREATE_VM = "createVm"
OP_MIGRATE = "startMigration"
OP_GET_MIGRATION = "getMigration"
OP_CANCEL_MIGRATION = "cancelMigration"
OP_DRAIN = "drainHost"
OP_DRAIN_STATUS = "getDrain"
OP_UNDRAIN = "undrainHost"
OP_WHERE = "whereMayVmGo"
# The agent's API.
OP_CLOSE_SWITCHOVER = "closeSwitchover"


def link(operation_id: str, description: str, *, parameters: dict[str, str] | None = None,
         request_body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One OpenAPI link object; values are runtime expressions (``$response.body#/name``)."""
    found: dict[str, Any] = {"operationId": operation_id, "description": description}
    if parameters:
        found["parameters"] = parameters
    if request_body is not None:
        found["requestBody"] = request_body
    return found


def links(status: int, **named: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route whose ``status`` answer links to ``named`` operations."""
    return {status: {"links": named}}
