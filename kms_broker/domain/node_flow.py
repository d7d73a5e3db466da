"""Node-facing release pipeline: challenge, attest, release, renew (DESIGN.md section 5).

Each step runs authenticate -> authorize -> audit -> act, and the audit fails closed: when
the record cannot be written the step raises ``Unavailable`` and nothing is released. The
broker process never sees a share: the HSM unwraps it under the tenant KEK and seals it to the
node's one-time key in one call.

Two ways to a release: the three steps of DESIGN.md section 5 (``challenge``, ``attest`` ->
signed token, ``release`` with that token), or ``challenge`` and then ``attest_release``,
which runs every check of ``attest`` and then every check of ``release`` in one call, the
verified claims passed in memory: no token is signed or verified, and the two audit records
share one sync. Both end in the same release checks (``_released``).

A passed attestation's audit record (event ``attest``) gives as its reason the kind of
evidence, the job id and, when the evidence measured a job, its ``job.digest``: the exact job
the node attested for, which a tenant can compare with ``trainer job-digest``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from attest.interface import (
    MAX_REPORT_DATA_SET,
    EvidenceVerifier,
    MalformedEvidence,
    VerificationContext,
    VerificationResult,
    combined_report_data,
    expected_report_data,
)
from attest.policy import evidence_claims
from kms_broker.domain.deps import BrokerDeps, check_id, check_size, hsm_errors
from kms_broker.domain.errors import (
    AuthorizationChanged,
    BrokerError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RuleOutcome,
    Unauthenticated,
)
from kms_broker.domain.memo import BoundedCache
from kms_broker.domain.model import Grant, Lease, Session
from kms_broker.encoding import canonical_json
from kms_broker.grants import InvalidGrantSignature, verify_grant
from kms_broker.hsm.interface import ShareBinding
from kms_broker.sealing import decode_public_key, release_transcript
from kms_broker.tokens import InvalidToken, TokenClaims, TokenVerifier, issue_token

__all__ = ["AttestResult", "Challenge", "NodeFlow", "ReleaseResult"]

NONCE_SIZE = 32
VERDICT_REUSE_MS = 5_000  # a passing evidence verdict serves identical evidence this long
MAX_KEY_VERSION = 2**32 - 1
F = TypeVar("F", bound=Callable[..., Any])

# the audit subject of each node-facing step, from its keyword arguments
_SUBJECTS: dict[str, Callable[[dict[str, Any]], str]] = {
    "challenge": lambda a: f"job:{a.get('job_id', '')}",
    "attest": lambda a: f"session:{a.get('session_id', '')}",
    "release": lambda a: (f"dataset:{a.get('tenant_id', '')}/{a.get('dataset_id', '')}"
                          f"@v{a.get('key_version', 0)}"),
    "renew": lambda a: f"lease:{a.get('lease_id', '')}",
    "watch": lambda a: f"node:{a.get('node_id', '')}",
}


def audited_refusals(event: str) -> Callable[[F], F]:
    """Every refusal of a step is in the audit log, not only policy denials (which
    ``deps.deny`` audits): an unknown node, session, dataset or lease (NOT_FOUND) and a bad
    token (UNAUTHENTICATED) are audited as "denied", and so is a per-identity limit (the
    step audits that itself). Malformed or oversized input (INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED from a size check) changes nothing and is not audited."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def step(self: NodeFlow, **kwargs: Any) -> Any:
            try:
                return fn(self, **kwargs)
            except (NotFound, Unauthenticated) as exc:
                self.d.refused(event, actor=f"node:{kwargs.get('node_id', '')}",
                               subject=_SUBJECTS[event](kwargs), error=exc)
                raise

        return step  # type: ignore[return-value]

    return wrap


@dataclass(frozen=True, slots=True)
class Challenge:
    nonce: bytes
    session_id: str
    expires_ms: int
    # the dataset's registered manifest, when the challenge named a dataset (see challenge)
    manifest_name: str = ""
    manifest_key_version: int = 0


@dataclass(frozen=True, slots=True)
class AttestResult:
    token: bytes
    expires_ms: int
    rules: tuple[RuleOutcome, ...]


def _job_digest_note(claims: Mapping[str, Any]) -> str:
    """``", job.digest HEX"`` when the verified evidence measured a job (trainer/job_identity
    .py): the audit record then names the exact job the node attested for, which a tenant
    compares with ``trainer job-digest``. Only a 64-digit lowercase hex value is written (the
    claim comes from the node)."""
    digest = claims.get("job.digest")
    if isinstance(digest, str) and len(digest) == 64 and all(
            c in "0123456789abcdef" for c in digest):
        return f", job.digest {digest}"
    return ""


@dataclass(frozen=True, slots=True)
class _Attested:
    """A passed attestation before it is audited: what a token would carry."""

    claims: TokenClaims
    claims_json: bytes
    actor: str
    subject: str
    reason: str
    passed: tuple[RuleOutcome, ...]


@dataclass(frozen=True, slots=True)
class ReleaseResult:
    sealed_share: bytes
    transcript: bytes
    share_index: int
    share_count: int
    lease_id: str
    lease_expires_ms: int


def _check_node_key(key: bytes) -> bytes:
    if len(key) != 65 or key[0] != 4:
        raise InvalidArgument("node_public_key must be a 65-byte SEC1 uncompressed P-256 point")
    try:
        decode_public_key(key)  # memoised: the Release transcript checks the same key again
    except ValueError:
        raise InvalidArgument("node_public_key is not a point on P-256") from None
    return key


def _check_report_data_set(items: Sequence[bytes]) -> None:
    if len(items) > MAX_REPORT_DATA_SET:
        raise ResourceExhausted(f"report_data_set holds at most {MAX_REPORT_DATA_SET} items")
    if any(len(item) != 32 for item in items):
        raise InvalidArgument("each report_data_set item must be 32 bytes")


def _claims_json(claims: Mapping[str, Any]) -> bytes:
    try:
        return canonical_json(dict(claims))
    except (TypeError, ValueError):
        return json.dumps(dict(claims), sort_keys=True, separators=(",", ":"), default=str).encode()


class NodeFlow:
    def __init__(self, deps: BrokerDeps) -> None:
        self.d = deps
        self._tokens: TokenVerifier | None = None
        self._token_verifier()  # fail at start-up, not at the first release, if the HSM is down
        self._policies: dict[tuple[str, str], Any] = {}
        self._verified_tokens = BoundedCache()
        self._verified_grants = BoundedCache()
        self._decisions = BoundedCache()
        self._verdicts = BoundedCache()

    # ------------------------------------------------------------- helpers
    def _token_verifier(self) -> TokenVerifier:
        if self._tokens is None:
            with hsm_errors("loading the signing key"):
                self._tokens = TokenVerifier(self.d.hsm.signing_public_key())
        return self._tokens

    def _policy(self, tenant_id: str, digest: str) -> Any | None:
        cached = self._policies.get((tenant_id, digest))
        if cached is None:
            text = self.d.repo.get_policy(tenant_id, digest)
            if text is None:
                return None
            try:
                cached = self.d.load_policy(text)
            except ValueError:  # a stored row that no longer parses: no policy, fail closed
                return None
            if cached.digest != digest:
                # the stored text is not the policy the tenant's grant signed for: an edited
                # row must not loosen the rules, so this is the same as a missing policy
                return None
            self._policies[(tenant_id, digest)] = cached
        return cached

    def _evaluate(
        self, tenant_id: str, digest: str, claims: Mapping[str, Any]
    ) -> list[RuleOutcome]:
        policy = self._policy(tenant_id, digest)
        if policy is None:
            return [RuleOutcome("policy.missing", False, f"policy {digest[:12]} is not stored")]
        decision = policy.evaluate(claims)
        rules = [RuleOutcome(r.name, bool(r.passed), r.reason) for r in decision.rules]
        if not decision.allowed and all(r.passed for r in rules):
            rules.append(RuleOutcome("policy", False, "policy denied"))
        return rules

    def _verify_token(self, token: bytes, node_id: str, actor: str) -> TokenClaims:
        now = self.d.clock.now_ms()
        key = hashlib.sha256(token).digest()
        claims = self._verified_tokens.get(key)
        if claims is None:
            try:
                claims = self._token_verifier().verify(token, now_ms=now)
            except InvalidToken as exc:
                raise Unauthenticated(f"attestation token rejected: {exc}") from None
            self._verified_tokens.put(key, claims)
        elif now >= claims.exp:
            raise Unauthenticated("attestation token rejected: token expired")
        if claims.node_id != node_id:
            raise Unauthenticated("attestation token was issued to another node")
        return claims

    def _live_node(self, node_id: str, actor: str, event: str, subject: str) -> Any:
        node = self.d.repo.get_node(node_id)
        if node is None:
            raise NotFound(f"node {node_id} is not enrolled")
        if node.revoked:
            raise self.d.deny(event, actor=actor, subject=subject,
                              reason=f"node.revoked: node {node_id} has been revoked")
        self.d.require_bound(node, event=event, actor=actor, subject=subject)
        return node

    # ----------------------------------------------------------- watch
    @audited_refusals("watch")
    def check_watch(self, *, node_id: str) -> None:
        """Only an enrolled, unrevoked node whose record is this broker's may watch."""
        check_id("node", node_id)
        self._live_node(node_id, f"node:{node_id}", "watch", f"node:{node_id}")

    # ----------------------------------------------------------- challenge
    @audited_refusals("challenge")
    def challenge(self, *, node_id: str, job_id: str, tenant_id: str = "",
                  dataset_id: str = "") -> Challenge:
        """A fresh session. With ``dataset_id`` (and ``tenant_id``): also the dataset's
        registered manifest name and the key version it belongs to, so the node can check its
        store before any key is released; only for a node that may ask for the dataset (an
        unrevoked grant names this job and dataset), else none; a node enrolled for another
        tenant is refused (``node.scope``, audited). Manifest names are opaque random object
        names (sealed.writer); the manifest itself is encrypted under the DEK."""
        check_id("node", node_id)
        check_id("job", job_id)
        actor = f"node:{node_id}"
        node = self._live_node(node_id, actor, "challenge", f"job:{job_id}")
        manifest = ("", 0)
        if dataset_id or tenant_id:
            check_id("tenant", tenant_id)
            if node.tenant_scope not in ("", tenant_id):
                # the node's own enrolment scope is no secret to it (no oracle of datasets or
                # grants): refused here, naming the rule, as its release would be
                raise self.d.deny("challenge", actor=actor, subject=f"job:{job_id}",
                                  reason=f"node.scope: node is enrolled for tenant "
                                         f"{node.tenant_scope} only")
            manifest = self._manifest_for(node.tenant_scope, job_id, tenant_id, dataset_id)
        limit = self.d.settings.max_pending_sessions_per_node
        if self.d.repo.pending_sessions(node_id, self.d.clock.now_ms(), limit) >= limit:
            error = ResourceExhausted(f"node {node_id} has {limit} unused challenges pending; "
                                      f"attest or wait for them to expire")
            self.d.refused("challenge", actor=actor, subject=f"job:{job_id}", error=error)
            raise error
        session = Session(
            session_id=self.d.random.token_id(),
            node_id=node_id,
            job_id=job_id,
            nonce=self.d.random.bytes(NONCE_SIZE),
            expires_ms=self.d.clock.now_ms() + self.d.settings.session_ttl_ms,
        )
        self.d.repo.add_session(session)
        return Challenge(session.nonce, session.session_id, session.expires_ms, *manifest)

    def _manifest_for(self, tenant_scope: str, job_id: str, tenant_id: str,
                      dataset_id: str) -> tuple[str, int]:
        """The dataset's registered manifest and its key version, or ("", 0) when this node
        may not ask for the dataset or the dataset has none on record: the answer never says
        which (no oracle of datasets or grants); the release refuses on its own."""
        check_id("tenant", tenant_id)
        check_id("dataset", dataset_id)
        if tenant_scope not in ("", tenant_id):
            return "", 0
        if not any(g.tenant_id == tenant_id and not g.revoked
                   for g in self.d.repo.grants_for(job_id=job_id, dataset_id=dataset_id)):
            return "", 0
        dataset = self.d.repo.get_dataset(tenant_id, dataset_id)
        if dataset is None or dataset.status != "active" or not dataset.manifest_key_version:
            return "", 0
        return dataset.manifest_name, dataset.manifest_key_version

    # -------------------------------------------------------------- attest
    @audited_refusals("attest")
    def attest(
        self, *, node_id: str, session_id: str, kind: str, payload: bytes, node_public_key: bytes,
        report_data_set: Sequence[bytes] = (),
    ) -> AttestResult:
        a = self._attested(node_id=node_id, session_id=session_id, kind=kind, payload=payload,
                           node_public_key=node_public_key, report_data_set=report_data_set)
        # not durable on its own (the audit append below syncs the disk): claims lost to a
        # power cut only make this token's release fail closed ("claims.digest")
        self.d.repo.put_session_claims(session_id, a.claims_json)
        self.d.audit.append("attest", actor=a.actor, subject=a.subject, outcome="allowed",
                            reason=a.reason)
        with hsm_errors("token signing"):
            token = issue_token(a.claims, self.d.hsm.sign)
        # this process signed these very claims: its Release need not verify the signature
        # again (expiry and node are still checked on every use, _verify_token)
        self._verified_tokens.put(hashlib.sha256(token).digest(), a.claims)
        return AttestResult(token, a.claims.exp, a.passed)

    def attest_release(
        self, *, node_id: str, session_id: str, kind: str, payload: bytes, node_public_key: bytes,
        report_data_set: Sequence[bytes] = (), tenant_id: str, dataset_id: str,
        key_version: int,
    ) -> tuple[AttestResult, ReleaseResult]:
        """Attest and, when it passes, release in one step (one RPC): the checks of
        :meth:`attest` and then of :meth:`release`, each audited under its own event, with
        the verified claims handed from one to the other in memory instead of through a
        signed token. No token is issued (``AttestResult.token`` is empty), so none can be
        replayed and the session's claims need not be stored for a later Release: a renewal
        attests afresh and gets a token of its own.

        Audit: the "attest allowed" record is written before the release's checks and is on
        disk, with the release's own record, before anything leaves (one sync for both);
        a refusal in the release part is audited as a release refusal, synced likewise.

        The consumed session is committed without its own wait for the disk: a release's
        lease commit is durable and covers it, and any other ending (a denial, an error)
        marks the session used again durably before it leaves, so the nonce stays spent
        across a power cut whatever the answer was."""
        check_id("tenant", tenant_id)  # malformed release parameters change nothing
        check_id("dataset", dataset_id)
        if not 1 <= key_version <= MAX_KEY_VERSION:
            raise InvalidArgument("key_version must be from 1 to 2**32-1")
        won: list[str] = []
        try:
            a = self._attest_step(node_id=node_id, session_id=session_id, kind=kind,
                                  payload=payload, node_public_key=node_public_key,
                                  report_data_set=report_data_set, won=won)
            seq = self.d.audit.write("attest", actor=a.actor, subject=a.subject,
                                     outcome="allowed", reason=a.reason)
            try:
                released = self._release_step(
                    node_id=node_id, tenant_id=tenant_id, dataset_id=dataset_id,
                    key_version=key_version, verified=(a.claims, a.claims_json))
            finally:
                self.d.audit.wait_durable(seq)  # already on disk after the release's own sync
        except BaseException:
            if won:  # this call spent the nonce: on disk before the refusal leaves
                with contextlib.suppress(Exception):  # the store is down: the refusal stands
                    self.d.repo.mark_session_used(session_id)
            raise
        return AttestResult(b"", a.claims.exp, a.passed), released

    @audited_refusals("attest")
    def _attest_step(self, **kwargs: Any) -> _Attested:
        return self._attested(**kwargs)

    def _attested(
        self, *, node_id: str, session_id: str, kind: str, payload: bytes, node_public_key: bytes,
        report_data_set: Sequence[bytes] = (), won: list[str] | None = None,
    ) -> _Attested:
        """Every check of an attestation (the session consumed, the evidence verified, the
        job's policies decided); the claims a token would carry, not yet audited.

        ``won``: the caller makes the consumed session durable itself (see
        :meth:`attest_release`); the session id is appended to it once this call has spent
        the nonce (and not when the session was another node's or already used)."""
        check_id("node", node_id)
        check_id("session", session_id)
        check_size("evidence", payload, self.d.settings.max_evidence_bytes)
        _check_node_key(node_public_key)
        _check_report_data_set(report_data_set)
        actor, subject = f"node:{node_id}", f"session:{session_id}"
        node = self.d.repo.get_node(node_id)
        if node is None:
            raise NotFound(f"node {node_id} is not enrolled")
        if node.revoked:
            raise self.d.deny("attest", actor=actor, subject=subject,
                              reason=f"node.revoked: node {node_id} has been revoked")
        self.d.require_bound(node, event="attest", actor=actor, subject=subject)
        verifier = self.d.verifiers.get(kind)
        if verifier is None:
            raise InvalidArgument(
                f"evidence kind {kind!r:.40} is not configured; known: {sorted(self.d.verifiers)}"
            )
        # bound to the node first: another node's session is refused without being consumed
        session = self.d.repo.consume_session(session_id, node_id, durable=won is None)
        if session is None:
            raise NotFound("unknown session id")
        if won is not None and session.node_id == node_id and not session.used:
            won.append(session_id)
        if session.node_id != node_id:
            raise self.d.deny("attest", actor=actor, subject=subject,
                              reason="session.node: the session was issued to another node")
        if session.used:
            raise self.d.deny("attest", actor=actor, subject=subject,
                              reason="nonce.reused: this session's nonce was already used")
        if self.d.clock.now_ms() >= session.expires_ms:
            raise self.d.deny("attest", actor=actor, subject=subject,
                              reason="session.expired: the challenge is older than its TTL")
        own = expected_report_data(session.nonce, session_id, node_public_key)
        if report_data_set and own not in report_data_set:
            raise self.d.deny("attest", actor=actor, subject=subject,
                              reason="evidence.report_data_set: this session's report data is "
                                     "not in the set the evidence covers")
        context = VerificationContext(
            expected_report_data=(combined_report_data(report_data_set) if report_data_set
                                  else own),
            # a node enrolled without a TPM (test-json only) has no AK: tpm2.ak_not_enrolled
            node={"node_id": node_id, "ek_certificate": node.ek_certificate,
                  **({"ak_public": node.ak_public} if node.ak_public else {})},
            reference=self.d.reference_values.get(kind, {}),
        )
        try:
            result = self._verified(kind, verifier, payload, context)
        except MalformedEvidence as exc:
            self.d.deny("attest", actor=actor, subject=subject, reason=f"evidence.malformed: {exc}")
            raise InvalidArgument(f"malformed {kind} evidence: {exc}") from None
        if not result.ok:
            rules = tuple(
                RuleOutcome(f.id, f.severity != "error", f.message) for f in result.failures
            )
            raise self.d.deny("attest", actor=actor, subject=subject,
                              reason="evidence: verification failed", rules=rules)
        claims = evidence_claims(result)
        claims_json = _claims_json(claims)
        claims_digest = hashlib.sha256(claims_json).hexdigest()
        rules = self._job_policy_rules(session.job_id, node.tenant_scope, claims, claims_digest)
        if rules is not None and not any(all(r.passed for r in group) for group in rules):
            flat = tuple(r for group in rules for r in group)
            raise self.d.deny("attest", actor=actor, subject=subject,
                              reason="policy: no grant's policy for this job passes", rules=flat)
        now = self.d.clock.now_ms()
        token_claims = TokenClaims(
            session_id=session_id, node_id=node_id, node_key=node_public_key,
            job_id=session.job_id, tenant_scope=node.tenant_scope,
            claims_digest=claims_digest, iat=now, exp=now + self.d.settings.token_ttl_ms,
        )
        return _Attested(token_claims, claims_json, actor, subject,
                         f"{kind} evidence verified for job {session.job_id}"
                         f"{_job_digest_note(claims)}",
                         tuple(r for group in (rules or []) for r in group))

    def _verified(self, kind: str, verifier: EvidenceVerifier, payload: bytes,
                  context: VerificationContext) -> VerificationResult:
        """``verifier.verify(payload, context)``, or a passing verdict on the very same
        evidence in the very same context from the last :data:`VERDICT_REUSE_MS`.

        Why: the local ranks of a node share one quote (``trainer.quote_batch``), so a broker
        gets the same evidence, with the same combined report data, once per rank within
        milliseconds. The verdict is a function of those inputs alone; what makes each
        attestation fresh and single-use (this session's own report data in the set the
        evidence covers, the session consumed once, the node's record and revocation) is
        checked outside it, for every request. Only passing verdicts are kept, and only
        briefly, so one that depends on the clock (a certificate's or collateral's validity)
        cannot outlive its moment by more than that."""
        digest = hashlib.sha256()
        for part in (kind.encode(), payload, context.expected_report_data,
                     repr(sorted(context.node.items())).encode(),
                     json.dumps(context.reference, sort_keys=True, default=repr).encode()):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
        key, now = digest.digest(), self.d.clock.now_ms()
        held = self._verdicts.get(key)
        if held is not None and 0 <= now - held[0] < VERDICT_REUSE_MS:
            return held[1]  # type: ignore[no-any-return]
        result = verifier.verify(payload, context)
        if result.ok:
            self._verdicts.put(key, (now, result))
        return result

    def _job_policy_rules(
        self, job_id: str, tenant_scope: str, claims: Mapping[str, Any], claims_digest: str
    ) -> list[list[RuleOutcome]] | None:
        now = self.d.clock.now_ms()
        grants = [
            g for g in self.d.repo.grants_for(job_id=job_id)
            if not g.revoked and g.expires_ms > now and tenant_scope in ("", g.tenant_id)
        ]
        if not grants:
            return None  # nothing to check yet; release will say "no grant"
        digests = sorted({(g.tenant_id, g.policy_digest) for g in grants})
        return [self._decide(t, d, claims_digest, lambda: claims) for t, d in digests]

    def _decide(self, tenant_id: str, digest: str, claims_digest: str,
                claims: Callable[[], Mapping[str, Any]]) -> list[RuleOutcome]:
        """The policy's rules over the claims whose canonical JSON has ``claims_digest``,
        memoised: a decision is a pure function of the policy text (named by its digest) and
        the claims, so attest, release and renew of one node's claims evaluate it once."""
        memo = (tenant_id, digest, claims_digest)
        rules = self._decisions.get(memo)
        if rules is None:
            rules = self._evaluate(tenant_id, digest, claims())
            if not any(r.name == "policy.missing" for r in rules):  # a later put may add it
                self._decisions.put(memo, rules)
        return rules

    # ------------------------------------------------------------- release
    @audited_refusals("release")
    def release(
        self, *, node_id: str, token: bytes, tenant_id: str, dataset_id: str, key_version: int
    ) -> ReleaseResult:
        return self._released(node_id=node_id, token=token, tenant_id=tenant_id,
                              dataset_id=dataset_id, key_version=key_version)

    @audited_refusals("release")
    def _release_step(self, **kwargs: Any) -> ReleaseResult:
        return self._released(**kwargs)

    def _released(
        self, *, node_id: str, tenant_id: str, dataset_id: str, key_version: int,
        token: bytes = b"", verified: tuple[TokenClaims, bytes] | None = None,
    ) -> ReleaseResult:
        """A release for the claims of ``token``, or for ``verified``: the claims and their
        canonical JSON that :meth:`attest_release` has just verified in this call (the
        stored copy may lag behind: it is written without its own sync)."""
        check_id("node", node_id)
        check_id("tenant", tenant_id)
        check_id("dataset", dataset_id)
        if not 1 <= key_version <= MAX_KEY_VERSION:
            raise InvalidArgument("key_version must be from 1 to 2**32-1")
        actor = f"node:{node_id}"
        subject = f"dataset:{tenant_id}/{dataset_id}@v{key_version}"
        claims = (verified[0] if verified is not None
                  else self._verify_token(token, node_id, actor))
        # every row this release checks, in one repository call; checked in the order below
        node, tenant, dataset, share, session, session_claims = self.d.repo.release_reads(
            node_id=node_id, tenant_id=tenant_id, dataset_id=dataset_id,
            key_version=key_version, session_id=claims.session_id)
        if verified is not None:
            session_claims = verified[1]
        if node is None:
            raise NotFound(f"node {node_id} is not enrolled")
        if node.revoked:
            raise self.d.deny("release", actor=actor, subject=subject,
                              reason=f"node.revoked: node {node_id} has been revoked")
        if tenant is None:
            raise NotFound(f"tenant {tenant_id} is not registered")
        if tenant.status != "active":
            raise self.d.deny("release", actor=actor, subject=subject,
                              reason=f"tenant.shredded: tenant {tenant_id} has been shredded")
        # the rows this release relies on for who the node and the tenant are
        self.d.require_bound(node, event="release", actor=actor, subject=subject)
        self.d.require_bound(tenant, event="release", actor=actor, subject=subject)
        if claims.tenant_scope not in ("", tenant_id):
            raise self.d.deny("release", actor=actor, subject=subject,
                              reason=f"node.scope: node is enrolled for tenant "
                                     f"{claims.tenant_scope} only")
        if dataset is None:
            raise NotFound(f"dataset {tenant_id}/{dataset_id} does not exist")
        if dataset.status != "active":
            raise self.d.deny("release", actor=actor, subject=subject,
                              reason="dataset.pending: the dataset's upload is not finished")
        if share is None:
            raise NotFound(f"dataset {tenant_id}/{dataset_id} has no key version {key_version}")
        if session is None:
            raise Unauthenticated("the token's session no longer exists")
        # The lease-room check and the lease that takes the room are one repository step
        # (one write transaction), so two nodes releasing at once, through one broker process
        # or several sharing the state, cannot both fit under max_nodes. The lease and the
        # release's audit record are one unit of work (PostgreSQL: one transaction, so no
        # lease commits without its record), both before sealing; the lease is dropped again
        # if the audit or sealing fails.
        written: list[int] = []

        def take(grant: Grant, now: int) -> Lease | None:
            lease = Lease(
                lease_id=self.d.random.token_id(), node_id=node_id, grant_id=grant.grant_id,
                tenant_id=tenant_id, dataset_id=dataset_id,
                expires_ms=min(now + self.d.settings.lease_ttl_ms, grant.expires_ms),
            )
            try:
                with self.d.unit_of_work():
                    if not self.d.repo.take_lease(lease, now_ms=now, max_nodes=grant.max_nodes):
                        return None
                    written.append(self.d.audit.write(
                        "release", actor=actor, subject=subject, outcome="allowed",
                        reason=f"grant {grant.grant_id}, job {claims.job_id}"))
            except AuthorizationChanged as changed:
                # revoked or shredded since this release's checks (the repository read the
                # rows again under the lease's lock): no lease was taken; refused, audited
                raise self.d.deny("release", actor=actor, subject=subject,
                                  reason=str(changed)) from None
            except BaseException:
                with contextlib.suppress(Exception):  # without a unit of work it committed
                    self.d.repo.drop_lease(lease.lease_id)
                raise
            return lease

        _grant, lease = self._authorize(claims, node_id, tenant_id, dataset_id, actor, subject,
                                        tenant.signing_public_key, session_claims, take)
        try:
            sealed, transcript = self._seal(claims, session, share, tenant_id, dataset_id,
                                            key_version, written[0], actor, subject,
                                            share_index=dataset.share_index)
        except BaseException:
            with contextlib.suppress(Exception):
                self.d.repo.drop_lease(lease.lease_id)  # the reservation never took effect
            raise
        return ReleaseResult(sealed, transcript, dataset.share_index, dataset.share_count,
                             lease.lease_id, lease.expires_ms)

    def _seal(self, claims: TokenClaims, session: Any, share: Any, tenant_id: str,
              dataset_id: str, key_version: int, seq: int, actor: str,
              subject: str, *, share_index: int) -> tuple[bytes, bytes]:
        """Seal the share; ``seq``: the release's audit record, written before the HSM acts
        (fail closed). The sealed share leaves only once the record is durable (the file
        log's sync overlaps the HSM call; a PostgreSQL record committed with its lease)."""
        transcript = release_transcript(
            session_id=claims.session_id, nonce=session.nonce, tenant_id=tenant_id,
            dataset_id=dataset_id, key_version=key_version,
            broker_id=self.d.settings.broker_id, node_public_key=claims.node_key,
        )
        try:
            with hsm_errors("sealing"):
                # bound inside the HSM: a share row moved from another dataset, key version
                # or share index does not unwrap (IntegrityFailure, audited below)
                binding = ShareBinding(tenant_id=tenant_id, dataset_id=dataset_id,
                                       key_version=key_version, share_index=share_index)
                sealed = self.d.hsm.seal_share(
                    share.wrapped_share, binding, share.kek_version, claims.node_key, transcript
                )
        except BrokerError as exc:
            self._audit_error("release", actor, subject, str(exc))
            raise
        finally:
            self.d.audit.wait_durable(seq)
        return sealed, transcript

    def _audit_error(self, event: str, actor: str, subject: str, reason: str) -> None:
        with contextlib.suppress(BrokerError):
            self.d.audit.append(event, actor=actor, subject=subject, outcome="error",
                                reason=reason)

    def _authorize(
        self, claims: TokenClaims, node_id: str, tenant_id: str, dataset_id: str,
        actor: str, subject: str, tenant_key: bytes, session_claims: bytes | None,
        take: Callable[[Grant, int], Lease | None],
    ) -> tuple[Grant, Lease]:
        """The first grant that is signed, unexpired, unrevoked, policy-passing and has lease
        room, with the lease ``take`` took under it (the room is checked once, in the write
        transaction that takes it); else deny with every grant's failures.

        ``tenant_key`` is the signing key of the tenant record this release just read and
        checked active; ``session_claims`` the stored claims of the token's session."""
        grants = [
            (g, signed) for g, signed in self.d.repo.grants_with_documents(
                job_id=claims.job_id, dataset_id=dataset_id)
            if g.tenant_id == tenant_id
        ]
        if not grants:
            raise self.d.deny("release", actor=actor, subject=subject,
                              reason=f"grant.missing: no grant lets job {claims.job_id} "
                                     f"read {tenant_id}/{dataset_id}")
        if session_claims is None or (
            hashlib.sha256(session_claims).hexdigest() != claims.claims_digest
        ):
            raise self.d.deny("release", actor=actor, subject=subject,
                              reason="claims.digest: stored claims do not match the token")
        parsed: list[Any] = []

        def claims_map() -> Any:
            if not parsed:
                parsed.append(json.loads(session_claims))  # type: ignore[arg-type]
            return parsed[0]

        now = self.d.clock.now_ms()
        outcomes: list[RuleOutcome] = []
        for grant, signed in grants:
            failed = self._signed_grant_problems(grant, tenant_key, now, signed)
            if not failed:
                rules = self._decide(tenant_id, grant.policy_digest, claims.claims_digest,
                                     claims_map)
                failed = [r for r in rules if not r.passed]
            if not failed:
                lease = take(grant, now)
                if lease is not None:
                    return grant, lease
                failed = [RuleOutcome("lease.no_room", False,
                                      f"grant {grant.grant_id} allows {grant.max_nodes} "
                                      f"node(s), all leased")]
            outcomes.extend(failed)
        first = outcomes[0]
        raise self.d.deny("release", actor=actor, subject=subject,
                          reason=f"{first.name}: {first.reason}", rules=tuple(outcomes))

    def _grant_problems(self, grant: Grant, tenant_key: bytes, now: int) -> list[RuleOutcome]:
        if grant.revoked or now >= grant.expires_ms:
            return self._signed_grant_problems(grant, tenant_key, now, None)
        return self._signed_grant_problems(
            grant, tenant_key, now, self.d.repo.grant_document(grant.tenant_id, grant.grant_id))

    def _signed_grant_problems(
        self, grant: Grant, tenant_key: bytes, now: int, signed: tuple[bytes, bytes] | None
    ) -> list[RuleOutcome]:
        """``signed``: the grant's stored (document, signature), read with the grant row."""
        gid = grant.grant_id
        if grant.revoked:
            return [RuleOutcome("grant.revoked", False, f"grant {gid} was revoked")]
        if now >= grant.expires_ms:
            return [RuleOutcome("grant.expired", False, f"grant {gid} has expired")]
        cache_key = None if signed is None else hashlib.sha256(
            b"".join((tenant_key, signed[1], signed[0]))).digest()
        doc = self._verified_grants.get(cache_key)
        if doc is None:
            try:
                if signed is None:
                    raise InvalidGrantSignature("no signed document")
                doc = verify_grant(signed[0], signed[1], tenant_key)
            except (InvalidGrantSignature, ValueError):
                return [RuleOutcome("grant.signature", False,
                                    f"grant {gid} is not signed by the tenant's key")]
            self._verified_grants.put(cache_key, doc)
        # every field of the row, the id included: a row copied under another grant_id (which
        # would get a lease room and a revocation of its own) is not the grant the tenant signed
        stored = (doc.grant_id, doc.tenant_id, doc.dataset_id, doc.job_id, doc.policy_digest,
                  doc.max_nodes, doc.expires_unix_ms)
        if stored != (grant.grant_id, grant.tenant_id, grant.dataset_id, grant.job_id,
                      grant.policy_digest, grant.max_nodes, grant.expires_ms):
            return [RuleOutcome("grant.signature", False,
                                f"grant {gid}'s stored fields differ from the signed document")]
        return []

    # --------------------------------------------------------------- renew
    @audited_refusals("renew")
    def renew(self, *, node_id: str, lease_id: str, token: bytes) -> int:
        check_id("node", node_id)
        check_id("lease", lease_id)
        actor, subject = f"node:{node_id}", f"lease:{lease_id}"
        claims = self._verify_token(token, node_id, actor)
        self._live_node(node_id, actor, "renew", subject)
        lease = self.d.repo.get_lease(lease_id)
        if lease is None or lease.node_id != node_id:
            raise NotFound("unknown lease id for this node")
        now = self.d.clock.now_ms()
        if lease.revoked:
            raise self.d.deny("renew", actor=actor, subject=subject,
                              reason="lease.revoked: the lease was revoked")
        if now >= lease.expires_ms:
            raise self.d.deny("renew", actor=actor, subject=subject,
                              reason="lease.expired: the lease expired; release again")
        grant = self.d.repo.get_grant(lease.tenant_id, lease.grant_id)
        tenant = self.d.repo.get_tenant(lease.tenant_id)
        if grant is None or tenant is None or tenant.status != "active":
            raise self.d.deny("renew", actor=actor, subject=subject,
                              reason="grant.missing: the lease's grant or tenant is gone")
        if grant.job_id != claims.job_id:
            raise self.d.deny("renew", actor=actor, subject=subject,
                              reason="grant.job: the token is for another job")
        self.d.require_bound(tenant, event="renew", actor=actor, subject=subject)
        failed = self._grant_problems(grant, tenant.signing_public_key, now)
        if not failed:
            stored = self.d.repo.get_session_claims(claims.session_id)
            if stored is None or hashlib.sha256(stored).hexdigest() != claims.claims_digest:
                raise self.d.deny("renew", actor=actor, subject=subject,
                                  reason="claims.digest: stored claims do not match the token")
            failed = [
                r for r in self._decide(lease.tenant_id, grant.policy_digest,
                                        claims.claims_digest, lambda: json.loads(stored))
                if not r.passed
            ]
        if failed:
            raise self.d.deny("renew", actor=actor, subject=subject,
                              reason=f"{failed[0].name}: {failed[0].reason}", rules=tuple(failed))
        expires = min(now + self.d.settings.lease_ttl_ms, grant.expires_ms)
        with self.d.unit_of_work():  # the extension and its record commit together
            self.d.audit.append("renew", actor=actor, subject=subject, outcome="allowed",
                                reason=f"grant {grant.grant_id}")
            self.d.repo.extend_lease(lease_id, expires)
        return expires
