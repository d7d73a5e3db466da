"""FakeHsm's fault injection (the behaviour it shares with SoftHSM is in the contract suite)."""

from __future__ import annotations

import pytest

from kms_broker.hsm.fake import FakeHsm
from kms_broker.hsm.interface import HsmUnavailable, KeyNotFound


def test_fail_next_fails_exactly_that_many_calls_with_the_given_error() -> None:
    hsm = FakeHsm()
    hsm.create_tenant_kek("t", 1)
    hsm.fail_next(2)
    hsm.fail_next(1, KeyNotFound)
    with pytest.raises(HsmUnavailable):
        hsm.health()
    with pytest.raises(HsmUnavailable):
        hsm.has_tenant_kek("t", 1)
    with pytest.raises(KeyNotFound):
        hsm.sign(b"x")
    assert hsm.has_tenant_kek("t", 1)
    hsm.health()


def test_available_toggle_and_close() -> None:
    hsm = FakeHsm()
    hsm.create_tenant_kek("t", 1)
    hsm.available = False
    for _ in range(3):
        with pytest.raises(HsmUnavailable, match="unavailable"):
            hsm.create_tenant_kek("t", 2)
    hsm.available = True
    assert not hsm.has_tenant_kek("t", 2)  # the failed calls changed nothing
    assert hsm.verify(b"d", hsm.sign(b"d")) and not hsm.verify(b"e", hsm.sign(b"d"))
    hsm.close()
    with pytest.raises(HsmUnavailable, match="closed"):
        hsm.has_tenant_kek("t", 1)
