"""Fast domain tests of the release pipeline (FakeHsm, manual clock, no sockets): lease room,
token and lease expiry, renewals, and that denials never reach the HSM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attest.interface import combined_report_data, expected_report_data
from attest.policy import Policy
from kms_broker import sealing
from kms_broker.audit import AuditLog, verify_log
from kms_broker.domain.admin import Admin
from kms_broker.domain.clock import ManualClock, SystemRandom
from kms_broker.domain.deps import BrokerDeps, Settings
from kms_broker.domain.errors import PermissionDenied, Unauthenticated, Unavailable
from kms_broker.domain.node_flow import VERDICT_REUSE_MS, NodeFlow
from kms_broker.grants import GrantDocument, sign_grant
from kms_broker.hsm.fake import FakeHsm
from kms_broker.hsm.interface import HsmUnavailable
from kms_broker.state.sqlite import SqliteRepository
from sealed.secrets import SecretBuffer
from tests.kms_broker.testing_server import enrol_test_node
from tests.kms_broker.verifiers import POLICY_YAML, JsonClaimsVerifier, make_evidence


@pytest.fixture
def broker(tmp_path: Path):
    clock = ManualClock()
    hsm = FakeHsm()
    deps = BrokerDeps(
        repo=SqliteRepository(tmp_path / "db"), hsm=hsm,
        audit=AuditLog(tmp_path / "audit.log", now_ms=clock.now_ms, sign=hsm.sign),
        clock=clock, random=SystemRandom(), verifiers={"test-json": JsonClaimsVerifier()},
        load_policy=Policy.from_yaml,
        settings=Settings(token_ttl_ms=60_000, lease_ttl_ms=120_000),
    )
    admin, flow = Admin(deps), NodeFlow(deps)
    key = Ed25519PrivateKey.generate()
    admin.register_tenant("acme", key.public_key().public_bytes_raw())
    up = admin.open_upload(tenant_id="acme", dataset_id="ds", key_version=1, share_index=0,
                           share_count=1)
    with SecretBuffer.random(32) as share:
        admin.commit_share(tenant_id="acme", upload_id=up.upload_id,
                           sealed_share=sealing.seal_share_to(up.import_public_key, share,
                                                              up.transcript))
    admin.register_dataset(tenant_id="acme", dataset_id="ds", key_version=1, manifest_name="m",
                           store_uri="", holders=())
    digest = admin.put_policy(tenant_id="acme", text=POLICY_YAML)
    doc, sig = sign_grant(GrantDocument(
        grant_id="g", tenant_id="acme", dataset_id="ds", job_id="j", policy_digest=digest,
        max_nodes=1, expires_unix_ms=clock.now_ms() + 3_600_000), key)
    admin.create_grant(tenant_id="acme", document=doc, signature=sig)
    for n in ("n1", "n2"):
        enrol_test_node(deps, actor="operator:ops", node_id=n, tenant_scope="")
    return flow, clock, hsm, tmp_path


def _token(flow: NodeFlow, node: str) -> bytes:
    ch = flow.challenge(node_id=node, job_id="j")
    _, pub = sealing.generate_node_key()
    kind, payload = make_evidence(expected_report_data(ch.nonce, ch.session_id, pub))
    return flow.attest(node_id=node, session_id=ch.session_id, kind=kind, payload=payload,
                       node_public_key=pub).token


def _release(flow: NodeFlow, node: str, token: bytes):
    return flow.release(node_id=node, token=token, tenant_id="acme", dataset_id="ds",
                        key_version=1)


def test_lease_room_limits_nodes_until_a_lease_expires(broker) -> None:
    flow, clock, hsm, _ = broker
    first = _release(flow, "n1", _token(flow, "n1"))
    _release(flow, "n1", _token(flow, "n1"))  # the same node may release again
    calls = hsm.calls
    with pytest.raises(PermissionDenied, match=r"lease\.no_room"):
        _release(flow, "n2", _token(flow, "n2"))
    assert hsm.calls == calls + 1  # only the token signature touched the HSM
    clock.advance(first.lease_expires_ms - clock.now_ms())
    _release(flow, "n2", _token(flow, "n2"))


def test_tokens_expire_and_belong_to_one_node(broker) -> None:
    """Also for a token this process issued (Release skips re-checking its signature, never
    its expiry or its node)."""
    flow, clock, _, _ = broker
    token = _token(flow, "n1")
    with pytest.raises(Unauthenticated, match="another node"):
        _release(flow, "n2", token)
    clock.advance(60_000)
    with pytest.raises(Unauthenticated, match="expired"):
        _release(flow, "n1", token)


def test_renewal_needs_a_fresh_token_and_a_live_lease(broker) -> None:
    flow, clock, _, tmp = broker
    lease = _release(flow, "n1", _token(flow, "n1"))
    clock.advance(100_000)
    expires = flow.renew(node_id="n1", lease_id=lease.lease_id, token=_token(flow, "n1"))
    assert expires == clock.now_ms() + 120_000
    clock.advance(120_000)
    with pytest.raises(PermissionDenied, match=r"lease\.expired"):
        flow.renew(node_id="n1", lease_id=lease.lease_id, token=_token(flow, "n1"))
    assert verify_log(tmp / "audit.log").ok


def test_concurrent_releases_cannot_overfill_the_grant(broker, monkeypatch) -> None:
    """max_nodes=1 holds when several nodes release at the same moment: the room check and
    the lease that takes the room are one step, and sealing (slowed here) is outside it."""
    import threading
    import time

    flow, _, hsm, _ = broker
    nodes = [f"r{i}" for i in range(6)]
    for n in nodes:
        enrol_test_node(flow.d, actor="operator:ops", node_id=n, tenant_scope="")
    tokens = {n: _token(flow, n) for n in nodes}
    slow_seal = hsm.seal_share

    def seal_slowly(*args, **kwargs):
        time.sleep(0.05)  # a slow HSM
        return slow_seal(*args, **kwargs)

    monkeypatch.setattr(hsm, "seal_share", seal_slowly)
    room = flow.d.repo.lease_room

    def check_room_slowly(*args, **kwargs):
        answer = room(*args, **kwargs)
        time.sleep(0.05)  # and the window between the room check and the lease insert
        return answer

    monkeypatch.setattr(flow.d.repo, "lease_room", check_room_slowly)
    barrier = threading.Barrier(len(nodes))
    outcomes: dict[str, str] = {}

    def go(node: str) -> None:
        barrier.wait()
        try:
            _release(flow, node, tokens[node])
            outcomes[node] = "released"
        except PermissionDenied as exc:
            outcomes[node] = str(exc)

    threads = [threading.Thread(target=go, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    released = [n for n, o in outcomes.items() if o == "released"]
    assert len(released) == 1, outcomes
    assert all("lease.no_room" in o for n, o in outcomes.items() if n not in released)


def test_a_failed_sealing_does_not_keep_the_room(broker) -> None:
    flow, _, hsm, _ = broker
    token = _token(flow, "n1")
    hsm.fail_next(error=HsmUnavailable)
    with pytest.raises(Unavailable):
        _release(flow, "n1", token)
    _release(flow, "n2", _token(flow, "n2"))  # the grant's one place is still free


class _Counting:
    """The test verifier, counting its verifications."""

    kind = "test-json"

    def __init__(self) -> None:
        self.inner, self.calls = JsonClaimsVerifier(), 0

    def verify(self, evidence: bytes, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        return self.inner.verify(evidence, context)


def test_a_quote_shared_by_local_ranks_is_verified_once_and_each_session_checked(broker):
    """Ranks sharing one quote send a broker the same evidence once each: the broker verifies
    it once (for VERDICT_REUSE_MS), and still checks every session on its own."""
    flow, clock, _, _ = broker
    counting = _Counting()
    flow.d.verifiers = {"test-json": counting}
    sessions = []
    for _ in range(3):
        ch = flow.challenge(node_id="n1", job_id="j")
        _, pub = sealing.generate_node_key()
        sessions.append((ch, pub, expected_report_data(ch.nonce, ch.session_id, pub)))
    items = tuple(rd for _, _, rd in sessions[:2])
    kind, payload = make_evidence(combined_report_data(items))

    def attest(ch, pub, report_data_set):  # type: ignore[no-untyped-def]
        return flow.attest(node_id="n1", session_id=ch.session_id, kind=kind, payload=payload,
                           node_public_key=pub, report_data_set=report_data_set)

    tokens = [attest(ch, pub, items).token for ch, pub, _ in sessions[:2]]
    assert len(set(tokens)) == 2 and counting.calls == 1
    # a session whose report data the evidence does not cover is refused, verdict or not
    ch, pub, _ = sessions[2]
    with pytest.raises(PermissionDenied, match="report_data_set"):
        attest(ch, pub, items)
    with pytest.raises(PermissionDenied, match=r"nonce\.reused"):  # and no session twice
        attest(*sessions[0][:2], items)
    # past the reuse window the same evidence is verified again
    fresh = []
    for _ in range(2):
        ch = flow.challenge(node_id="n1", job_id="j")
        _, pub = sealing.generate_node_key()
        fresh.append((ch, pub, expected_report_data(ch.nonce, ch.session_id, pub)))
    more = tuple(rd for _, _, rd in fresh)
    kind, payload = make_evidence(combined_report_data(more))
    attest(*fresh[0][:2], more)
    assert counting.calls == 2
    clock.advance(VERDICT_REUSE_MS)
    attest(*fresh[1][:2], more)
    assert counting.calls == 3


def test_a_failed_verdict_is_not_reused(broker) -> None:
    flow, _, _, _ = broker
    counting = _Counting()
    flow.d.verifiers = {"test-json": counting}
    for _ in range(2):
        ch = flow.challenge(node_id="n1", job_id="j")
        _, pub = sealing.generate_node_key()
        kind, payload = make_evidence(b"\0" * 32)  # bound to no session
        with pytest.raises(PermissionDenied, match="evidence"):
            flow.attest(node_id="n1", session_id=ch.session_id, kind=kind, payload=payload,
                        node_public_key=pub)
    assert counting.calls == 2


def test_the_policy_is_decided_once_per_claims(broker, monkeypatch) -> None:
    """Attest decides the policy over the verified claims; Release and renewals of the same
    claims reuse that decision instead of evaluating the stored claims again."""
    flow, _, _, _ = broker
    calls = []
    evaluate = Policy.evaluate

    def counting(self, claims):  # type: ignore[no-untyped-def]
        calls.append(self.digest)
        return evaluate(self, claims)

    monkeypatch.setattr(Policy, "evaluate", counting)
    first = _release(flow, "n1", _token(flow, "n1"))
    assert len(calls) == 1
    again = _release(flow, "n1", _token(flow, "n1"))  # same claims: decided already
    assert len(calls) == 1 and again.lease_id
    flow.renew(node_id="n1", lease_id=first.lease_id, token=_token(flow, "n1"))
    assert len(calls) == 1



def _attest_release(flow: NodeFlow, node: str):
    ch = flow.challenge(node_id=node, job_id="j")
    _, pub = sealing.generate_node_key()
    kind, payload = make_evidence(expected_report_data(ch.nonce, ch.session_id, pub))
    return flow.attest_release(node_id=node, session_id=ch.session_id, kind=kind,
                               payload=payload, node_public_key=pub, tenant_id="acme",
                               dataset_id="ds", key_version=1)


def test_one_call_release_uses_the_hsm_once_and_audits_both_steps(broker) -> None:
    """Attest then Release touches the HSM twice (token signature, seal); the one call that
    does both only seals, and its two records (attest, release) are in the chain."""
    flow, _, hsm, tmp = broker
    calls = hsm.calls
    _release(flow, "n1", _token(flow, "n1"))
    three = hsm.calls - calls
    calls = hsm.calls
    attested, released = _attest_release(flow, "n1")
    assert (three, hsm.calls - calls) == (2, 1)
    assert attested.token == b"" and attested.rules and released.sealed_share
    log = [line for line in (tmp / "audit.log").read_text().splitlines()
           if "checkpoint" not in line]
    assert '"attest"' in log[-2] and '"release"' in log[-1] and '"allowed"' in log[-1]
    assert verify_log(tmp / "audit.log").ok


def test_one_call_release_fails_closed(broker, monkeypatch) -> None:
    """A seal that fails frees the room; an audit log that cannot sync releases nothing."""
    flow, _, hsm, _ = broker
    hsm.fail_next(error=HsmUnavailable)
    with pytest.raises(Unavailable):
        _attest_release(flow, "n1")

    def no_disk(seq: int) -> None:
        raise Unavailable("audit log unavailable: disk gone")

    monkeypatch.setattr(flow.d.audit, "wait_durable", no_disk)
    with pytest.raises(Unavailable, match="disk gone"):
        _attest_release(flow, "n1")
    monkeypatch.undo()
    _attest_release(flow, "n2")  # the grant's one place is still free after both failures


def test_one_call_release_keeps_the_spent_nonce_durable(broker, monkeypatch) -> None:
    """The releasing Attest commits the consumed session without its own sync: a release's
    lease commit (durable) covers it, and a refusal after the nonce was spent marks the session
    used durably before it leaves; another node's session is not marked (nor spent)."""
    flow, _, _, _ = broker
    repo = flow.d.repo
    calls: list[tuple] = []
    consume, mark = repo.consume_session, repo.mark_session_used
    monkeypatch.setattr(repo, "consume_session", lambda s, n, **kw: (
        calls.append(("consume", s, kw.get("durable", True))), consume(s, n, **kw))[1])
    monkeypatch.setattr(repo, "mark_session_used", lambda s: (
        calls.append(("mark", s)), mark(s))[1])
    _attest_release(flow, "n1")  # released: the lease's commit is the durable one
    assert [c[0] for c in calls] == ["consume"] and calls[0][2] is False
    calls.clear()
    with pytest.raises(PermissionDenied, match=r"lease\.no_room"):
        _attest_release(flow, "n2")  # the grant's one place is n1's: refused after attesting
    assert [c[0] for c in calls] == ["consume", "mark"] and calls[1][1] == calls[0][1]
    assert repo.get_session(calls[0][1]).used
    calls.clear()
    ch = flow.challenge(node_id="n1", job_id="j")  # n1's session, named by n2
    _, pub = sealing.generate_node_key()
    kind, payload = make_evidence(expected_report_data(ch.nonce, ch.session_id, pub))
    with pytest.raises(PermissionDenied, match=r"session\.node"):
        flow.attest_release(node_id="n2", session_id=ch.session_id, kind=kind,
                            payload=payload, node_public_key=pub, tenant_id="acme",
                            dataset_id="ds", key_version=1)
    assert [c[0] for c in calls] == ["consume"] and not repo.get_session(ch.session_id).used


@pytest.mark.parametrize("change", ["grant", "node"])
def test_a_revocation_between_the_checks_and_the_lease_refuses_the_release(
        broker, monkeypatch, change) -> None:
    """The grant (or the node) is revoked by another request after this release checked it
    and before its lease is taken: refused with the rule and audited; no lease, no sealing."""
    flow, _, hsm, tmp = broker
    token = _token(flow, "n1")
    repo, take_lease = flow.d.repo, flow.d.repo.take_lease

    def revoked_meanwhile(*args, **kw):  # committed by another request just before the lease
        if change == "grant":
            repo.revoke_grant("acme", "g")
        else:
            repo.revoke_node("n1")
        return take_lease(*args, **kw)

    monkeypatch.setattr(repo, "take_lease", revoked_meanwhile)
    calls = hsm.calls
    with pytest.raises(PermissionDenied, match=rf"{change}\.revoked"):
        _release(flow, "n1", token)
    assert repo.active_lease_nodes("acme", "g", flow.d.clock.now_ms()) == set()
    assert hsm.calls == calls  # nothing sealed
    denied = [json.loads(line) for line in (tmp / "audit.log").read_text().splitlines()
              if '"denied"' in line]
    assert any(f"{change}.revoked" in r.get("reason", "") for r in denied)
