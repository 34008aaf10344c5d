"""API key check: `Authorization: Bearer <key>` when server.api_key is set."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

_bearer = HTTPBearer(auto_error=False, description="The key in server.api_key.")


async def require_api_key(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """Dependency of every protected router; a no-op when no key is configured."""
    key = request.app.state.settings.server.api_key
    if key is None:
        return
    given = creds.credentials.encode() if creds is not None else b""
    # Why compare_digest: a plain == leaks how many leading characters matched.
    if not hmac.compare_digest(given, key.get_secret_value().encode()):
        raise HTTPException(
            status_code=401,
            detail="Missing or wrong API key: send Authorization: Bearer <server.api_key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
