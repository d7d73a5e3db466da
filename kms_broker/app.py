"""Composition root for ``kms-broker serve``: build every concrete piece from a config."""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

from kms_broker.audit import (
    Anchor,
    AuditLog,
    AuditTruncated,
    Checkpointer,
    anchor_message,
    check_anchor,
    read_anchor_file,
    verify_log,
    write_anchor_file,
)
from kms_broker.config import BrokerConfig, ConfigError, read_secret_file
from kms_broker.domain.admin import Admin
from kms_broker.domain.clock import SystemClock, SystemRandom
from kms_broker.domain.deps import BrokerDeps, Settings
from kms_broker.domain.enrolment import NodeEnrolment
from kms_broker.domain.janitor import Janitor
from kms_broker.domain.node_flow import NodeFlow
from kms_broker.domain.revocations import RevocationRelay
from kms_broker.metrics import BrokerMetrics, TimedHsm
from kms_broker.server import BrokerServer, TlsMaterial
from kms_broker.state.sqlite import SqliteRepository
from sealed.secrets import SecretBuffer

__all__ = ["FAKE_HSM_REFUSED", "build_server", "load_ek_trust", "load_plugin", "open_hsm",
           "open_repository"]

log = logging.getLogger("kms_broker")


def load_plugin(spec: str) -> Any:
    """``"package.module:factory"`` -> ``factory()``."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise ConfigError(f"plugin {spec!r} must be 'module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load plugin {spec!r}: {exc}") from None
    return factory()


FAKE_HSM_REFUSED = (
    "hsm.backend: fake is an in-process stand-in, not a custody boundary: the tenant KEKs and "
    "every share would live in this process's memory and be lost when it stops. Use hsm.backend: "
    "pkcs11 (SoftHSM2 or a real HSM); for a throwaway development broker only, pass "
    "--dev-insecure-fake-hsm")


def open_hsm(config: BrokerConfig, *, allow_fake: bool = False) -> Any:
    """The configured HSM. ``allow_fake`` (``serve --dev-insecure-fake-hsm``) is the only way
    to get the in-process fake; without it a ``fake`` backend is a :class:`ConfigError`."""
    if config.hsm.backend == "fake":
        if not allow_fake:
            raise ConfigError(FAKE_HSM_REFUSED)
        from kms_broker.hsm.fake import FakeHsm

        log.warning("--dev-insecure-fake-hsm: using the in-process FakeHsm, NOT a custody "
                    "boundary; never for real data")
        return FakeHsm()
    from kms_broker.hsm.pkcs11_hsm import Pkcs11Hsm

    if config.hsm.softhsm_conf is not None:
        os.environ["SOFTHSM2_CONF"] = str(config.hsm.softhsm_conf)  # a path, not a secret
    assert config.hsm.pin_file is not None
    raw = read_secret_file(config.hsm.pin_file)
    try:
        pin = SecretBuffer.from_bytes(raw)
    finally:
        raw[:] = bytes(len(raw))
    with pin:
        return Pkcs11Hsm(config.hsm.module, config.hsm.token_label, pin)


def _verifiers(config: BrokerConfig) -> dict[str, Any]:
    if config.verifiers == "default":
        from attest.policy import default_verifiers

        return dict(default_verifiers())
    table = {}
    for spec in config.verifiers:
        verifier = load_plugin(spec)
        table[verifier.kind] = verifier
    return table


def load_ek_trust(config: BrokerConfig) -> Any:
    """The manufacturer CAs for EK certificates (``ek_roots``/``ek_intermediates``), or None."""
    from attest.tpm2.enrolment import EkTrustStore

    if not config.ek_roots:
        if config.ek_intermediates:
            raise ConfigError("ek_intermediates needs ek_roots")
        log.warning("no ek_roots configured: TPM node enrolment will be refused")
        return None

    def read(paths: tuple[Path, ...], key: str) -> list[bytes]:
        out = []
        for p in paths:
            try:
                out.append(p.read_bytes())
            except OSError as exc:
                raise ConfigError(f"{key}: cannot read {p}: {exc.strerror}") from None
        return out

    try:
        return EkTrustStore.from_pem(read(config.ek_roots, "ek_roots"),
                                     read(config.ek_intermediates, "ek_intermediates"))
    except ValueError as exc:
        raise ConfigError(f"ek_roots/ek_intermediates: not PEM certificates: {exc}") from None


ANCHOR_FILE = "audit.anchor"


def audit_anchor_writer(hsm: Any, path: Path) -> Any:
    """Store an audit anchor: on the HSM token first (authoritative), then signed beside the
    log for offline verification (see :mod:`kms_broker.audit`)."""

    def store(seq: int, head: str) -> None:
        hsm.set_audit_anchor(seq, bytes.fromhex(head))
        write_anchor_file(path, Anchor(seq, head, hsm.sign(anchor_message(seq, head))))

    return store


def check_audit_anchor(log_path: Path, hsm: Any, anchor_path: Path) -> None:
    """Refuse to start (``AuditTruncated``) on a log that lost anchored records.

    The HSM's anchor is checked, and the signed file's too when it verifies under the broker's
    key (an anchor file that does not is refused as well). A token without an anchor (first
    start, or a log from before anchoring) adopts the log's current head after checking the
    chain."""
    if not log_path.exists():
        return
    held = hsm.audit_anchor()
    anchors = [] if held is None else [("the HSM anchor", Anchor(held[0], held[1].hex()))]
    try:
        in_file = read_anchor_file(anchor_path)
    except ValueError as exc:
        raise AuditTruncated(f"refusing to start: {exc}") from None
    if in_file is not None:
        result = verify_log(log_path, hsm.signing_public_key(), in_file)
        if not result.ok and result.problem.startswith("the anchor"):
            raise AuditTruncated(f"refusing to start: {anchor_path}: {result.problem}")
        anchors.append((f"the anchor file {anchor_path}", in_file))
    for where, anchor in anchors:
        problem = check_anchor(log_path, anchor)
        if problem is not None:
            raise AuditTruncated(
                f"refusing to start: audit log {log_path} does not match {where} "
                f"(record {anchor.seq}): {problem}"
            )
    if held is None:
        result = verify_log(log_path)
        if not result.ok:
            raise AuditTruncated(f"refusing to start: audit log {log_path}: {result.problem}")
        if result.records:
            log.warning("audit log has no anchor on the HSM yet: anchoring its %d records",
                        result.records)


def open_repository(config: BrokerConfig) -> Any:
    """The configured state store: SQLite in ``state_dir`` or PostgreSQL (``state:`` URL)."""
    if config.state == "sqlite":
        return SqliteRepository(Path(config.state_dir) / "broker.db")
    from kms_broker.state.postgres import PostgresRepository, safe_dsn

    log.info("broker state on PostgreSQL at %s", safe_dsn(config.state))
    return PostgresRepository(config.state)


def open_pg_audit(repo: Any, hsm: Any, now_ms: Any) -> Any:
    """The audit log in the PostgreSQL state database (:mod:`kms_broker.audit_pg`), checked
    against the HSM's anchor: a log that lost anchored records refuses to start."""
    from kms_broker.audit_pg import PgAuditLog

    audit = PgAuditLog(repo.transactions, now_ms=now_ms, sign=hsm.sign,
                       anchor=lambda seq, head: hsm.set_audit_anchor(seq, bytes.fromhex(head)))
    held = hsm.audit_anchor()
    if held is not None:
        problem = check_anchor(audit.path, Anchor(held[0], held[1].hex()))
        if problem is not None:
            raise AuditTruncated(f"refusing to start: the audit log in PostgreSQL does not "
                                 f"match the HSM anchor (record {held[0]}): {problem}")
    return audit


def build_server(config: BrokerConfig, *, hsm: Any = None, worker: int | None = None,
                 allow_fake_hsm: bool = False) -> BrokerServer:
    """Everything ``serve`` runs. ``worker``: this process is worker N of several sharing the
    port and state (:mod:`kms_broker.workers`): listen with SO_REUSEPORT and leave the metrics
    endpoint to the supervisor. ``allow_fake_hsm``: see :func:`open_hsm`."""
    from attest.policy import Policy

    state = Path(config.state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    metrics = BrokerMetrics()
    hsm = TimedHsm(hsm if hsm is not None else open_hsm(config, allow_fake=allow_fake_hsm),
                   metrics)
    clock = SystemClock()
    ttl = config.ttl_ms
    settings = Settings(
        broker_id=config.broker_id,
        session_ttl_ms=ttl.get("session", 30_000),
        token_ttl_ms=ttl.get("token", 60_000),
        lease_ttl_ms=ttl.get("lease", 300_000),
        upload_ttl_ms=ttl.get("upload", 600_000),
        enrolment_ttl_ms=ttl.get("enrolment", 120_000),
        max_pending_sessions_per_node=config.limits.pending_sessions_per_node,
        max_pending_uploads_per_tenant=config.limits.pending_uploads_per_tenant,
    )
    repo = open_repository(config)
    if config.state == "sqlite":
        anchor_path = state / ANCHOR_FILE
        check_audit_anchor(state / "audit.log", hsm, anchor_path)
        audit = AuditLog(state / "audit.log", now_ms=clock.now_ms, sign=hsm.sign,
                         anchor=audit_anchor_writer(hsm, anchor_path))
    else:  # replicas share the state database: the audit chain lives there too
        audit = open_pg_audit(repo, hsm, clock.now_ms)
    deps = BrokerDeps(
        repo=repo,
        hsm=hsm,
        audit=audit,
        clock=clock,
        random=SystemRandom(),
        verifiers=_verifiers(config),
        load_policy=Policy.from_yaml,
        settings=settings,
        reference_values=config.reference_values,
        # PostgreSQL: an action's state change and its audit record commit together
        **({"unit_of_work": repo.unit_of_work} if config.state != "sqlite" else {}),
    )
    tls = TlsMaterial(ca_pem=config.ca.read_bytes(), cert_pem=config.cert.read_bytes(),
                      key_pem=config.key.read_bytes())
    server = BrokerServer(
        flow=NodeFlow(deps),
        admin=Admin(deps, trusted_tenant_keys=config.trusted_tenant_keys),
        tls=tls,
        address=config.listen,
        metrics=metrics,
        enrolment=NodeEnrolment(deps, load_ek_trust(config)),
        worker=worker,
        limits=config.limits,
    )
    if config.metrics_port is not None and worker is None:
        metrics.serve(config.metrics_port)

    checkpoints = Checkpointer(
        audit, config.audit_checkpoint_s,
        on_error=lambda exc: log.error("audit checkpoint/anchor failed: %s", exc),
    )

    def seal_the_log() -> None:  # a signed checkpoint over the last record, anchored
        checkpoints.stop()
        try:
            deps.audit.checkpoint()  # then anchored (AuditLog.seal)
        except Exception as exc:  # the HSM or disk may be what is failing
            log.warning("no shutdown checkpoint: %s", exc)

    server.on_stop.append(seal_the_log)
    try:
        audit.seal()  # anchors an existing log at once (first start after an upgrade)
    except Exception as exc:  # the HSM or disk may be down: the ticker tries again
        log.warning("audit checkpoint/anchor at start failed: %s", exc)
    checkpoints.start()
    # revocations reach WatchRevocations streams held by other worker processes
    relay = RevocationRelay(deps.revocations, deps.repo,
                            origin=f"{os.getpid()}/{os.urandom(4).hex()}", now_ms=clock.now_ms)
    relay.start()
    server.on_stop.insert(0, relay.stop)
    janitor = Janitor(repo=deps.repo, hsm=hsm, clock=clock, settings=settings)
    janitor.start(config.janitor_interval_ms / 1000)
    server.on_stop.insert(0, janitor.stop)
    return server
