"""Admin endpoints' bearer token: off by default, exact match only, secret file permissions."""

import os
from pathlib import Path

import pytest

from feedrec.serving.admin_auth import TOKEN_FILE_ENV, AdminAuth, AdminAuthError

TOKEN = "t" * 40


def _status(auth: AdminAuth, header: str | None) -> int:
    with pytest.raises(AdminAuthError) as e:
        auth.check(header)
    return e.value.status


def test_disabled_by_default_answers_404(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    auth = AdminAuth.from_file(None)
    assert not auth.enabled
    assert _status(auth, f"Bearer {TOKEN}") == 404


def test_only_the_exact_bearer_token_passes() -> None:
    auth = AdminAuth(TOKEN)
    auth.check(f"Bearer {TOKEN}")
    auth.check(f"bearer {TOKEN}")
    assert _status(auth, None) == 401
    assert _status(auth, TOKEN) == 401
    assert _status(auth, f"Basic {TOKEN}") == 401
    assert _status(auth, f"Bearer {TOKEN[:-1]}") == 403
    assert _status(auth, f"Bearer {TOKEN}x") == 403


def test_token_file_must_be_private_and_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    os.chmod(secret, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        AdminAuth.from_file(secret)
    os.chmod(secret, 0o600)
    monkeypatch.setenv(TOKEN_FILE_ENV, str(secret))
    AdminAuth.from_file(None).check(f"Bearer {TOKEN}")
    with pytest.raises(ValueError, match="at least 32 characters"):
        AdminAuth("short")
