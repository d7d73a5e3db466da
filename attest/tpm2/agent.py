"""Node agent: gather claims (hardening facts, code identity, job identity), measure, quote.

The composition the trainer calls with the broker's challenge::

    report_data = expected_report_data(nonce, session_id, node_public_key)
    claims = node_claims(code=guard_code_claims, extra=job_claims)
    evidence = collect_evidence("device:/dev/tpmrm0", report_data, claims)   # for Attest()

Without ``code``, the code identity is measured here in full (``attest.code_digest``) over the
environment ``env`` (default: this interpreter's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attest.code_digest import code_digest
from attest.eventlog import EventLog
from attest.facts import HostSource, collect_facts
from attest.tpm2.node import TpmNode

__all__ = ["collect_evidence", "node_claims"]


def node_claims(
    source: HostSource | None = None,
    env: str | None = None,
    *,
    code: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Hardening facts, ``code_digest`` (with ``python_version`` and ``torch_version``) and
    ``extra`` claims (the trainer's ``job.*``)."""
    claims = collect_facts(source)
    claims.update(code if code is not None else code_digest(env).claims())
    claims.update(extra or {})
    return claims


def collect_evidence(
    tcti: str, report_data: bytes, claims: Mapping[str, Any] | None = None
) -> bytes:
    """Measure ``claims`` (default: :func:`node_claims`) into PCR 23 and return tpm2 evidence."""
    log = EventLog.from_claims(node_claims() if claims is None else claims)
    with TpmNode(tcti) as tpm:
        return tpm.evidence(log, report_data).to_bytes()
