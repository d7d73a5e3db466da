"""Run a broker test module on both kinds of evidence (tests/kms_broker/conftest.py).

A module that imports :data:`every_evidence` runs each of its tests twice: on brokers that
trust the node's claims (test composition, ``test-json``) and on production ``kms-broker
serve`` brokers verifying real swtpm quotes of nodes enrolled by ``kms-broker node enrol``::

    from tests.kms_broker.evidence import every_evidence  # noqa: F401 - fixture
"""

from __future__ import annotations

import pytest

from tests.kms_broker.conftest import EVIDENCE_KINDS

__all__ = ["every_evidence"]


@pytest.fixture(scope="module", params=EVIDENCE_KINDS, name="evidence")
def every_evidence(request: pytest.FixtureRequest) -> str:
    return str(request.param)
