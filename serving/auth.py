"""Bearer-token check. The key comes from the serving process's environment, never from config or
deployment arguments (both are visible in Ray's dashboard), and is never logged."""
from __future__ import annotations

import hmac
import logging
import os

from serving.schema import RequestError

log = logging.getLogger("rankray.serving")


class ApiKeyGuard:
    """Requires `Authorization: Bearer <key>` when a key is set; open otherwise."""

    def __init__(self, key: str | None) -> None:
        self._key = key.encode() if key else None

    @classmethod
    def from_env(cls, name: str | None) -> ApiKeyGuard:
        if not name:
            return cls(None)
        key = os.environ.get(name)
        if not key:
            log.warning("serve.api_key_env is %s but that variable is not set: the API is open", name)
        else:
            log.info("API key required (from $%s)", name)
        return cls(key)

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def check(self, authorization: str | None) -> None:
        """Raise a 401 RequestError unless the header carries the key."""
        if self._key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        # compare_digest: the time taken must not tell how much of a guessed key was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
            raise RequestError(401, "authorization: missing or wrong bearer token")

    def __repr__(self) -> str:
        return f"ApiKeyGuard(enabled={self.enabled})"
