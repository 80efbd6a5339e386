"""The control service's API key: read from its unit's credential, and looked for on a request."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from fastapi import Request

from llamavm.host.contract import Contract, HostError

#: What a request without the key is told (401).
KEY_WANTED = "this endpoint wants the API key: Authorization: Bearer KEY (or X-Api-Key)"


def read_key(contract: Contract) -> str | None:
    """The API key from the unit's credential (LoadCredential=api-key), or None (policy none)."""
    if contract.api_key_policy != "required":
        return None
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise HostError("the API key policy is required but no credential was passed", 2)
    key = (Path(directory) / "api-key").read_text(encoding="utf-8").strip()
    if not key:
        raise HostError("the API key credential is empty", 2)
    return key


def key_given(request: Request, key: str) -> bool:
    """The request carries `key` (Authorization: Bearer KEY, or X-Api-Key)."""
    given = request.headers.get("x-api-key", "")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        given = token.strip()
    return bool(given) and hmac.compare_digest(given.encode(), key.encode())
