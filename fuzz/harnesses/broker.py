"""Protobuf requests through the broker's real request path, with a structure-aware mutator.

``broker_requests`` feeds every unary method of NodeService, TenantService and
OperatorService (and the first message of WatchRevocations) through what ``kms-broker serve``
runs after the TLS handshake: the real :class:`~kms_broker.interceptors.AuthInterceptor`
(its lenient request decoder, the identity check against the peer certificate, the bound
identity), the real servicers, the domain (:class:`NodeFlow`, :class:`Admin`,
:class:`NodeEnrolment`) with the default verifiers, SQLite state and the audit log. Only the
transport is left out (a servicer context object stands in for gRPC's) and the HSM is the
package's in-process :class:`FakeHsm`, so each input takes milliseconds, not a round trip.

Input: byte 0 picks the method (modulo the method count), the rest is the request as
serialized protobuf. The peer certificate names ``node:n1``, ``tenant:acme`` or
``operator:ops`` by service, so requests that name those ids reach the domain. A string field
``"@session"`` is replaced by a fresh session id from a Challenge, so Attest gets past the
session lookup.

Property: every call ends OK, or aborts with a status from the error table
(``kms_broker.errors.STATUS_TABLE``), never INTERNAL or UNKNOWN (an exception escaping the
servicer); afterwards the broker still answers a valid ListDatasets. A finding raises
:class:`~fuzz.base.PropertyViolation` (a status) or the escaping exception itself.

The mutator (:func:`mutate`) parses the input as the method's request message, then changes
one field with the message descriptor's knowledge: a string to an identifier seen in the
world or a mutated one, bytes through libFuzzer's mutator (or to real evidence), an integer
to a boundary value, a repeated field grown or cut, a nested message recursed into; or it
switches the method, keeping the bytes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fuzz.base import Harness, PropertyViolation

__all__ = ["HARNESSES", "mutate"]

_SERVICES = ("NodeService", "TenantService", "OperatorService")
_IDENTITY = {"NodeService": ("node", "n1"), "TenantService": ("tenant", "acme"),
             "OperatorService": ("operator", "ops")}
# ShredTenant's one field must name the caller: fuzzing it would only erase the world the
# other methods reach (tests/kms_broker cover shredding)
_NOT_FUZZED = ("ShredTenant",)
_STRINGS = ("", "n1", "n2", "acme", "other", "ds1", "j", "g1", "ops", "@session", "dev-swtpm",
            "tpm2", "sev-snp", "tdx", "nvidia-gpu", "composite", "test-json", "a" * 200,
            "\u00e9\u4e2d", "../x", "n1\x00", "0" * 64)
_INTS = (0, 1, 2, -1, 7, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, -(2**63), 2**64 - 1)


class _Aborted(Exception):
    def __init__(self, code: Any, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


class _Context:
    """What the servicers and the interceptor use of ``grpc.ServicerContext``; one per call,
    as gRPC's (the interceptor's request log reads the code, details and trailers back)."""

    def __init__(self, cert_pem: bytes) -> None:
        self._auth = {"x509_pem_cert": [cert_pem]}
        self._code: Any = None
        self._details = ""
        self._trailers: Any = ()

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def abort(self, code: Any, details: str) -> None:
        self._code, self._details = code, details
        raise _Aborted(code, details)

    def code(self) -> Any:
        return self._code

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._trailers = metadata

    def trailing_metadata(self) -> Any:
        return self._trailers

    def invocation_metadata(self) -> tuple:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"

    def is_active(self) -> bool:
        return False  # a WatchRevocations stream ends after its "subscribed" event

    def time_remaining(self) -> float:
        return 30.0

    def add_callback(self, callback: Any) -> bool:
        return True


def _certificate(role: str, ident: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{role}:{ident}")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"urn:kmsbroker:{role}:{ident}")]),
                critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


class _Broker:
    """One broker, built once per process: the servicers behind the interceptor."""

    def __init__(self) -> None:
        import grpc
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from attest.policy import Policy, default_verifiers
        from fuzz.harnesses.tpm2 import KEYLIME_AK
        from kms_broker import sealing
        from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb
        from kms_broker._proto.kmsbroker.v1 import broker_pb2_grpc as pb_grpc
        from kms_broker.audit import AuditLog
        from kms_broker.domain.admin import Admin
        from kms_broker.domain.clock import SystemClock, SystemRandom
        from kms_broker.domain.deps import BrokerDeps, Settings
        from kms_broker.domain.enrolment import NodeEnrolment
        from kms_broker.domain.model import Node
        from kms_broker.domain.node_flow import NodeFlow
        from kms_broker.errors import STATUS_TABLE
        from kms_broker.grants import GrantDocument, sign_grant
        from kms_broker.hsm.fake import FakeHsm
        from kms_broker.interceptors import AuthInterceptor
        from kms_broker.metrics import BrokerMetrics
        from kms_broker.servicers import NodeServicer, OperatorServicer, TenantServicer
        from kms_broker.state.sqlite import SqliteRepository
        from sealed.secrets import SecretBuffer

        self.pb = pb
        self.allowed = {code.value[0] for code in STATUS_TABLE.values()} | {0}
        self.internal = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
        self.dir = Path(tempfile.mkdtemp(prefix="fuzz-broker-"))
        clock, hsm = SystemClock(), FakeHsm()
        deps = BrokerDeps(
            repo=SqliteRepository(self.dir / "broker.db"), hsm=hsm,
            audit=AuditLog(self.dir / "audit.log", now_ms=clock.now_ms, sign=hsm.sign),
            clock=clock, random=SystemRandom(), verifiers=default_verifiers(),
            load_policy=Policy.from_yaml,
            settings=Settings(max_pending_sessions_per_node=1 << 20,
                              max_pending_uploads_per_tenant=1 << 20))
        admin, flow = Admin(deps), NodeFlow(deps)
        self.flow = flow
        # the world a request can name: tenant acme with dataset ds1, a policy and a grant
        # for job j; node n1 enrolled with keylime's AK (a real TPM AK from the vectors)
        tenant_key = Ed25519PrivateKey.generate()
        admin.register_tenant("acme", tenant_key.public_key().public_bytes_raw())
        # no request can name tenant "live" (the certificate says acme): it shows the broker
        # still serves after each input
        admin.register_tenant("live", Ed25519PrivateKey.generate().public_key()
                              .public_bytes_raw())
        up = admin.open_upload(tenant_id="acme", dataset_id="ds1", key_version=1,
                               share_index=0, share_count=1)
        with SecretBuffer.random(32) as share:
            admin.commit_share(tenant_id="acme", upload_id=up.upload_id,
                               sealed_share=sealing.seal_share_to(up.import_public_key, share,
                                                                  up.transcript))
        admin.register_dataset(tenant_id="acme", dataset_id="ds1", key_version=1,
                               manifest_name="m", store_uri="", holders=())
        policy = (Path(__file__).resolve().parents[2] / "policies" / "dev-swtpm.yaml")
        digest = admin.put_policy(tenant_id="acme", text=policy.read_text())
        doc, sig = sign_grant(GrantDocument(
            grant_id="g1", tenant_id="acme", dataset_id="ds1", job_id="j",
            policy_digest=digest, max_nodes=4,
            expires_unix_ms=clock.now_ms() + 30 * 86_400_000), tenant_key)
        admin.create_grant(tenant_id="acme", document=doc, signature=sig)
        deps.repo.put_node(Node(node_id="n1", tenant_scope="", ak_public=KEYLIME_AK,
                                ek_certificate=b"", enrolled_ms=clock.now_ms(),
                                binding_sig=deps.sign_node("n1", "", KEYLIME_AK, b"")))

        servicers = {
            "NodeService": (NodeServicer(flow, BrokerMetrics()),
                            pb_grpc.add_NodeServiceServicer_to_server),
            "TenantService": (TenantServicer(admin, BrokerMetrics()),
                              pb_grpc.add_TenantServiceServicer_to_server),
            "OperatorService": (OperatorServicer(admin, NodeEnrolment(deps, None),
                                                 BrokerMetrics()),
                                pb_grpc.add_OperatorServiceServicer_to_server),
        }
        interceptor = AuthInterceptor()
        self.methods: list[tuple[str, Any, Any, bytes]] = []  # (path, handler, type, cert)
        for service in _SERVICES:
            servicer, add = servicers[service]
            capture = _Capture()
            add(servicer, capture)
            full = f"kmsbroker.v1.{service}"
            desc = pb.DESCRIPTOR.services_by_name[service]
            cert = _certificate(*_IDENTITY[service])
            for method in desc.methods:
                if method.name in _NOT_FUZZED:
                    continue
                path = f"/{full}/{method.name}"
                details = _Details(path)

                handler = interceptor.intercept_service(capture.lookup, details)
                cls = getattr(pb, method.input_type.name)
                self.methods.append((path, handler, cls, cert))
        _, handler, cls, _ = next(m for m in self.methods if m[0].endswith("/ListDatasets"))
        self._live = (handler, cls(tenant_id="live"), _certificate("tenant", "live"))

    def call(self, index: int, payload: bytes) -> None:
        from kms_broker.domain.errors import BrokerError

        path, handler, _, cert = self.methods[index % len(self.methods)]
        request = handler.request_deserializer(payload)
        if isinstance(request, self.pb.AttestRequest) and request.session_id == "@session":
            with contextlib.suppress(BrokerError):  # n1 may be revoked by now: no session
                request.session_id = self.flow.challenge(node_id="n1", job_id="j").session_id
        code = self._invoke(handler, request, cert)
        if code is not None and (code.value[0] not in self.allowed or code in self.internal):
            raise PropertyViolation(f"{path} ended {code.name}, not a status of the error table")
        # the broker keeps serving: a valid call right after succeeds
        after = self._invoke(*self._live)
        if after is not None:
            raise PropertyViolation(f"after {path}, a valid ListDatasets ended {after.name}")

    @staticmethod
    def _invoke(handler: Any, request: Any, cert: bytes) -> Any:
        ctx = _Context(cert)
        try:
            if handler.unary_unary is not None:
                handler.response_serializer(handler.unary_unary(request, ctx))
            else:
                for response in handler.unary_stream(request, ctx):
                    handler.response_serializer(response)
        except _Aborted as exc:
            return exc.code
        return None


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


class _Capture:
    """Collects the method handlers that the generated ``add_*_to_server`` registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}
        self.generic: list[Any] = []

    def add_generic_rpc_handlers(self, generic: Any) -> None:
        self.generic.extend(generic)

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        for name, handler in handlers.items():
            self.handlers[f"/{service}/{name}"] = handler

    def lookup(self, details: Any) -> Any:
        if details.method in self.handlers:
            return self.handlers[details.method]
        for g in self.generic:
            handler = g.service(details)
            if handler is not None:
                return handler
        return None


_BROKER: list[_Broker] = []


def _broker() -> _Broker:
    if not _BROKER:
        _BROKER.append(_Broker())
    return _BROKER[0]


def _run(data: bytes) -> None:
    if data:
        _broker().call(data[0], data[1:])


# --- seeds -----------------------------------------------------------------------------------

def _seeds() -> Iterator[tuple[str, bytes]]:
    from fuzz.harnesses.tpm2 import _evidence_seeds
    from kms_broker import sealing
    from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb

    b = _broker()
    names = [m[0].rsplit("/", 1)[1] for m in b.methods]
    evidence = dict(_evidence_seeds())["keylime"]
    _, pub = sealing.generate_node_key()
    examples: dict[str, Any] = {
        "Challenge": pb.ChallengeRequest(node_id="n1", job_id="j"),
        "Attest": pb.AttestRequest(node_id="n1", session_id="@session",
                                   evidence=pb.Evidence(kind="tpm2", payload=evidence),
                                   node_public_key=pub, report_data_set=[bytes(32)]),
        "Release": pb.ReleaseRequest(node_id="n1", token=b"\x00\x10" + b"x" * 80,
                                     tenant_id="acme", dataset_id="ds1", key_version=1),
        "RenewLease": pb.RenewLeaseRequest(node_id="n1", lease_id="l", token=b"t"),
        "WatchRevocations": pb.WatchRevocationsRequest(node_id="n1"),
        "RegisterTenant": pb.RegisterTenantRequest(tenant_id="acme", signing_public_key=b"k" * 32),
        "OpenUpload": pb.OpenUploadRequest(tenant_id="acme", dataset_id="ds2", key_version=1,
                                           share_index=0, share_count=1),
        "CommitShare": pb.CommitShareRequest(tenant_id="acme", upload_id="u",
                                             sealed_share=b"s" * 120),
        "RegisterDataset": pb.RegisterDatasetRequest(tenant_id="acme", dataset_id="ds1",
                                                     key_version=1, manifest_name="m"),
        "ListDatasets": pb.ListDatasetsRequest(tenant_id="acme"),
        "DeleteDataset": pb.DeleteDatasetRequest(tenant_id="acme", dataset_id="nope"),
        "PutPolicy": pb.PutPolicyRequest(tenant_id="acme", policy_yaml="name: p\nversion: 1\n"
                                         "rules:\n  - name: r\n    expr: 'true'\n"),
        "CreateGrant": pb.CreateGrantRequest(tenant_id="acme", grant=b"{}",
                                             signature=b"s" * 64),
        "RevokeGrant": pb.RevokeGrantRequest(tenant_id="acme", grant_id="nope"),
        "RotateKek": pb.RotateKekRequest(tenant_id="acme"),
        "TailAudit": pb.TailAuditRequest(tenant_id="acme", limit=3),
        "VerifyAudit": pb.VerifyAuditRequest(tenant_id="acme"),
        "BeginEnrolNode": pb.BeginEnrolNodeRequest(node_id="n2", ak_public=b"a", ek_public=b"e"),
        "CompleteEnrolNode": pb.CompleteEnrolNodeRequest(enrolment_id="e",
                                                         activated_secret=b"x" * 32),
        "RevokeNode": pb.RevokeNodeRequest(node_id="n9"),
        "ReinstateNode": pb.ReinstateNodeRequest(node_id="n9"),
    }
    for i, name in enumerate(names):
        msg = examples.get(name)
        if msg is None:
            continue
        yield name, bytes([i]) + _serialize(msg)
        if name == "Attest":  # the releasing Attest (AttestRequest.release) too
            releasing = pb.AttestRequest()
            releasing.CopyFrom(msg)
            releasing.release.CopyFrom(pb.ReleaseTarget(tenant_id="acme", dataset_id="ds1",
                                                        key_version=1))
            yield "AttestRelease", bytes([i]) + _serialize(releasing)


def _serialize(msg: Any) -> bytes:
    """A request's bytes; fields the seed set that the message lacks are left out."""
    return msg.SerializeToString()


# --- the structure-aware mutator -------------------------------------------------------------

def _mutate_message(msg: Any, rng: random.Random, depth: int = 0) -> None:
    from google.protobuf.descriptor import FieldDescriptor as F

    fields = msg.DESCRIPTOR.fields
    if not fields:
        return
    f = rng.choice(fields)
    repeated = f.label == F.LABEL_REPEATED if hasattr(f, "label") else f.is_repeated
    if repeated:
        values = getattr(msg, f.name)
        if f.type == F.TYPE_MESSAGE:
            if values and rng.random() < 0.5 and depth < 3:
                _mutate_message(rng.choice(values), rng, depth + 1)
            elif rng.random() < 0.5 and values:
                del values[-1]
            else:
                values.add()
        elif values and rng.random() < 0.4:
            del values[rng.randrange(len(values))]
        else:
            values.append(_scalar(f, None, rng))
        return
    if f.type == F.TYPE_MESSAGE:
        if depth < 3:
            _mutate_message(getattr(msg, f.name), rng, depth + 1)
        return
    if rng.random() < 0.1:
        msg.ClearField(f.name)
        return
    setattr(msg, f.name, _scalar(f, getattr(msg, f.name), rng))


def _scalar(f: Any, current: Any, rng: random.Random) -> Any:
    import atheris
    from google.protobuf.descriptor import FieldDescriptor as F

    if f.type == F.TYPE_STRING:
        if current is None or rng.random() < 0.6:
            return rng.choice(_STRINGS)
        raw = atheris.Mutate(current.encode(), max(8, 2 * len(current) + 8))
        return raw.decode("utf-8", "replace")
    if f.type == F.TYPE_BYTES:
        base = current or b""
        if rng.random() < 0.15:
            return bytes(rng.choice((0, 32, 33, 64, 65, 1 << 10, 1 << 16)))
        return atheris.Mutate(base, max(16, 2 * len(base) + 16))
    if f.type == F.TYPE_BOOL:
        return not current
    if f.type == F.TYPE_ENUM:
        return rng.choice([v.number for v in f.enum_type.values])
    bits = {F.TYPE_INT32: 32, F.TYPE_SINT32: 32, F.TYPE_SFIXED32: 32, F.TYPE_UINT32: 32,
            F.TYPE_FIXED32: 32}.get(f.type, 64)
    signed = f.type in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32, F.TYPE_INT64,
                        F.TYPE_SINT64, F.TYPE_SFIXED64)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if f.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return rng.choice((0.0, -1.0, 1e308, float("inf"), float("nan")))
    value = rng.choice(_INTS) if rng.random() < 0.7 else (current or 0) + rng.randint(-3, 3)
    return min(max(value, lo), hi)


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    """libFuzzer custom mutator: one structured change to a request (see the module doc)."""
    import atheris

    rng = random.Random(seed)
    b = _broker()
    if not data or rng.random() < 0.05:
        return bytes([rng.randrange(len(b.methods))]) + data[1:]
    index = data[0] % len(b.methods)
    cls = b.methods[index][2]
    msg = cls()
    try:
        msg.ParseFromString(data[1:])
    except Exception:  # not a message (a byte-level mutant): mutate the bytes instead
        return data[:1] + atheris.Mutate(data[1:], max(1, max_size - 1))
    if rng.random() < 0.1:  # byte-level now and then: malformed protobuf reaches the decoder
        return data[:1] + atheris.Mutate(data[1:], max(1, max_size - 1))
    for _ in range(rng.randint(1, 3)):
        _mutate_message(msg, rng)
    out = data[:1] + msg.SerializeToString()
    return out[:max_size]


def _harnesses() -> list[Harness]:
    return [Harness("broker_requests", "kms_broker servicers behind AuthInterceptor (every "
                    "unary method, WatchRevocations' first message)", _run, (), _seeds,
                    max_len=65536, mutator=mutate)]


HARNESSES = _harnesses
