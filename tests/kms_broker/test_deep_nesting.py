"""Deeply nested documents get a clear error, not a RecursionError that would surface as
INTERNAL (DESIGN.md section 5: never INTERNAL for bad input)."""

from __future__ import annotations

import pytest

from attest.policy import Policy, PolicyError
from kms_broker.encoding import parse_canonical_json

DEPTH = 100_000


def test_canonical_json_nested_too_deeply_is_a_value_error() -> None:
    deep = b"[" * DEPTH + b"]" * DEPTH
    with pytest.raises(ValueError, match="grant is nested too deeply"):
        parse_canonical_json(deep, what="grant", max_size=10 * DEPTH)


def test_policy_nested_too_deeply_is_a_policy_error() -> None:
    text = ("name: x\nversion: 1\nparams:\n  p: " + "[" * 5000 + "]" * 5000
            + "\nrules:\n  - name: r\n    expr: 'true'\n")
    with pytest.raises(PolicyError, match="nested too deeply"):
        Policy.from_yaml(text)
