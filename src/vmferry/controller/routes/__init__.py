"""The controller's HTTP routes, one router per concern; ``vmferry.controller.app`` assembles
them. Each route checks the caller's role, then asks the service."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path as PathParam

# Store ids are 64-bit: larger numbers are refused as input, not overflowed in the database.
MAX_ID = 2**63 - 1
MigrationId = Annotated[int, PathParam(ge=1, le=MAX_ID)]
