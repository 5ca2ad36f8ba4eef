"""Bearer-token check for the Ingress admin endpoints (promote, rollback, list models).

Off by default: without a token file the admin routes answer 404 as if they did not exist. The
token lives in a file (a mounted secret), never in the Serve config or the command line, where
it would end up in logs and ``ray list actors`` output.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

MIN_TOKEN_CHARS = 32
TOKEN_FILE_ENV = "FEEDREC_ADMIN_TOKEN_FILE"


class AdminAuthError(Exception):
    """``status`` (401 / 403 / 404) and a reason for the HTTP response."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class AdminAuth:
    """``token``: None = admin endpoints disabled."""

    def __init__(self, token: str | None) -> None:
        if token is not None and len(token) < MIN_TOKEN_CHARS:
            raise ValueError(
                f"admin token: at least {MIN_TOKEN_CHARS} characters, got {len(token)}"
            )
        self._token = token

    @classmethod
    def from_file(cls, path: Path | None) -> AdminAuth:
        """Read the token from ``path`` (or the file named by ``$FEEDREC_ADMIN_TOKEN_FILE``).
        The file must not be readable by group or others."""
        path = path or (
            Path(os.environ[TOKEN_FILE_ENV]) if os.environ.get(TOKEN_FILE_ENV) else None
        )
        if path is None:
            return cls(None)
        mode = Path(path).stat().st_mode
        if mode & 0o077:
            raise ValueError(f"admin token file {path}: mode {oct(mode & 0o777)}; chmod 600 it")
        return cls(Path(path).read_text().strip())

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def check(self, authorization: str | None) -> None:
        """Raise ``AdminAuthError`` unless ``authorization`` is ``Bearer <token>``."""
        if self._token is None:
            raise AdminAuthError(404, "admin endpoints are disabled (no admin token configured)")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise AdminAuthError(401, "admin endpoints need an 'Authorization: Bearer <token>'")
        # Constant time: the comparison must not reveal how many leading characters matched.
        if not hmac.compare_digest(given.strip().encode(), self._token.encode()):
            raise AdminAuthError(403, "admin token rejected")
