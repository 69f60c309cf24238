"""FastAPI dependencies shared by the controller's routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from vmferry.controller import auth
from vmferry.controller.auth import Principal
from vmferry.web import bearer_token


def _principal(request: Request) -> Principal:
    return auth.authenticate(request.app.state.controller.store, bearer_token(request))


Caller = Annotated[Principal, Depends(_principal)]
