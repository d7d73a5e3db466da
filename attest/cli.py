"""``attest``: this node's facts, tpm2 evidence, offline verification, and a policy doctor.

    attest collect [--json] [--evidence OUT --tcti TCTI --nonce HEX --session-id S --node-key HEX]
    attest verify EVIDENCE --ak AK.pem (--report-data HEX | --nonce HEX --session-id S
                  --node-key HEX) [--boot-pcrs PCRS.json] [--json]
    attest doctor [--policy FILE] [--expected-code-digest HEX ...] [--expected FILE] [--json]
    attest code-digest [ENV] [--root IMAGE] [--write] [--manifest] [--format json]
    attest swtpm create DIR [--ek-ca DIR]   (a development TPM with its EK CA)
    attest swtpm run DIR                    (serve it on 127.0.0.1 until Ctrl-C)
    attest ak export --tcti TCTI [--out AK.pem]   (the AK as PEM, for verify/policy test)
    attest completion bash|zsh              (shell completion script)

tpm2-tss's own log lines are off unless ``TSS2_LOG`` is set (e.g. ``TSS2_LOG=all+warning``).
``--format json`` (``-o json``) prints one JSON document on stdout on every command that
prints a result (``--json`` is the same on collect, verify and doctor). ``--version``.

Exit codes: 0 success (verify: evidence verified; doctor: no rule it could check fails; rules
it cannot evaluate here are reported "not checked", never PASS), 1 failure
(verification failures, failed rules, TPM and swtpm errors), 2 usage errors, 130 interrupted.
Errors are one line on stderr.
This module is the composition root of the node-side pieces; it reads no environment.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attest.clikit import add_completion, add_format, add_version, emit_json
from attest.code_digest import code_digest
from attest.facts import HostSource, collect_facts
from attest.interface import (
    MalformedEvidence,
    VerificationContext,
    VerificationResult,
    expected_report_data,
)

__all__ = ["main"]

MAX_EVIDENCE_FILE = 4 << 20


class UsageError(Exception):
    """Bad arguments or unreadable inputs: exit code 2."""


class RuntimeFailure(Exception):
    """A tool (swtpm, the TPM) failed: exit code 1, one line."""


def _hex(value: str, what: str, length: int | None = None) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise UsageError(f"{what} must be hex") from None
    if length is not None and len(raw) != length:
        raise UsageError(f"{what} must be {length} bytes ({2 * length} hex digits)")
    return raw


def _source(args: argparse.Namespace) -> HostSource:
    if args.no_gpu:
        return HostSource(root=Path(args.root), gpu_probe=lambda: None)
    return HostSource(root=Path(args.root))


def _claims(args: argparse.Namespace) -> dict[str, Any]:
    claims = collect_facts(_source(args))
    claims.update(code_digest().claims())
    return claims


def _report_data(args: argparse.Namespace) -> bytes:
    if getattr(args, "report_data", None):
        return _hex(args.report_data, "--report-data", 32)
    if not (args.nonce and args.session_id and args.node_key):
        raise UsageError("give --report-data, or --nonce, --session-id and --node-key")
    try:
        return expected_report_data(
            _hex(args.nonce, "--nonce", 32), args.session_id, _hex(args.node_key, "--node-key")
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _print_claims(claims: dict[str, Any]) -> None:
    width = max(len(k) for k in claims)
    for k in sorted(claims):
        print(f"{k:<{width}}  {json.dumps(claims[k])}")


def _wants_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False)) or getattr(args, "format", "text") == "json"


def cmd_collect(args: argparse.Namespace) -> int:
    claims = _claims(args)
    if args.evidence:
        if not args.tcti:
            raise UsageError("--evidence needs --tcti (e.g. device:/dev/tpmrm0)")
        report_data = _report_data(args)
        from attest.eventlog import EventLog
        from attest.tpm2.node import TpmError, TpmNode

        print(f"measuring {len(claims)} claims into PCR 23 and quoting...", file=sys.stderr)
        try:
            with TpmNode(args.tcti) as tpm:
                evidence = tpm.evidence(EventLog.from_claims(claims), report_data)
        except TpmError as exc:
            print(f"attest: {exc}", file=sys.stderr)
            return 1
        Path(args.evidence).write_bytes(evidence.to_bytes())
        print(f"wrote tpm2 evidence to {args.evidence}", file=sys.stderr)
    if _wants_json(args):
        print(json.dumps(claims, sort_keys=True, indent=2))
    else:
        _print_claims(claims)
    return 0


def _load_boot_pcrs(path: str | None) -> dict[str, str]:
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--boot-pcrs {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError('--boot-pcrs must be a JSON object {"0": "<sha256 hex>", ...}')
    return {str(k): str(v) for k, v in data.items()}


def _result_json(result: VerificationResult) -> dict[str, Any]:
    return {
        "kind": result.kind,
        "ok": result.ok,
        "claims": dict(result.claims),
        "failures": [
            {"id": f.id, "severity": f.severity, "message": f.message} for f in result.failures
        ],
    }


def cmd_verify(args: argparse.Namespace) -> int:
    from attest.tpm2.verifier import Tpm2Verifier

    path = Path(args.evidence)
    try:
        if path.stat().st_size > MAX_EVIDENCE_FILE:
            raise UsageError(f"{path} is larger than {MAX_EVIDENCE_FILE} bytes")
        evidence = path.read_bytes()
        ak = Path(args.ak).read_text()
    except OSError as exc:
        raise UsageError(str(exc)) from None
    context = VerificationContext(
        expected_report_data=_report_data(args),
        node={"ak_public": ak},
        reference={"boot_pcrs": _load_boot_pcrs(args.boot_pcrs)},
    )
    try:
        result = Tpm2Verifier().verify(evidence, context)
    except MalformedEvidence as exc:
        print(f"attest: malformed evidence: {exc}", file=sys.stderr)
        return 1
    if _wants_json(args):
        print(json.dumps(_result_json(result), sort_keys=True, indent=2))
    else:
        print("VERIFIED" if result.ok else "REFUSED")
        for f in result.failures:
            print(f"  {f.severity} {f.id}: {f.message}")
        if result.claims:
            _print_claims(dict(result.claims))
    return 0 if result.ok else 1


def _expected_params(args: argparse.Namespace) -> dict[str, Any]:
    """The tenant's reference values for the doctor: ``--expected FILE`` (a JSON or YAML
    object of policy params) and ``--expected-code-digest`` (allowed_code_digests)."""
    given: dict[str, Any] = {}
    if args.expected:
        import yaml

        try:
            data = yaml.safe_load(Path(args.expected).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"--expected {args.expected}: {exc}") from None
        if not isinstance(data, dict):
            raise UsageError(f"--expected {args.expected}: must be an object of policy params")
        given.update(data)
    if args.expected_code_digest:
        for digest in args.expected_code_digest:
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise UsageError(f"--expected-code-digest {digest!r}: must be 64 hex digits "
                                 "(as `attest code-digest` or `attest collect` print it)")
        given["allowed_code_digests"] = list(args.expected_code_digest)
    return given


def cmd_doctor(args: argparse.Namespace) -> int:
    from attest.doctor import check_rules, hardware_sections

    claims = _claims(args)
    hardware = hardware_sections(Path(args.root))
    report: dict[str, Any] = {"claims": claims, "hardware": [h.to_dict() for h in hardware]}
    if not _wants_json(args):
        print("This node's facts (what its tpm2 evidence would claim):")
        _print_claims(claims)
        print("\nCPU TEE and GPU (what this machine offers; judged by the broker's verifiers):")
        for h in hardware:
            print(f"  {h.section:<8} {h.name:<13} {'present' if h.present else 'not present'}"
                  f"  ({h.detail})")
    if not args.policy:
        if _wants_json(args):
            print(json.dumps(report, sort_keys=True, indent=2))
        return 0
    from attest.policy import Policy, PolicyError

    try:
        policy = Policy.from_file(args.policy)
        rules = check_rules(policy, claims, _expected_params(args))
    except (OSError, PolicyError) as exc:
        raise UsageError(f"--policy {args.policy}: {exc}") from None
    failed = [r for r in rules if r.status == "fail"]
    unchecked = [r for r in rules if r.status == "not checked"]
    report["policy"] = {"name": policy.name, "allowed": None if unchecked else not failed,
                        "rules": [r.to_dict() for r in rules]}
    if _wants_json(args):
        print(json.dumps(report, sort_keys=True, indent=2))
    else:
        head = (f"{len(failed)} rule(s) would fail" if failed
                else "every rule passes" if not unchecked else "no checked rule fails")
        if unchecked:
            head += f"; {len(unchecked)} not checked here (the broker decides them)"
        print(f"\npolicy {policy.name}: {head}")
        for r in rules:
            print(f"  {r.status.upper() if r.status != 'not checked' else 'NOT CHECKED'} "
                  f"{r.name}: {r.reason}")
            if r.status == "fail" and r.fix and r.fix not in r.reason:
                print(f"       fix: {r.fix}")
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attest",
        description="Node attestation: hardening facts, TPM 2.0 evidence, verification.",
    )
    add_version(p)
    add_format(p, top=True)
    sub = p.add_subparsers(dest="command", required=True)

    def facts_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
        add_format(sp)
        sp.add_argument("--root", default="/", help="read /proc and /sys under this directory")
        sp.add_argument("--no-gpu", action="store_true", help="do not ask nvidia-smi")

    def binding_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--nonce", help="the broker's 32-byte challenge nonce, hex")
        sp.add_argument("--session-id", help="the broker's session id")
        sp.add_argument("--node-key", help="the node's one-time public key, hex")
        sp.add_argument("--report-data", help="the 32-byte qualifying data itself, hex")

    c = sub.add_parser("collect", help="print this node's facts and code digest",
                       description="Print hardening facts and the trainer code digest; with "
                       "--evidence, also measure them into PCR 23 and write a tpm2 quote.")
    facts_options(c)
    c.add_argument("--evidence", metavar="OUT", help="write tpm2 evidence to this file")
    c.add_argument("--tcti", help="TPM to quote with: device:/dev/tpmrm0 or "
                   "swtpm:host=127.0.0.1,port=N")
    binding_options(c)
    c.set_defaults(func=cmd_collect)

    v = sub.add_parser("verify", help="verify a tpm2 evidence file offline",
                       description="Verify tpm2 evidence as the broker does: AK signature, "
                       "nonce binding, PCR digest, boot PCRs, event-log replay.")
    v.add_argument("evidence", help="tpm2 evidence file")
    v.add_argument("--ak", required=True, help="the node's enrolled AK public key (PEM)")
    v.add_argument("--boot-pcrs", help='JSON {"0": "<sha256 hex>", ...} reference boot PCRs '
                   "(without it the boot check fails closed)")
    v.add_argument("--json", action="store_true", help="print JSON")
    add_format(v)
    binding_options(v)
    v.set_defaults(func=cmd_verify)

    d = sub.add_parser("doctor", help="which policy rules this node would fail, and fixes",
                       description="Show this node's facts, its CPU TEE and GPU (present "
                       "or not present), and, with --policy, every rule of that policy: PASS, "
                       "FAIL with the fix, or NOT CHECKED when it needs verified evidence or a "
                       "reference value the node does not have.")
    facts_options(d)
    d.add_argument("--policy", help="policy YAML file (e.g. policies/production.yaml)")
    d.add_argument("--expected-code-digest", action="append", metavar="HEX",
                   help="a trainer code digest the tenant approved (repeatable); without it "
                   "the code rule is not checked")
    d.add_argument("--expected", metavar="FILE",
                   help="JSON/YAML object of the tenant's reference values (policy params, "
                   'e.g. {"allowed_code_digests": [...], "allowed_image_digests": [...]})')
    d.set_defaults(func=cmd_doctor)

    cd = sub.add_parser(
        "code-digest", help="the code digest of an environment, computed offline",
        description="Measure every file a trainer run from the Python environment ENV "
        "(a virtual environment or installation prefix) can execute and print the digest a "
        "policy pins (params.allowed_code_digests). Runs nothing from ENV. With --root, ENV "
        "is a path inside an unpacked image directory. --write stores the manifest as "
        "ENV/ct-code-manifest, which `trainer --attest` enforces (do it last when building "
        "the image).")
    cd.add_argument("env", nargs="?", help="environment directory (default: this one's)")
    cd.add_argument("--root", default="/", help="image directory ENV lies in (default /)")
    cd.add_argument("--write", action="store_true", help="store ENV/ct-code-manifest")
    cd.add_argument("--manifest", action="store_true", help="print the manifest itself")
    add_format(cd)
    cd.set_defaults(func=cmd_code_digest)

    sw = sub.add_parser("swtpm", help="development software TPMs (swtpm)").add_subparsers(
        dest="action", required=True)
    c = sw.add_parser("create", help="create a development TPM with its EK CA",
                      description="Create DIR/state (swtpm TPM state with an RSA-2048 EK "
                      "whose certificate a local EK CA signs, in NV like a real TPM's) and "
                      "write the CA's certificates to DIR/ek-root.pem and "
                      "DIR/ek-intermediates.pem for broker.yaml's ek_roots and "
                      "ek_intermediates. Development only: never for real data.")
    c.add_argument("dir", help="directory for the TPM (created)")
    c.add_argument("--ek-ca", help="EK CA directory to use or create (default DIR/ek-ca); "
                   "give the same one to several TPMs so one ek_roots entry covers them")
    c.add_argument("--force", action="store_true", help="replace an existing TPM state")
    add_format(c)
    c.set_defaults(func=cmd_swtpm_create)
    r = sw.add_parser("run", help="serve a development TPM on 127.0.0.1 until stopped")
    r.add_argument("dir", help="directory given to `attest swtpm create`")
    add_format(r)
    r.set_defaults(func=cmd_swtpm_run)

    ak = sub.add_parser("ak", help="the node's attestation key").add_subparsers(
        dest="action", required=True)
    e = ak.add_parser("export", help="print the AK public key as PEM",
                      description="Read the attestation key (the one `kms-broker node enrol` "
                      "enrols) from the TPM and print it as PEM: the --ak of `attest verify` "
                      "and `kms-broker policy test`.")
    e.add_argument("--tcti", required=True, help="device:/dev/tpmrm0 or "
                   "swtpm:host=127.0.0.1,port=N")
    e.add_argument("--ek-type", default="EK-RSA2048", choices=["EK-RSA2048", "EK-ECC256"])
    e.add_argument("--out", help="write the PEM to this file instead of stdout")
    add_format(e)
    e.set_defaults(func=cmd_ak_export)
    add_completion(sub, p)
    return p


def cmd_code_digest(args: argparse.Namespace) -> int:
    import hashlib
    import os

    from attest.code_digest import MANIFEST_NAME, CodeSetError, environment_manifest

    try:
        manifest = environment_manifest(args.env, root=args.root)
    except (CodeSetError, OSError) as exc:
        raise UsageError(str(exc)) from None
    if args.write:
        env = args.env or sys.prefix
        target = os.path.join(args.root, env.lstrip("/"), MANIFEST_NAME) \
            if args.root != "/" else os.path.join(os.path.realpath(env), MANIFEST_NAME)
        with open(target, "wb") as f:
            f.write(manifest)
    digest = hashlib.sha256(manifest).hexdigest()
    if args.manifest:
        sys.stdout.buffer.write(manifest)
    elif _wants_json(args):
        emit_json({"code_digest": digest, "env": args.env or sys.prefix, "root": args.root,
                   "written": bool(args.write), "manifest_bytes": len(manifest)})
    else:
        print(digest)
    return 0


def cmd_swtpm_create(args: argparse.Namespace) -> int:
    """A development TPM: swtpm state with an EK certificate signed by a local EK CA, and
    the CA's certificates for the broker's ``ek_roots``/``ek_intermediates``."""
    from attest.swtpm import LocalEkCa, SwtpmError, manufacture

    directory = Path(args.dir)
    state = directory / "state"
    if state.exists() and any(state.iterdir()) and not args.force:
        raise UsageError(f"{state} already holds a TPM; pass --force to replace it")
    ca_dir = Path(args.ek_ca) if args.ek_ca else directory / "ek-ca"
    try:
        ca = LocalEkCa.create(ca_dir)
        manufacture(state, ca)
    except SwtpmError as exc:
        raise RuntimeFailure(f"swtpm: {exc}") from None
    root, inter = directory / "ek-root.pem", directory / "ek-intermediates.pem"
    root.write_bytes(ca.root_cert_pem)
    inter.write_bytes(ca.issuer_cert_pem)
    doc = {"state_dir": str(state), "ek_ca_dir": str(ca_dir), "ek_root": str(root),
           "ek_intermediates": str(inter),
           "run": f"attest swtpm run {directory}"}
    if _wants_json(args):
        emit_json(doc)
    else:
        print(f"TPM state in {state} (RSA-2048 EK certified by the EK CA in {ca_dir})")
        print(f"broker.yaml: ek_roots: [{root}]  ek_intermediates: [{inter}]")
        print(f"run it: attest swtpm run {directory}   (prints its TCTI)")
    return 0


def cmd_swtpm_run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from attest.swtpm import Swtpm, SwtpmError

    state = Path(args.dir) / "state"
    if not state.is_dir():
        raise UsageError(f"{state} does not exist: create it with `attest swtpm create "
                         f"{args.dir}`")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with Swtpm(state).start() as tpm:
            if _wants_json(args):
                emit_json({"tcti": tpm.tcti, "port": tpm.port, "pid": tpm.pid})
            else:
                print(f"swtpm serving {state}; TCTI {tpm.tcti}  (Ctrl-C stops it)",
                      flush=True)
            stop.wait()
    except SwtpmError as exc:
        raise RuntimeFailure(f"swtpm: {exc}") from None
    return 0


def cmd_ak_export(args: argparse.Namespace) -> int:
    """The node's AK (the one `kms-broker node enrol` enrols) as PEM."""
    from cryptography.hazmat.primitives import serialization

    from attest.tpm2.node import TpmError, TpmNode
    from attest.tpm2.verifier import load_ak

    try:
        with TpmNode(args.tcti, ek_type=args.ek_type) as tpm:
            public = tpm.ak_public()
    except TpmError as exc:
        raise RuntimeFailure(f"TPM: {exc}") from None
    pem = load_ak(public).public_bytes(serialization.Encoding.PEM,
                                       serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    if args.out:
        Path(args.out).write_text(pem)
    if _wants_json(args):
        emit_json({"pem": pem, "tpmt_public": public.hex(), "out": args.out})
    elif args.out:
        print(f"AK written to {args.out}", file=sys.stderr)
    else:
        print(pem, end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import os

    # tpm2-tss logs a failed TCTI connection itself (WARNING/ERROR lines on stderr) before
    # the one-line error below says the same; TSS2_LOG=all+warning (or debug) brings it back
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"attest: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeFailure as exc:
        print(f"attest: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("attest: error: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
