"""Node agent: gather claims (hardening facts + code digest), measure them, quote them.

The composition the trainer calls with the broker's challenge::

    report_data = expected_report_data(nonce, session_id, node_public_key)
    evidence = collect_evidence("device:/dev/tpmrm0", report_data)   # bytes for Attest()
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attest.code_digest import code_digest
from attest.eventlog import EventLog
from attest.facts import HostSource, collect_facts
from attest.tpm2.node import TpmNode

__all__ = ["collect_evidence", "node_claims"]


def node_claims(
    source: HostSource | None = None, package_dirs: Mapping[str, Path | None] | None = None
) -> dict[str, Any]:
    """Hardening facts plus ``code_digest``, ``python_version`` and ``torch_version``."""
    claims = collect_facts(source)
    claims.update(code_digest(package_dirs).claims())
    return claims


def collect_evidence(
    tcti: str, report_data: bytes, claims: Mapping[str, Any] | None = None
) -> bytes:
    """Measure ``claims`` (default: :func:`node_claims`) into PCR 23 and return tpm2 evidence."""
    log = EventLog.from_claims(node_claims() if claims is None else claims)
    with TpmNode(tcti) as tpm:
        return tpm.evidence(log, report_data).to_bytes()
