"""``kms-broker``: the broker's command line and composition root.

    kms-broker hsm init --state-dir DIR --label broker --so-pin-file F --pin-file F
    kms-broker certs ca|issue ...                  (dev CA and certificates)
    kms-broker serve --config broker.yaml [--workers N] [--dev-insecure-fake-hsm]
    kms-broker tenant init --key tenant.key
    kms-broker tenant register|shred  --tenant ID --tenant-key F --broker ADDR --tls DIR
    kms-broker dataset upload PATH --store DIR --dataset ID --broker ADDR [--broker ADDR ...]
    kms-broker dataset list|rotate|delete ...
    kms-broker policy put POLICY.yaml ...
    kms-broker policy test POLICY.yaml EVIDENCE --kind K --report-data HEX   (offline)
    kms-broker grant create|revoke ...
    kms-broker node enrol NODE --tcti TCTI ...     (on the node, operator certificate)
    kms-broker node revoke|reinstate ...           (operator certificate)
    kms-broker audit verify|tail --state-dir DIR   (offline) or --broker ADDR (online)
    kms-broker audit public-key --config broker.yaml   (PEM, for verify --public-key)

Client TLS material comes from ``--tls DIR`` (ca.pem, <name>.pem, <name>.key) or from
``--ca/--cert/--key``. Exit codes: 0 ok, 1 failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["main"]


class CliError(Exception):
    """A failure to report on one line and exit 1."""


def _tls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", action="append", required=True, metavar="HOST:PORT",
                   help="broker address (repeat for several brokers, in share order)")
    p.add_argument("--ca", type=Path, help="CA certificate (PEM)")
    p.add_argument("--cert", type=Path, help="client certificate (PEM)")
    p.add_argument("--key", type=Path, help="client private key (PEM)")
    p.add_argument("--server-name", help="TLS name the broker certificate carries")


def _tenant_args(p: argparse.ArgumentParser, *, key: bool = True) -> None:
    _tls_args(p)
    p.add_argument("--tenant", required=True, help="tenant id")
    if key:
        p.add_argument("--tenant-key", type=Path, required=True,
                       help="tenant Ed25519 key file (0600, from `tenant init`)")


def _endpoints(args: argparse.Namespace) -> list[Any]:
    from kms_broker.rpc import BrokerEndpoint

    if not (args.ca and args.cert and args.key):
        raise CliError("--ca, --cert and --key are required to reach a broker")
    return [BrokerEndpoint.from_files(a, ca=args.ca, cert=args.cert, key=args.key,
                                      server_name=args.server_name) for a in args.broker]


def _tenant_clients(args: argparse.Namespace) -> list[Any]:
    from kms_broker.tenant import TenantClient, load_tenant_key

    key = load_tenant_key(args.tenant_key) if getattr(args, "tenant_key", None) else None
    return [TenantClient(e, tenant_id=args.tenant, signing_key=key) for e in _endpoints(args)]


# ------------------------------------------------------------------ commands
def cmd_serve(args: argparse.Namespace) -> int:
    from kms_broker.app import build_server

    return serve(args, build=build_server, entry_module="kms_broker.cli")


def serve(args: argparse.Namespace, *, build: Callable[..., Any], entry_module: str) -> int:
    """``serve`` with a composition: ``build(config, worker=, allow_fake_hsm=)`` makes the
    server; worker processes run ``python -m ENTRY_MODULE serve ...``. ``kms-broker serve``
    passes the production composition (:func:`kms_broker.app.build_server`); only the test
    composition (tests/kms_broker/testing_server.py) passes another."""
    import dataclasses

    from kms_broker import logs
    from kms_broker.config import load_config

    worker = args.worker
    logs.setup(level=args.log_level, fmt=args.log_format,
               prefix="" if worker is None else f"worker-{worker}")
    os.environ["KMS_BROKER_LOG_LEVEL"] = args.log_level  # the workers log alike
    os.environ["KMS_BROKER_LOG_FORMAT"] = args.log_format
    log = logging.getLogger("kms_broker")
    config = load_config(args.config)
    if args.listen:
        config = dataclasses.replace(config, listen=args.listen)
    count = args.workers if args.workers is not None else config.workers
    if not 1 <= count <= 64:
        raise CliError("--workers must be from 1 to 64")
    if count > 1 and config.hsm.backend != "pkcs11":
        raise CliError("--workers above 1 needs hsm.backend pkcs11: the workers share one "
                       "token, and the fake HSM lives inside a single process")
    if config.hsm.backend == "fake" and not args.dev_insecure_fake_hsm:
        from kms_broker.app import FAKE_HSM_REFUSED

        raise CliError(FAKE_HSM_REFUSED)
    host = config.listen.rsplit(":", 1)[0]
    port_file = Path(config.state_dir) / "broker.port"

    def listening(port: int) -> None:
        # whole or absent (write, then rename): a reader polling for the file never sees it
        # empty, however busy the machine
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(f"{port}\n")
        tmp.rename(port_file)
        workers = f" ({count} worker processes)" if count > 1 else ""
        print(f"kms-broker {config.broker_id} listening on {host}:{port}{workers}", flush=True)

    if worker is None and count > 1:
        from kms_broker.workers import supervise

        return supervise(args.config, config, count, on_listening=listening,
                         entry_module=entry_module)
    server = build(config, worker=worker, allow_fake_hsm=args.dev_insecure_fake_hsm)
    server.start()
    if worker is None:
        listening(server.port)
    else:  # tell the supervisor (kms_broker.workers) this worker listens
        from kms_broker.workers import worker_port_file

        path = worker_port_file(config, worker)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{server.port}\n")
        tmp.rename(path)
    log.info("broker %s started on %s:%d", config.broker_id, host, server.port,
             extra=logs.fields(broker_id=config.broker_id, port=server.port, worker=worker,
                               hsm=config.hsm.backend, state_dir=str(config.state_dir)))
    stop = threading.Event()
    received: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda num, _f: (received.append(signal.Signals(num).name),
                                            stop.set()))
    stop.wait()
    log.info("broker %s shutting down (%s)", config.broker_id, ", ".join(received),
             extra=logs.fields(broker_id=config.broker_id, signal=",".join(received)))
    server.stop(grace=2.0)
    log.info("broker %s stopped", config.broker_id, extra=logs.fields(broker_id=config.broker_id))
    return 0


def cmd_hsm_init(args: argparse.Namespace) -> int:
    from kms_broker.config import read_secret_file
    from kms_broker.hsm.softhsm import init_token
    from sealed.secrets import SecretBuffer

    so, user = read_secret_file(args.so_pin_file), read_secret_file(args.pin_file)
    try:
        with SecretBuffer.from_bytes(so) as so_pin, SecretBuffer.from_bytes(user) as user_pin:
            config = init_token(args.state_dir, args.label, so_pin, user_pin)
    finally:
        so[:] = bytes(len(so))
        user[:] = bytes(len(user))
    print(f"token {args.label!r} ready; SOFTHSM2_CONF={config.config_path}")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    try:
        from kms_broker import certs
    except ImportError:
        raise CliError("kms_broker.certs is not installed in this build") from None
    main_fn = getattr(certs, "main", None)
    if main_fn is None:
        raise CliError("kms_broker.certs offers no command line")
    return int(main_fn([args.action, *args.rest]) or 0)


def cmd_tenant_init(args: argparse.Namespace) -> int:
    from kms_broker.tenant import create_tenant_key

    try:
        public = create_tenant_key(args.key)
    except FileExistsError:
        raise CliError(f"{args.key} exists; refusing to overwrite a tenant key") from None
    print(f"tenant key written to {args.key}; public key {public.hex()}")
    return 0


def cmd_tenant_register(args: argparse.Namespace) -> int:
    for client in _tenant_clients(args):
        with client:
            print(f"{client.address}: registered, KEK v{client.register()}")
    return 0


def cmd_tenant_shred(args: argparse.Namespace) -> int:
    if not args.yes:
        raise CliError("shredding destroys every key of this tenant; pass --yes to confirm")
    for client in _tenant_clients(args):
        with client:
            print(f"{client.address}: {client.shred()} key(s) destroyed")
    return 0


def _progress(label: str, unit: str = "B") -> Any:
    from kms_broker.progress import Progress  # rate and ETA; a bar on a terminal

    return Progress(label, unit=unit)


def cmd_dataset_upload(args: argparse.Namespace) -> int:
    from kms_broker.tenant import upload_dataset
    from sealed import LocalDirStore

    if not args.path.exists():
        raise CliError(f"{args.path} does not exist")
    clients = _tenant_clients(args)
    try:
        result = upload_dataset(clients, args.path, LocalDirStore(args.store),
                                dataset_id=args.dataset, key_version=args.key_version,
                                store_uri=str(args.store.resolve()),
                                progress=_progress("encrypting"))
    finally:
        for c in clients:
            c.close()
    print(f"uploaded {result.num_records} records in {result.num_shards} shards; "
          f"manifest {result.manifest_name}; shares at {', '.join(result.holders)}")
    return 0


def cmd_dataset_list(args: argparse.Namespace) -> int:
    for client in _tenant_clients(args):
        with client:
            for d in client.list_datasets():
                print(f"{client.address} {d.dataset_id} status={d.status} "
                      f"versions={list(d.key_versions)} kek=v{d.kek_version} "
                      f"share={d.share_index + 1}/{d.share_count} manifest={d.manifest_name}")
    return 0


def cmd_dataset_rotate(args: argparse.Namespace) -> int:
    clients = _tenant_clients(args)
    progress = _progress("rotating", unit="broker")
    for done, client in enumerate(clients):
        progress(done, len(clients))
        with client:
            version, count = client.rotate_kek()
            print(f"{client.address}: KEK now v{version}, {count} share(s) re-wrapped")
    progress(len(clients), len(clients))
    return 0


def cmd_dataset_delete(args: argparse.Namespace) -> int:
    for client in _tenant_clients(args):
        with client:
            client.delete_dataset(args.dataset)
            print(f"{client.address}: deleted {args.dataset}")
    return 0


def cmd_policy_put(args: argparse.Namespace) -> int:
    text = args.policy.read_text()
    for client in _tenant_clients(args):
        with client:
            print(f"{client.address}: policy {client.put_policy(text)}")
    return 0


def cmd_policy_test(args: argparse.Namespace) -> int:
    """Offline: the same verification and policy decision the broker's Attest would make."""
    from attest.interface import VerificationContext
    from attest.policy import default_verifiers, test_policy_offline
    from kms_broker.app import load_plugin

    verifiers = dict(default_verifiers())
    for spec in args.verifier or ():
        plugin = load_plugin(spec)
        verifiers[plugin.kind] = plugin
    try:
        report_data = bytes.fromhex(args.report_data)
    except ValueError:
        raise CliError("--report-data must be hex") from None
    node = {"ak_public": args.ak.read_bytes()} if args.ak else {}
    context = VerificationContext(expected_report_data=report_data, node=node)
    decision = test_policy_offline(args.policy.read_text(), args.evidence.read_bytes(),
                                   args.kind, context, verifiers=verifiers)
    print(decision.summary())
    return 0 if decision.allowed else 1


def cmd_grant_create(args: argparse.Namespace) -> int:
    import secrets

    from kms_broker.grants import GrantDocument

    grant = GrantDocument(
        grant_id=args.grant_id or f"g-{secrets.token_hex(8)}", tenant_id=args.tenant,
        dataset_id=args.dataset, job_id=args.job, policy_digest=args.policy_digest,
        max_nodes=args.max_nodes, expires_unix_ms=int(time.time() * 1000) + args.ttl * 1000,
    )
    for client in _tenant_clients(args):
        with client:
            print(f"{client.address}: grant {client.create_grant(grant)}")
    return 0


def cmd_grant_revoke(args: argparse.Namespace) -> int:
    for client in _tenant_clients(args):
        with client:
            n = client.revoke_grant(args.grant_id)
            print(f"{client.address}: revoked {args.grant_id}, {n} lease(s) ended")
    return 0


def _operator_stub(endpoint: Any) -> tuple[Any, Any]:
    from kms_broker._proto.kmsbroker.v1 import broker_pb2_grpc as pb_grpc
    from kms_broker.rpc import open_channel

    channel = open_channel(endpoint)
    return channel, pb_grpc.OperatorServiceStub(channel)


def _operator_call(args: argparse.Namespace, method: str, request: Any) -> list[Any]:
    import grpc

    from kms_broker.rpc import error_from_rpc, wait_until_ready

    out = []
    for endpoint in _endpoints(args):
        channel, stub = _operator_stub(endpoint)
        try:
            wait_until_ready(channel, endpoint.address, 30)
            out.append(getattr(stub, method)(request, timeout=30))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, endpoint.address) from None
        finally:
            channel.close()
    return out


def cmd_node_enrol(args: argparse.Namespace) -> int:
    from kms_broker.node_enrol import enrol_node

    endpoints = _endpoints(args)
    try:
        from attest.tpm2.node import TpmError, TpmNode
    except ImportError as exc:
        raise CliError(f"TPM support is not installed (tpm2-pytss): {exc}") from None
    print(f"enrolling node {args.node}: reading EK and AK from the TPM over "
          f"{args.tcti.split(':', 1)[0]}", file=sys.stderr, flush=True)
    try:
        with TpmNode(args.tcti, ek_type=args.ek_type) as tpm:
            done = enrol_node(endpoints, node_id=args.node,
                              tenant_scope=args.tenant_scope or "", tpm=tpm)
    except TpmError as exc:
        raise CliError(f"TPM: {exc}") from None
    for d in done:
        print(f"node {d.node_id} enrolled at {d.broker}: AK {d.ak_name.hex()}, "
              f"EK certificate sha256 {d.ek_certificate_sha256}")
    print(f"node {args.node} enrolled at {len(done)} broker(s)")
    return 0


def cmd_node_revoke(args: argparse.Namespace) -> int:
    from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb

    for r in _operator_call(args, "RevokeNode", pb.RevokeNodeRequest(node_id=args.node)):
        print(f"node {args.node} revoked, {r.leases_revoked} lease(s) ended")
    return 0


def cmd_node_reinstate(args: argparse.Namespace) -> int:
    from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb

    _operator_call(args, "ReinstateNode", pb.ReinstateNodeRequest(node_id=args.node))
    print(f"node {args.node} reinstated at {len(args.broker)} broker(s): it may be enrolled "
          f"again (and is refused until it is)")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from kms_broker.audit import read_anchor_file, tail_log, verify_log

    if args.state_dir is not None:
        log_path = args.state_dir / "audit.log"
        if not log_path.exists():
            raise CliError(f"no audit log at {log_path}")
        if args.action == "verify":
            return _verify_offline(args, log_path, read_anchor_file, verify_log)
        for rec in tail_log(log_path, args.limit):
            print(json.dumps(rec, sort_keys=True))
        return 0
    if not args.broker or not args.tenant:
        raise CliError("give --state-dir, or --broker with --tenant and TLS material")
    bad = 0
    for client in _tenant_clients(args):
        with client:
            if args.action == "verify":
                r = client.verify_audit()
                print(f"{client.address}: " + ("OK: " if r.ok else "TAMPERED: ") + r.problem)
                bad += 0 if r.ok else 1
            else:
                for rec in client.tail_audit(args.limit):
                    print(rec.canonical_json)
    return 1 if bad else 0


def _public_key_arg(text: str) -> bytes:
    """``--public-key``: a PEM file (as ``audit public-key`` writes) or hex SEC1 bytes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(text)
    if path.is_file():
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except ValueError:
            raise CliError(f"{path} is not a PEM public key") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise CliError(f"{path} is not an EC public key")
        return key.public_bytes(serialization.Encoding.X962,
                                serialization.PublicFormat.UncompressedPoint)
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise CliError("--public-key must be a PEM file or hex SEC1 bytes") from None


def _verify_offline(args: argparse.Namespace, log_path: Path, read_anchor: Any,
                    verify: Any) -> int:
    """Exit 0: intact and authentic; 1: tampering found (or, with a key, no signed anchor);
    2: chain intact but authenticity not checked (no key)."""
    key = _public_key_arg(args.public_key) if args.public_key else None
    anchor_path = log_path.with_name("audit.anchor")
    try:
        anchor = read_anchor(anchor_path)
    except ValueError as exc:
        print(f"TAMPERED: {exc}")
        return 1
    result = verify(log_path, key, anchor)
    if not result.ok:
        print("TAMPERED: " + result.problem)
        return 1
    if key is None:
        print("CHAIN INTACT, AUTHENTICITY NOT CHECKED: " + result.problem)
        print("warning: give --public-key (from `kms-broker audit public-key`) to check that "
              "the broker wrote this log", file=sys.stderr)
        return 2
    if anchor is None:
        print(f"TAMPERED: no anchor file at {anchor_path}: records cut from the end of the "
              f"log cannot be ruled out ({result.problem})")
        return 1
    print("OK: " + result.problem)
    return 0


def cmd_audit_public_key(args: argparse.Namespace) -> int:
    """Print the broker's audit (HSM signing) public key as PEM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from kms_broker.app import open_hsm
    from kms_broker.config import load_config

    hsm = open_hsm(load_config(args.config))
    try:
        sec1 = hsm.signing_public_key()
    finally:
        hsm.close()
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), sec1)
    print(key.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo).decode(), end="")
    return 0


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kms-broker", description="Key broker: HSM-backed release of dataset key shares.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the broker")
    p.add_argument("--config", type=Path, required=True, help="broker.yaml")
    p.add_argument("--workers", type=int,
                   help="broker processes sharing the port and state (default: the config's "
                        "'workers', else 1); more than one uses more cores")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # set by the supervisor
    p.add_argument("--listen", help=argparse.SUPPRESS)  # set by the supervisor
    p.add_argument("--dev-insecure-fake-hsm", action="store_true",
                   help="development only: accept hsm.backend: fake (an in-process stand-in "
                        "with no custody boundary; every key is lost at exit)")
    p.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   default=os.environ.get("KMS_BROKER_LOG_LEVEL", "INFO"),
                   help="log verbosity (env KMS_BROKER_LOG_LEVEL; default INFO)")
    p.add_argument("--log-format", choices=("text", "json"),
                   default=os.environ.get("KMS_BROKER_LOG_FORMAT", "text"),
                   help="text lines or one JSON object per line (env KMS_BROKER_LOG_FORMAT)")
    p.set_defaults(func=cmd_serve)

    hsm = sub.add_parser("hsm", help="HSM token setup").add_subparsers(dest="action",
                                                                       required=True)
    p = hsm.add_parser("init", help="create a SoftHSM2 token under a state directory")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--label", default="broker")
    p.add_argument("--so-pin-file", type=Path, required=True, help="SO PIN file (0600)")
    p.add_argument("--pin-file", type=Path, required=True, help="user PIN file (0600)")
    p.set_defaults(func=cmd_hsm_init)

    p = sub.add_parser("certs", help="dev CA and certificates (kms_broker.certs)")
    p.add_argument("action", choices=["ca", "issue"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for kms_broker.certs")
    p.set_defaults(func=cmd_certs)

    tenant = sub.add_parser("tenant", help="tenant keys and registration").add_subparsers(
        dest="action", required=True)
    p = tenant.add_parser("init", help="create the tenant's Ed25519 signing key")
    p.add_argument("--key", type=Path, required=True)
    p.set_defaults(func=cmd_tenant_init)
    p = tenant.add_parser("register", help="register the tenant at brokers")
    _tenant_args(p)
    p.set_defaults(func=cmd_tenant_register)
    p = tenant.add_parser("shred", help="destroy every KEK of the tenant (irreversible)")
    _tenant_args(p, key=False)
    p.add_argument("--yes", action="store_true", help="confirm")
    p.set_defaults(func=cmd_tenant_shred)

    ds = sub.add_parser("dataset", help="datasets").add_subparsers(dest="action", required=True)
    p = ds.add_parser("upload", help="encrypt PATH into a store, one share per broker")
    p.add_argument("path", type=Path)
    p.add_argument("--store", type=Path, required=True, help="local store directory")
    p.add_argument("--dataset", required=True)
    p.add_argument("--key-version", type=int, default=1)
    _tenant_args(p)
    p.set_defaults(func=cmd_dataset_upload)
    for name, fn, helptext in (("list", cmd_dataset_list, "list datasets"),
                               ("rotate", cmd_dataset_rotate, "rotate the tenant KEK"),
                               ("delete", cmd_dataset_delete, "delete a dataset's shares")):
        p = ds.add_parser(name, help=helptext)
        _tenant_args(p, key=False)
        if name == "delete":
            p.add_argument("--dataset", required=True)
        p.set_defaults(func=fn)

    pol = sub.add_parser("policy", help="release policies").add_subparsers(dest="action",
                                                                           required=True)
    p = pol.add_parser("put", help="store a policy; prints its digest")
    p.add_argument("policy", type=Path)
    _tenant_args(p, key=False)
    p.set_defaults(func=cmd_policy_put)

    p = pol.add_parser("test", help="offline: verify EVIDENCE and evaluate POLICY on it")
    p.add_argument("policy", type=Path)
    p.add_argument("evidence", type=Path)
    p.add_argument("--kind", required=True, help="evidence kind, e.g. tpm2 or sev-snp")
    p.add_argument("--report-data", required=True,
                   help="hex report data the evidence must be bound to")
    p.add_argument("--ak", type=Path, help="the node's enrolled attestation key")
    p.add_argument("--verifier", action="append", metavar="MODULE:FACTORY",
                   help="extra verifier plugin")
    p.set_defaults(func=cmd_policy_test)

    gr = sub.add_parser("grant", help="grants").add_subparsers(dest="action", required=True)
    p = gr.add_parser("create", help="sign and submit a grant")
    p.add_argument("--dataset", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--policy-digest", required=True)
    p.add_argument("--max-nodes", type=int, default=1)
    p.add_argument("--ttl", type=int, default=86400, help="seconds until the grant expires")
    p.add_argument("--grant-id")
    _tenant_args(p)
    p.set_defaults(func=cmd_grant_create)
    p = gr.add_parser("revoke", help="revoke a grant and end its leases")
    p.add_argument("grant_id")
    _tenant_args(p, key=False)
    p.set_defaults(func=cmd_grant_revoke)

    node = sub.add_parser("node", help="node enrolment (operator)").add_subparsers(
        dest="action", required=True)
    p = node.add_parser(
        "enrol", help="enrol this machine's TPM (run on the node, operator certificate)",
        description="Read the EK certificate, EK and AK from the TPM, and bind the AK to the "
                    "EK at every broker by MakeCredential/ActivateCredential. The broker checks "
                    "the EK certificate against its manufacturer CAs (config ek_roots).")
    p.add_argument("node", help="node id to enrol")
    p.add_argument("--tcti", required=True,
                   help='TPM connection, e.g. "device:/dev/tpmrm0" or '
                        '"swtpm:host=127.0.0.1,port=2321"')
    p.add_argument("--ek-type", default="EK-RSA2048", choices=["EK-RSA2048", "EK-ECC256"],
                   help="which certified EK to use (default EK-RSA2048)")
    p.add_argument("--tenant-scope", help="tenant this node may serve (default: any)")
    _tls_args(p)
    p.set_defaults(func=cmd_node_enrol)
    p = node.add_parser("revoke")
    p.add_argument("node")
    _tls_args(p)
    p.set_defaults(func=cmd_node_revoke)
    p = node.add_parser(
        "reinstate", help="allow a revoked node to be enrolled again (audited)",
        description="Revocation is sticky: a revoked node cannot be enrolled again until an "
                    "operator reinstates it. The node stays refused until it enrols again.")
    p.add_argument("node")
    _tls_args(p)
    p.set_defaults(func=cmd_node_reinstate)

    au = sub.add_parser("audit", help="audit log").add_subparsers(dest="action", required=True)
    for name in ("verify", "tail"):
        p = au.add_parser(name, help=f"{name} the hash-chained audit log")
        p.add_argument("--state-dir", type=Path, help="read the log offline from here")
        p.add_argument("--public-key", help="broker audit key: PEM file from `audit "
                       "public-key`, or hex SEC1; checks checkpoints and the anchor")
        p.add_argument("--limit", type=int, default=20)
        p.add_argument("--broker", action="append")
        p.add_argument("--tenant")
        p.add_argument("--ca", type=Path)
        p.add_argument("--cert", type=Path)
        p.add_argument("--key", type=Path)
        p.add_argument("--server-name")
        p.set_defaults(func=cmd_audit)
    p = au.add_parser("public-key", help="print the broker's audit public key (PEM)")
    p.add_argument("--config", type=Path, required=True, help="broker.yaml (reaches the HSM)")
    p.set_defaults(func=cmd_audit_public_key)
    return parser


def main(argv: list[str] | None = None) -> int:
    from kms_broker.config import ConfigError
    from kms_broker.rpc import BrokerRpcError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CliError, ConfigError, BrokerRpcError, ValueError, OSError) as exc:
        print(f"kms-broker: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
