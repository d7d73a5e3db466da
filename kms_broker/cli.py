"""``kms-broker``: the broker's command line and composition root.

    kms-broker hsm init --state-dir DIR --label broker --so-pin-file F --pin-file F
    kms-broker certs ca|issue ...                  (dev CA and certificates)
    kms-broker serve --config broker.yaml [--workers N] [--dev-insecure-fake-hsm]
    kms-broker tenant init --key tenant.key
    kms-broker tenant register|shred  --tenant ID --tenant-key F --broker HOST:PORT --tls DIR
    kms-broker dataset upload PATH --store DIR|s3://BUCKET/PREFIX --dataset ID --broker ADDR
                              [--broker ADDR ...]
    kms-broker dataset list|rotate|delete ...
    kms-broker policy put POLICY.yaml ...           (runs `policy lint` first)
    kms-broker policy lint POLICY.yaml              (offline: claims the verifiers produce)
    kms-broker policy test POLICY.yaml EVIDENCE --kind K --report-data HEX   (offline)
    kms-broker grant create --dataset D --job J (--policy NAME|FILE | --policy-digest HEX)
                            [--expires-in SECONDS] [--grant-id ID] ...
    kms-broker grant revoke GRANT_ID ...
    kms-broker node enrol NODE --tcti TCTI ...     (on the node, operator certificate)
    kms-broker node revoke|reinstate NODE ...      (operator certificate)
    kms-broker node list ...                       (enrolled nodes, revoked state)
    kms-broker audit verify|tail --state-dir DIR | --state postgresql://... |
                                 --config broker.yaml   (offline) or --broker ADDR (online)
    kms-broker audit public-key --config broker.yaml   (PEM, for verify --public-key)
    kms-broker completion bash|zsh                 (shell completion script)

Client configuration (every command that talks to a broker): flags, else environment
variables, else a profile file (kms_broker/clientconfig.py):

    --broker HOST:PORT (repeat)   KMS_BROKER_ADDRESSES=h1:p1,h2:p2
    --broker 'A:P|B:P' (replicas) KMS_BROKER_ADDRESSES='a:p|b:p,h2:p2'  (failover, 30 s)
    --tls DIR                     KMS_BROKER_TLS_DIR   (ca.pem + <role>-<id>.pem/.key)
    --ca/--cert/--key FILE        KMS_BROKER_CA, KMS_BROKER_CERT, KMS_BROKER_KEY
    --server-name NAME            KMS_BROKER_SERVER_NAME
    --tenant ID                   KMS_BROKER_TENANT
    --tenant-key FILE             KMS_BROKER_TENANT_KEY
    --profile NAME                KMS_BROKER_PROFILE (default "default") in
    --profile-file FILE           KMS_BROKER_PROFILE_FILE (default
                                  ~/.config/kms-broker/profiles.yaml)

Output: --format json (or -o json) prints one JSON document on stdout instead of text; on
failure it prints {"error": ..., "exit_status": N} there as well. Errors are one line on
stderr. gRPC core logging is off unless GRPC_VERBOSITY is set or --grpc-debug is given.

Exit status: 0 ok; 1 failed (the broker refused, bad input, tampering found); 2 usage (bad
or missing arguments or client configuration; `audit verify` without --public-key: chain
intact but authenticity not checked); 3 a broker could not be reached (not listening,
unreachable, unavailable); 4 the TLS handshake fails or would (expired certificate, unknown
CA, wrong role, a broker certificate not for that name: the message says which); 130
interrupted (Ctrl-C; an interrupted upload is rolled back).
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

from attest.clikit import add_completion, add_format, add_version, emit_json, quiet_grpc_core

__all__ = ["main"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TLS = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure to report on one line and exit ``status`` (default 1)."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


def _json(args: argparse.Namespace) -> bool:
    return getattr(args, "format", "text") == "json"


def _client_args(p: argparse.ArgumentParser, *, tenant: bool = False,
                 tenant_key: bool = False) -> None:
    """The client configuration flags (kms_broker/clientconfig.py); none is required here:
    environment variables and the profile file may give them."""
    g = p.add_argument_group("broker connection (flags > environment > profile)")
    g.add_argument("--broker", action="append", metavar="HOST:PORT",
                   help="broker address (repeat for several brokers, in share order; a "
                        "broker's replicas joined by |: 'a:7001|b:7001'; env "
                        "KMS_BROKER_ADDRESSES)")
    g.add_argument("--tls", type=Path, metavar="DIR",
                   help="directory with ca.pem and this client's <role>-<id>.pem/.key "
                        "(env KMS_BROKER_TLS_DIR)")
    g.add_argument("--ca", type=Path, help="CA certificate (PEM; env KMS_BROKER_CA)")
    g.add_argument("--cert", type=Path, help="client certificate (PEM; env KMS_BROKER_CERT)")
    g.add_argument("--key", type=Path, help="client private key (PEM; env KMS_BROKER_KEY)")
    g.add_argument("--server-name", help="TLS name the broker certificate carries")
    g.add_argument("--profile", help="profile name in the profile file (env KMS_BROKER_PROFILE)")
    g.add_argument("--profile-file", type=Path,
                   help="profile file (env KMS_BROKER_PROFILE_FILE; default "
                        "~/.config/kms-broker/profiles.yaml)")
    if tenant:
        g.add_argument("--tenant", help="tenant id (env KMS_BROKER_TENANT)")
    if tenant_key:
        g.add_argument("--tenant-key", type=Path,
                       help="tenant Ed25519 key file (0600, from `tenant init`; env "
                            "KMS_BROKER_TENANT_KEY)")
    add_format(p)


def _tls_args(p: argparse.ArgumentParser) -> None:  # operator commands
    _client_args(p)


def _tenant_args(p: argparse.ArgumentParser, *, key: bool = True) -> None:
    _client_args(p, tenant=True, tenant_key=key)


def _config(args: argparse.Namespace, role: str | None) -> Any:
    from kms_broker.clientconfig import flags_from, resolve

    return resolve(flags_from(args), role=role)


def _endpoints(args: argparse.Namespace, role: str = "operator") -> list[list[Any]]:
    """Resolve the client configuration, check the TLS material locally and with one
    handshake per broker (kms_broker/tlsdiag.py), then the endpoints: one list per share
    holder (its replicas). A replica set needs one replica that answers the probe; the
    others are left to failover (kms_broker/replicas.py)."""
    from kms_broker.tlsdiag import Unreachable, check_local, probe

    config = _config(args, role)
    config.require_brokers()
    ca, cert, key = config.require_tls()
    check_local(ca, cert, key, role=role)

    def probe_one(address: str, wait_s: float) -> None:
        if address.startswith("unix:"):
            return  # a local socket: no TCP probe (gRPC's own wait reports it)
        deadline = time.monotonic() + wait_s  # a broker restarting: refused for a moment
        while True:
            try:
                probe(address, ca=ca, cert=cert, key=key, server_name=config.server_name)
                return
            except Unreachable as exc:
                if not exc.final:
                    return  # slow, not absent: gRPC's own connection wait decides
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    for holder in config.holders():
        unreachable: list[Unreachable] = []
        for address in holder:
            try:
                probe_one(address, 3.0 if len(holder) == 1 else 0.0)
                break
            except Unreachable as exc:
                unreachable.append(exc)
        else:
            raise unreachable[0]
    args._client = (config, ca, cert, key)
    return config.endpoints()


def _tenant_clients(args: argparse.Namespace, *, need_key: bool = False) -> list[Any]:
    from kms_broker.tenant import TenantClient, load_tenant_key

    config = _config(args, "tenant")
    tenant = config.require_tenant()
    key_path = config.require_tenant_key() if need_key else config.tenant_key
    key = load_tenant_key(key_path) if key_path is not None else None
    args._tenant = tenant
    return [TenantClient(e, tenant_id=tenant, signing_key=key)
            for e in _endpoints(args, "tenant")]


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
    try:
        server = build(config, worker=worker, allow_fake_hsm=args.dev_insecure_fake_hsm)
    except (OSError, RuntimeError) as exc:  # gRPC: OSError here, RuntimeError in grpc itself
        import errno

        if "cannot listen" in str(exc) or "Failed to bind" in str(exc):
            raise CliError(_listen_problem(config.listen, args.config)) from None
        if getattr(exc, "errno", None) == errno.EADDRINUSE and config.metrics_port:
            raise CliError(f"cannot serve metrics on port {config.metrics_port}: it is already "
                           f"in use; change metrics_port in {args.config}") from None
        raise
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


def _listen_problem(listen: str, config_path: Path) -> str:
    """Why the broker cannot listen on ``listen``, found by binding it once ourselves."""
    import errno
    import socket

    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - only a test bind, closed at once
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    why = "the address is not usable here"
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, int(port)))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            why = f"port {port} is already in use (another broker, or another program)"
        elif exc.errno == errno.EACCES:
            why = f"port {port} needs privileges this user lacks"
        elif exc.errno == errno.EADDRNOTAVAIL:
            why = f"{host} is not an address of this machine"
        else:
            why = exc.strerror or str(exc)
    except ValueError:
        why = "it is not HOST:PORT"
    return (f"cannot listen on {listen}: {why}; stop what listens there or change listen: in "
            f"{config_path}")


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
    if _json(args):
        emit_json({"label": args.label, "softhsm2_conf": str(config.config_path)})
    else:
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
    if _json(args):
        emit_json({"key": str(args.key), "public_key": public.hex()})
    else:
        print(f"tenant key written to {args.key}; public key {public.hex()}")
    return 0


def _per_broker(args: argparse.Namespace, clients: list[Any],
                call: Callable[[Any], dict[str, Any]], text: Callable[[dict[str, Any]], str],
                extra: dict[str, Any] | None = None) -> int:
    """Run ``call`` at each broker in turn; print a line each (text) or one document."""
    rows = []
    try:
        for client in clients:
            row = {"broker": client.address, **call(client)}
            rows.append(row)
            if not _json(args):
                print(f"{client.address}: {text(row)}", flush=True)
    finally:
        for client in clients:
            client.close()
    if _json(args):
        emit_json({**(extra or {}), "brokers": rows})
    return 0


def cmd_tenant_register(args: argparse.Namespace) -> int:
    return _per_broker(args, _tenant_clients(args, need_key=True),
                       lambda c: {"kek_version": c.register()},
                       lambda r: f"registered, KEK v{r['kek_version']}",
                       {"tenant": args._tenant})


def cmd_tenant_shred(args: argparse.Namespace) -> int:
    if not args.yes:
        raise CliError("shredding destroys every key of this tenant; pass --yes to confirm")
    return _per_broker(args, _tenant_clients(args), lambda c: {"keys_destroyed": c.shred()},
                       lambda r: f"{r['keys_destroyed']} key(s) destroyed",
                       {"tenant": args._tenant})


def _progress(label: str, unit: str = "B") -> Any:
    from kms_broker.progress import Progress  # rate and ETA; a bar on a terminal

    return Progress(label, unit=unit)


def _check_upload_source(path: Path) -> None:
    """Ordinary mistakes, said before any broker is asked for anything."""
    if not path.exists():
        raise CliError(f"{path} does not exist: give the folder to upload")
    if not path.is_dir():
        raise CliError(f"{path} is a file, not a folder: give the folder that holds it "
                       f"(every file under the folder becomes one record)")
    for item in path.rglob("*"):
        if item.is_file():
            return
    raise CliError(f"{path} is empty: there is nothing to upload (put the dataset's files in "
                   f"it)")


def cmd_dataset_upload(args: argparse.Namespace) -> int:
    from kms_broker.tenant import upload_dataset
    from sealed import StoreError, open_store

    _check_upload_source(args.path)
    try:  # a directory, or s3://bucket/prefix (standard AWS environment and profile files)
        store = open_store(args.store)
    except StoreError as exc:
        raise CliError(str(exc)) from None
    store_uri = args.store if args.store.startswith("s3://") else str(Path(
        args.store.removeprefix("file://")).resolve())
    clients = _tenant_clients(args, need_key=True)
    what = "dataset" if args.key_version == 1 else f"key version {args.key_version}"
    args._interrupt_note = (f"the upload was stopped and rolled back: no {what} was "
                            f"registered; run it again")
    try:
        result = upload_dataset(clients, args.path, store,
                                dataset_id=args.dataset, key_version=args.key_version,
                                store_uri=store_uri, progress=_progress("encrypting"))
    except StoreError as exc:
        raise CliError(f"upload failed: {exc}") from None
    finally:
        for c in clients:
            c.close()
        close = getattr(store, "close", None)
        if close is not None:
            close()
    if _json(args):
        emit_json({"dataset": args.dataset, "key_version": args.key_version,
                   "manifest": result.manifest_name, "num_records": result.num_records,
                   "num_shards": result.num_shards, "plaintext_bytes": result.plaintext_bytes,
                   "holders": list(result.holders), "store": store_uri})
    else:
        print(f"uploaded {result.num_records} records in {result.num_shards} shards; "
              f"manifest {result.manifest_name}; shares at {', '.join(result.holders)}")
    return 0


def cmd_dataset_list(args: argparse.Namespace) -> int:
    rows = []
    clients = _tenant_clients(args)
    try:
        for client in clients:
            for d in client.list_datasets():
                row = {"broker": client.address, "dataset": d.dataset_id, "status": d.status,
                       "key_versions": list(d.key_versions), "kek_version": d.kek_version,
                       "share_index": d.share_index, "share_count": d.share_count,
                       "manifest": d.manifest_name}
                rows.append(row)
                if not _json(args):
                    print(f"{client.address} {d.dataset_id} status={d.status} "
                          f"versions={list(d.key_versions)} kek=v{d.kek_version} "
                          f"share={d.share_index + 1}/{d.share_count} "
                          f"manifest={d.manifest_name}")
    finally:
        for c in clients:
            c.close()
    if _json(args):
        emit_json({"tenant": args._tenant, "datasets": rows})
    return 0


def cmd_dataset_rotate(args: argparse.Namespace) -> int:
    clients = _tenant_clients(args)
    progress = _progress("rotating", unit="broker")
    done = [0]

    def call(c: Any) -> dict[str, Any]:
        progress(done[0], len(clients))
        version, count = c.rotate_kek()
        done[0] += 1
        progress(done[0], len(clients))
        return {"kek_version": version, "shares_rewrapped": count}

    return _per_broker(args, clients, call,
                       lambda r: f"KEK now v{r['kek_version']}, {r['shares_rewrapped']} "
                                 f"share(s) re-wrapped", {"tenant": args._tenant})


def cmd_dataset_delete(args: argparse.Namespace) -> int:
    def call(c: Any) -> dict[str, Any]:
        c.delete_dataset(args.dataset)
        return {"deleted": True}

    return _per_broker(args, _tenant_clients(args), call,
                       lambda r: f"deleted {args.dataset}", {"dataset": args.dataset})


def _lint_or_fail(args: argparse.Namespace, path: Path) -> tuple[Any, list[Any]]:
    from attest.policy import Policy, PolicyError
    from attest.policy_lint import lint_policy

    try:
        policy = Policy.from_yaml(path.read_text())
    except PolicyError as exc:
        raise CliError(f"{path}: {exc}") from None
    findings = lint_policy(policy)
    errors = [f for f in findings if f.severity == "error"]
    if errors and not getattr(args, "no_lint", False):
        first = errors[0]
        more = f" (and {len(errors) - 1} more; `kms-broker policy lint {path}` lists them)" \
            if len(errors) > 1 else ""
        raise CliError(f"{path}: {first.message}{more}; pass --no-lint to store it anyway")
    return policy, findings


def cmd_policy_put(args: argparse.Namespace) -> int:
    policy, findings = _lint_or_fail(args, args.policy)
    for f in findings:
        print(f"kms-broker: policy lint: {f.severity}: {f.message}", file=sys.stderr)
    text = args.policy.read_text()
    result = _per_broker(args, _tenant_clients(args), lambda c: {"digest": c.put_policy(text)},
                         lambda r: f"policy {r['digest']}",
                         {"policy": policy.name, "version": policy.version,
                          "digest": policy.digest,
                          "lint": [f.to_dict() for f in findings]})
    _remember_policy(args, policy.name, policy.digest)
    return result


def cmd_policy_lint(args: argparse.Namespace) -> int:
    policy, findings = _lint_or_fail(argparse.Namespace(no_lint=True), args.policy)
    errors = [f for f in findings if f.severity == "error"]
    if _json(args):
        emit_json({"policy": policy.name, "digest": policy.digest, "ok": not errors,
                   "findings": [f.to_dict() for f in findings]})
    else:
        for f in findings:
            print(f"{f.severity}: {f.message}")
        print(f"policy {policy.name}: " + ("OK" if not findings else
              f"{len(errors)} error(s), {len(findings) - len(errors)} warning(s)"))
    return EXIT_FAILURE if errors else EXIT_OK


def _policy_record(args: argparse.Namespace) -> Path:
    import os

    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "kms-broker" / "policies.json"


def _remember_policy(args: argparse.Namespace, name: str, digest: str) -> None:
    """``policy put`` records name -> digest per tenant, so ``grant create --policy NAME``
    can name it (public data: a digest of a policy the tenant stored)."""
    import contextlib
    import os

    path = _policy_record(args)
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(path.read_text()) if path.exists() else {}
        record.setdefault(args._tenant, {})[name] = digest
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, sort_keys=True, indent=1))
        tmp.replace(path)


def _policy_digest(args: argparse.Namespace, tenant: str) -> str:
    if args.policy_digest:
        return args.policy_digest
    if not args.policy:
        raise CliError("give --policy NAME|FILE (or --policy-digest HEX)", EXIT_USAGE)
    path = Path(args.policy)
    if path.is_file():
        from attest.policy import Policy, PolicyError

        try:
            return Policy.from_yaml(path.read_text()).digest
        except PolicyError as exc:
            raise CliError(f"{path}: {exc}") from None
    try:
        known = json.loads(_policy_record(args).read_text()).get(tenant, {})
    except (OSError, ValueError):
        known = {}
    if args.policy not in known:
        raise CliError(
            f"no policy named {args.policy!r} was put for tenant {tenant} from this machine "
            f"(known: {', '.join(sorted(known)) or 'none'}): give the policy file, its name "
            f"after `kms-broker policy put`, or --policy-digest")
    return str(known[args.policy])


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
        raise CliError("--report-data must be hex", EXIT_USAGE) from None
    node = {"ak_public": args.ak.read_bytes()} if args.ak else {}
    context = VerificationContext(expected_report_data=report_data, node=node)
    decision = test_policy_offline(args.policy.read_text(), args.evidence.read_bytes(),
                                   args.kind, context, verifiers=verifiers)
    if _json(args):
        emit_json(decision.to_dict())
    else:
        print(decision.summary())
    return 0 if decision.allowed else 1


def cmd_grant_create(args: argparse.Namespace) -> int:
    import secrets

    from kms_broker.grants import GrantDocument

    clients = _tenant_clients(args, need_key=True)
    try:
        digest = _policy_digest(args, args._tenant)
    except BaseException:
        for c in clients:
            c.close()
        raise
    ttl = args.expires_in if args.expires_in is not None else args.ttl
    if ttl <= 0:
        raise CliError("--expires-in must be a positive number of seconds", EXIT_USAGE)
    grant = GrantDocument(
        grant_id=args.grant_id or f"g-{secrets.token_hex(8)}", tenant_id=args._tenant,
        dataset_id=args.dataset, job_id=args.job, policy_digest=digest,
        max_nodes=args.max_nodes, expires_unix_ms=int(time.time() * 1000) + ttl * 1000,
    )
    return _per_broker(args, clients, lambda c: {"grant_id": c.create_grant(grant)},
                       lambda r: f"grant {r['grant_id']}",
                       {"grant_id": grant.grant_id, "tenant": grant.tenant_id,
                        "dataset": grant.dataset_id, "job": grant.job_id,
                        "policy_digest": digest, "max_nodes": grant.max_nodes,
                        "expires_unix_ms": grant.expires_unix_ms})


def cmd_grant_revoke(args: argparse.Namespace) -> int:
    grant_id = args.grant_id or args.grant_id_flag
    if not grant_id:
        raise CliError("give the grant id to revoke (GRANT_ID or --grant-id)", EXIT_USAGE)
    return _per_broker(args, _tenant_clients(args),
                       lambda c: {"leases_ended": c.revoke_grant(grant_id)},
                       lambda r: f"revoked {grant_id}, {r['leases_ended']} lease(s) ended",
                       {"grant_id": grant_id})


def _operator_stub(endpoint: Any) -> tuple[Any, Any]:
    from kms_broker._proto.kmsbroker.v1 import broker_pb2_grpc as pb_grpc
    from kms_broker.rpc import open_channel

    channel = open_channel(endpoint)
    return channel, pb_grpc.OperatorServiceStub(channel)


def _operator_call(args: argparse.Namespace, method: str, request: Any) -> list[Any]:
    """``method`` at every share holder (at the first replica of a set that answers); the
    rows name the replica that answered."""
    import grpc

    from kms_broker.replicas import REPLICA_CONNECT_S, on_any_replica
    from kms_broker.rpc import error_from_rpc, wait_until_ready

    out = []
    for holder in _endpoints(args):
        connect_s = 30 if len(holder) == 1 else REPLICA_CONNECT_S

        def call(endpoint: Any, connect_s: float = connect_s) -> Any:
            channel, stub = _operator_stub(endpoint)
            try:
                wait_until_ready(channel, endpoint.address, connect_s)
                return endpoint.address, getattr(stub, method)(request, timeout=30)
            except grpc.RpcError as exc:
                raise error_from_rpc(exc, endpoint.address) from None
            finally:
                channel.close()

        out.append(on_any_replica(holder, call))
    return out


def cmd_node_enrol(args: argparse.Namespace) -> int:
    import os

    from kms_broker.node_enrol import enrol_node

    endpoints = _endpoints(args)
    os.environ.setdefault("TSS2_LOG", "all+NONE")  # tpm2-tss's own lines: TSS2_LOG brings them
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
    if _json(args):
        emit_json({"node": args.node, "brokers": [
            {"broker": d.broker, "ak_name": d.ak_name.hex(),
             "ek_certificate_sha256": d.ek_certificate_sha256} for d in done]})
        return 0
    for d in done:
        print(f"node {d.node_id} enrolled at {d.broker}: AK {d.ak_name.hex()}, "
              f"EK certificate sha256 {d.ek_certificate_sha256}")
    print(f"node {args.node} enrolled at {len(done)} broker(s)")
    return 0


def cmd_node_revoke(args: argparse.Namespace) -> int:
    from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb

    rows = []
    for address, r in _operator_call(args, "RevokeNode", pb.RevokeNodeRequest(node_id=args.node)):
        rows.append({"broker": address, "leases_revoked": r.leases_revoked})
        if not _json(args):
            print(f"node {args.node} revoked, {r.leases_revoked} lease(s) ended")
    if _json(args):
        emit_json({"node": args.node, "revoked": True, "brokers": rows})
    return 0


def cmd_node_list(args: argparse.Namespace) -> int:
    from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb

    rows = []
    for address, r in _operator_call(args, "ListNodes", pb.ListNodesRequest()):
        for n in r.nodes:
            rows.append({"broker": address, "node": n.node_id, "state": n.state,
                         "revoked": n.state != "active", "tenant_scope": n.tenant_scope,
                         "enrolled_unix_ms": n.enrolled_unix_ms,
                         "ek_certificate_sha256": n.ek_certificate_sha256})
    if _json(args):
        emit_json({"nodes": rows})
        return 0
    for row in rows:
        enrolled = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["enrolled_unix_ms"] / 1000))
        print(f"{row['broker']} {row['node']} {row['state']} scope="
              f"{row['tenant_scope'] or '*'} enrolled={enrolled}Z")
    if not rows:
        print("no node is enrolled", file=sys.stderr)
    return 0


def cmd_node_reinstate(args: argparse.Namespace) -> int:
    from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb

    done = _operator_call(args, "ReinstateNode", pb.ReinstateNodeRequest(node_id=args.node))
    if _json(args):
        emit_json({"node": args.node, "reinstated": True,
                   "brokers": [{"broker": a} for a, _ in done]})
    else:
        print(f"node {args.node} reinstated at {len(done)} broker(s): it may be enrolled "
              f"again (and is refused until it is)")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from kms_broker.audit import read_anchor_file, tail_log, verify_log

    state_dir, dsn = args.state_dir, _offline_state(args)
    if dsn == "sqlite":  # broker.yaml with the embedded default
        state_dir, dsn = load_config_for_audit(args.config).state_dir, None
    if dsn is not None:
        return _audit_offline_pg(args, dsn)
    if state_dir is not None:
        log_path = state_dir / "audit.log"
        if not log_path.exists():
            raise CliError(f"no audit log at {log_path}")
        if args.action == "verify":
            anchor_path = log_path.with_name("audit.anchor")
            return _verify_offline(
                args, log_path, lambda: read_anchor_file(anchor_path), verify_log,
                missing=f"no anchor file at {anchor_path}")
        _print_tail(args, list(tail_log(log_path, args.limit)))
        return 0
    bad = 0
    rows: list[dict[str, Any]] = []
    records: list[Any] = []
    clients = _tenant_clients(args)
    try:
        for client in clients:
            if args.action == "verify":
                r = client.verify_audit()
                rows.append({"broker": client.address, "ok": r.ok, "problem": r.problem})
                if not _json(args):
                    print(f"{client.address}: " + ("OK: " if r.ok else "TAMPERED: ")
                          + r.problem)
                bad += 0 if r.ok else 1
            else:
                for rec in client.tail_audit(args.limit):
                    records.append({"broker": client.address,
                                    "record": json.loads(rec.canonical_json)})
                    if not _json(args):
                        print(rec.canonical_json)
    finally:
        for c in clients:
            c.close()
    if _json(args):
        emit_json({"brokers": rows} if args.action == "verify" else {"records": records})
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


def _print_tail(args: argparse.Namespace, records: list[Any]) -> None:
    if _json(args):
        emit_json({"records": records})
    else:
        for rec in records:
            print(json.dumps(rec, sort_keys=True))


def load_config_for_audit(path: Path) -> Any:
    from kms_broker.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def _offline_state(args: argparse.Namespace) -> str | None:
    """``--state URL`` or the ``state`` of ``--config broker.yaml`` (None: neither given)."""
    from kms_broker.config import ConfigError, parse_state

    if args.state is not None and args.config is not None:
        raise CliError("give --state or --config, not both", EXIT_USAGE)
    if args.state is not None:
        try:
            return parse_state(args.state)
        except ConfigError as exc:
            raise CliError(f"--state: {exc}", EXIT_USAGE) from None
    if args.config is not None:
        return str(load_config_for_audit(args.config).state)
    return None


def _audit_offline_pg(args: argparse.Namespace, dsn: str) -> int:
    """``audit verify|tail`` on the audit log in the broker's PostgreSQL database, read on a
    connection of its own in a read-only transaction (nothing created or changed)."""
    import psycopg

    from kms_broker.audit import tail_log, verify_log
    from kms_broker.audit_pg import read_pg_audit
    from kms_broker.state.postgres import safe_dsn

    try:
        conn = psycopg.connect(dsn, connect_timeout=10)
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CliError(f"cannot connect to {safe_dsn(dsn)}: {first}",
                       EXIT_UNREACHABLE) from None
    try:
        conn.read_only = True
        with conn.transaction():  # one snapshot: the records and the anchor agree
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            try:
                source, anchor = read_pg_audit(conn)
            except ValueError as exc:
                raise CliError(f"{safe_dsn(dsn)}: {exc}") from None
            if args.action == "verify":
                return _verify_offline(args, source, lambda: anchor, verify_log,
                                       missing="no signed anchor in table audit_anchor")
            _print_tail(args, list(tail_log(source, args.limit)))
            return 0
    except psycopg.Error as exc:
        raise CliError(f"reading the audit log from {safe_dsn(dsn)} failed: "
                       f"{type(exc).__name__}") from None
    finally:
        conn.close()


def _verify_offline(args: argparse.Namespace, log_path: Any, read_anchor: Any,
                    verify: Any, *, missing: str) -> int:
    """Exit 0: intact and authentic; 1: tampering found (or, with a key, no signed anchor);
    2: chain intact but authenticity not checked (no key). ``log_path``: the file log, or
    the PostgreSQL log's lines; ``read_anchor()``: its signed anchor or None."""
    key = _public_key_arg(args.public_key) if args.public_key else None

    def report(status: str, detail: str, code: int) -> int:
        if _json(args):
            emit_json({"status": status, "ok": code == 0, "detail": detail,
                       "log": str(log_path)})
        else:
            head = {"CHAIN_INTACT_UNAUTHENTICATED": "CHAIN INTACT, AUTHENTICITY NOT CHECKED"}
            print(f"{head.get(status, status)}: {detail}")
        return code

    try:
        anchor = read_anchor()
    except ValueError as exc:
        return report("TAMPERED", str(exc), 1)
    result = verify(log_path, key, anchor)
    if not result.ok:
        return report("TAMPERED", result.problem, 1)
    if key is None:
        print("warning: give --public-key (from `kms-broker audit public-key`) to check that "
              "the broker wrote this log", file=sys.stderr)
        return report("CHAIN_INTACT_UNAUTHENTICATED", result.problem, 2)
    if anchor is None:
        return report("TAMPERED", f"{missing}: records cut from the end "
                      f"of the log cannot be ruled out ({result.problem})", 1)
    return report("OK", result.problem, 0)


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
    pem = key.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    if _json(args):
        emit_json({"pem": pem, "sec1_hex": sec1.hex()})
    else:
        print(pem, end="")
    return 0


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kms-broker", description="Key broker: HSM-backed release of dataset key shares.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
    )
    add_version(parser)
    add_format(parser, top=True)
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
    add_format(p)
    p.set_defaults(func=cmd_hsm_init)

    p = sub.add_parser("certs", help="dev CA and certificates (kms_broker.certs)")
    p.add_argument("action", choices=["ca", "issue"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for kms_broker.certs")
    p.set_defaults(func=cmd_certs)

    tenant = sub.add_parser("tenant", help="tenant keys and registration").add_subparsers(
        dest="action", required=True)
    p = tenant.add_parser("init", help="create the tenant's Ed25519 signing key")
    p.add_argument("--key", type=Path, required=True)
    add_format(p)
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
    p.add_argument("path", type=Path, help="the folder to upload (every file is a record)")
    p.add_argument("--store", required=True,
                   help="store: a local directory or s3://BUCKET/PREFIX (AWS configuration)")
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
    p = pol.add_parser("put", help="lint and store a policy; prints its digest")
    p.add_argument("policy", type=Path)
    p.add_argument("--no-lint", action="store_true",
                   help="store the policy even if `policy lint` finds errors")
    _tenant_args(p, key=False)
    p.set_defaults(func=cmd_policy_put)

    p = pol.add_parser("lint", help="offline: check a policy's claim names and params",
                       description="Check every claim a rule reads against the claims the "
                                   "broker's verifiers can produce (with suggestions for "
                                   "misspelt names) and every params reference against the "
                                   "policy's params. Exit 1 on errors.")
    p.add_argument("policy", type=Path)
    add_format(p)
    p.set_defaults(func=cmd_policy_lint)

    p = pol.add_parser("test", help="offline: verify EVIDENCE and evaluate POLICY on it")
    p.add_argument("policy", type=Path)
    p.add_argument("evidence", type=Path)
    p.add_argument("--kind", required=True, help="evidence kind, e.g. tpm2 or sev-snp")
    p.add_argument("--report-data", required=True,
                   help="hex report data the evidence must be bound to")
    p.add_argument("--ak", type=Path, help="the node's enrolled attestation key")
    p.add_argument("--verifier", action="append", metavar="MODULE:FACTORY",
                   help="extra verifier plugin")
    add_format(p)
    p.set_defaults(func=cmd_policy_test)

    gr = sub.add_parser("grant", help="grants").add_subparsers(dest="action", required=True)
    p = gr.add_parser("create", help="sign and submit a grant")
    p.add_argument("--dataset", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--policy", metavar="NAME|FILE",
                   help="the policy: its YAML file, or its name as `policy put` stored it")
    p.add_argument("--policy-digest", metavar="HEX", help="the policy's digest itself")
    p.add_argument("--max-nodes", type=int, default=1)
    p.add_argument("--expires-in", type=int, metavar="SECONDS",
                   help="seconds until the grant expires (default 86400)")
    p.add_argument("--ttl", type=int, default=86400, help=argparse.SUPPRESS)  # old name
    p.add_argument("--grant-id", help="grant id (default: a random g-...)")
    _tenant_args(p)
    p.set_defaults(func=cmd_grant_create)
    p = gr.add_parser("revoke", help="revoke a grant and end its leases")
    p.add_argument("grant_id", nargs="?", metavar="GRANT_ID")
    p.add_argument("--grant-id", dest="grant_id_flag", help="the same, as a flag")
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
    p = node.add_parser("list", help="every enrolled node and its state (active, revoked, "
                                     "reinstated)")
    _tls_args(p)
    p.set_defaults(func=cmd_node_list)
    p = node.add_parser("revoke", help="revoke a node (sticky) and end its leases")
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
        p.add_argument("--state", metavar="postgresql://...",
                       help="read the log offline from the broker's PostgreSQL database "
                            "(no password in the URL: passfile=... or PGPASSFILE)")
        p.add_argument("--config", type=Path, metavar="broker.yaml",
                       help="read the log offline from the state this broker config names")
        p.add_argument("--public-key", help="broker audit key: PEM file from `audit "
                       "public-key`, or hex SEC1; checks checkpoints and the anchor")
        p.add_argument("--limit", type=int, default=20)
        _tenant_args(p, key=False)
        p.set_defaults(func=cmd_audit)
    p = au.add_parser("public-key", help="print the broker's audit public key (PEM)")
    p.add_argument("--config", type=Path, required=True, help="broker.yaml (reaches the HSM)")
    add_format(p)
    p.set_defaults(func=cmd_audit_public_key)
    add_completion(sub, parser)
    return parser


def _explain_unavailable(args: argparse.Namespace, exc: Exception) -> str:
    """After gRPC gave up on a broker: say why, from one more probe of that address."""
    from kms_broker.tlsdiag import TlsProblem, Unreachable, probe

    broker = getattr(exc, "broker", "")
    client = getattr(args, "_client", None)
    if client is None or not broker:
        return str(exc)
    config, ca, cert, key = client
    try:
        probe(broker, ca=ca, cert=cert, key=key, server_name=config.server_name, timeout_s=5.0)
    except (TlsProblem, Unreachable) as why:
        return str(why)
    except Exception:  # noqa: S110 - the original error is reported below
        pass
    return str(exc)


def _fail(args: argparse.Namespace, message: str, status: int) -> int:
    message = " ".join(message.split())  # one line, whatever the exception carried
    print(f"kms-broker: error: {message}", file=sys.stderr, flush=True)
    if _json(args):
        emit_json({"error": message, "exit_status": status})
    return status


def main(argv: list[str] | None = None) -> int:
    argv = quiet_grpc_core(argv)
    from kms_broker.clientconfig import ClientConfigError
    from kms_broker.config import ConfigError
    from kms_broker.hsm.interface import HsmError
    from kms_broker.rpc import (
        BrokerRpcError,
        PermissionDeniedError,
        UnavailableError,
    )
    from kms_broker.tlsdiag import TlsProblem, Unreachable

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        note = getattr(args, "_interrupt_note", "stopped before it finished")
        return _fail(args, f"interrupted (Ctrl-C): {note}", EXIT_INTERRUPTED)
    except CliError as exc:
        return _fail(args, str(exc), exc.status)
    except ClientConfigError as exc:
        return _fail(args, str(exc), EXIT_USAGE)
    except TlsProblem as exc:
        return _fail(args, str(exc), EXIT_TLS)
    except Unreachable as exc:
        return _fail(args, str(exc), EXIT_UNREACHABLE)
    except UnavailableError as exc:
        return _fail(args, _explain_unavailable(args, exc), EXIT_UNREACHABLE)
    except PermissionDeniedError as exc:
        failed = "; ".join(f"{r.name}: {r.reason}" for r in exc.failed_rules)
        return _fail(args, f"{exc}" + (f" [failed: {failed}]" if failed and failed not in
                                       str(exc) else ""), EXIT_FAILURE)
    except HsmError as exc:
        return _fail(args, f"HSM: {exc} (check hsm.token_label, the PIN file and "
                           f"SOFTHSM2_CONF in broker.yaml)", EXIT_FAILURE)
    except (ConfigError, BrokerRpcError, ValueError, OSError) as exc:
        return _fail(args, str(exc), EXIT_FAILURE)


if __name__ == "__main__":
    sys.exit(main())
