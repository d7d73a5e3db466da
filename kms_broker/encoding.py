"""Canonical encodings shared by broker, node client and tenant CLI.

Canonical JSON: UTF-8, keys sorted, no whitespace (``separators=(",", ":")``), ASCII only
(``ensure_ascii=True``), integers only (no floats). A document is accepted only if
re-encoding it gives the same bytes, so a signature covers exactly one meaning.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["canonical_json", "parse_canonical_json"]


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _no_floats(value: str) -> Any:
    raise ValueError("floats are not allowed in canonical documents")


def parse_canonical_json(data: bytes, *, what: str, max_size: int) -> dict[str, Any]:
    """Parse a canonical JSON object; ValueError naming ``what`` if it is not one."""
    if len(data) > max_size:
        raise ValueError(f"{what} is {len(data)} bytes, at most {max_size} allowed")
    try:
        obj = json.loads(data.decode("ascii"), parse_float=_no_floats)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{what} is not canonical JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} must be a JSON object")
    if canonical_json(obj) != data:
        raise ValueError(f"{what} is not in canonical form (sorted keys, no spaces)")
    return obj

