"""The tenant side trusts no broker for what it signs or deletes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from attest.policy import Policy
from kms_broker.rpc import BrokerEndpoint, BrokerRpcError
from kms_broker.tenant import TenantClient
from tests.kms_broker.verifiers import POLICY_YAML

ENDPOINT = BrokerEndpoint(address="127.0.0.1:1", ca_pem=b"", cert_pem=b"", key_pem=b"")


class _Broker(TenantClient):
    """A TenantClient whose broker answers PutPolicy with a chosen digest."""

    def __init__(self, digest: str) -> None:
        self.endpoint, self.tenant_id, self._digest = ENDPOINT, "acme", digest
        self._replicas = [(ENDPOINT, None, None, None)]  # what .address names

    def _call(self, method: str, **fields):
        assert method == "PutPolicy"
        return SimpleNamespace(digest=self._digest)


def test_put_policy_returns_the_digest_the_tenant_computed() -> None:
    digest = Policy.from_yaml(POLICY_YAML).digest
    assert _Broker(digest).put_policy(POLICY_YAML) == digest


def test_a_broker_reporting_another_policy_digest_is_refused() -> None:
    permissive = Policy.from_yaml(POLICY_YAML.replace("false", "true")).digest
    assert permissive != Policy.from_yaml(POLICY_YAML).digest
    with pytest.raises(BrokerRpcError, match="not signing grants for it") as info:
        _Broker(permissive).put_policy(POLICY_YAML)
    assert info.value.code == "DATA_LOSS"
