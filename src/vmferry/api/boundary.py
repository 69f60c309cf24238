"""Bodies of what the API says about moves across a subnet or VLAN boundary
(``model.boundary``, ``controller.boundary``; shown by ``vmferry where``)."""

from __future__ import annotations

from pydantic import BaseModel

__all__ = ["CrossingOut"]


class CrossingOut(BaseModel):
    """A move to ``destination`` crosses a boundary: the way it takes (None: no way applies,
    the move is refused) and, per other way, why not."""

    destination: str
    way: str | None
    reasons: dict[str, str]
