"""A bounded memo for pure checks over immutable inputs (a token's signature, a grant
document's signature, a policy over one session's claims, a stored row's broker signature):
safe to reuse, cleared when full."""

from __future__ import annotations

__all__ = ["CACHE_ENTRIES", "BoundedCache"]

CACHE_ENTRIES = 4096


class BoundedCache(dict):  # type: ignore[type-arg]
    def put(self, key: object, value: object) -> None:
        if len(self) >= CACHE_ENTRIES:
            self.clear()
        self[key] = value
