"""What the broker's clients and its server share, importing neither side.

The node key client (:mod:`kms_broker.client`), the tenant library (:mod:`kms_broker.tenant`)
and the CLI import this module and :mod:`kms_broker.rpc`; the server imports it too. It holds
no gRPC, no domain, no CEL and no metrics code, so a process that holds a key loads none of the
server's code (``tests/kms_broker/test_client_split.py`` checks the import closure).

- :data:`MAX_MESSAGE_BYTES`: the largest gRPC message either side sends or accepts.
- :data:`RULES_METADATA_KEY` and :class:`RuleOutcome`: a PERMISSION_DENIED answer carries
  every rule of the decision in this trailing-metadata key as ASCII JSON
  ``[{"name": str, "passed": bool, "reason": str}, ...]``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MAX_MESSAGE_BYTES", "RULES_METADATA_KEY", "RuleOutcome"]

MAX_MESSAGE_BYTES = 2 << 20
RULES_METADATA_KEY = "kmsbroker-rules"


@dataclass(frozen=True, slots=True)
class RuleOutcome:
    """One rule of a decision: its name, whether it passed, and why (readable)."""

    name: str
    passed: bool
    reason: str
