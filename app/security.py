"""The API key as the OpenAPI page shows it: `Authorization: Bearer <server.api_key>`.

The check itself happens in `app/guard.py`, before any route reads the body; this
dependency only declares the scheme on the protected routes, so the docs page offers the
key field and marks those routes.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

_bearer = HTTPBearer(auto_error=False, description="The key in server.api_key.")


async def bearer_scheme(
    creds: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """Declares the scheme; RequestGuard has already checked the key when one is set."""
