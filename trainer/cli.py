"""``trainer``: the composition root of the training node.

    trainer --attest --job JOB.yaml          train (also under torchrun)
    torchrun --nproc-per-node 2 -m trainer --attest --job JOB.yaml
    trainer check                            run the process-hardening self-check
    trainer validate --job JOB.yaml [--format json]   check a job file, print what it runs
    trainer job-digest --job JOB.yaml [--manifest NAME] [--key-version N] [--format json]
                                             the job digest and claims a node would measure
    trainer completion bash|zsh              shell completion script
    trainer --version

Exit codes: 0 ok, 1 failure, 2 usage or invalid job file, 3 key revoked (by a broker),
4 attestation denied, 5 code identity refused (trainer/guard.py), 6 a sealed message between
ranks failed authentication (forged, replayed, reordered, or a peer without the job key;
trainer/sealed_comm.py), 7 a broker could not be reached (an outage: at start, or the lease
ran out with no broker answering a renewal; never reported as a revocation), 128 + N when
stopped by signal N (143 SIGTERM, 130 SIGINT, 129 SIGHUP, 131 SIGQUIT), after shredding.
Under torchrun each worker exits that way; torchrun
itself forwards the signal to its workers, waits for them and exits 1 (torch elastic's own
status); ``python -m trainer.launch`` (the same agent, used by deploy/bin/node.py) exits
128 + N.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from attest.clikit import (
    add_format,
    add_version,
    completion_script,
    emit_json,
    quiet_grpc_core,
)
from trainer import signals
from trainer.config import ConfigError, JobConfig
from trainer.shred import EXIT_ATTESTATION_DENIED, EXIT_FAILURE, EXIT_OK

__all__ = ["main"]

EXIT_USAGE = 2

_DESCRIPTION = """\
Confidential training node. With --attest the trainer hardens itself (not dumpable, no core
dumps, umask 077, memory locked), proves the node to every key broker in the job (TPM quote
over its measured state and the digest of this trainer's code), receives the key shares
sealed to a one-time key, derives the dataset key in memory, and trains on shards that are
decrypted only in memory. It writes only encrypted checkpoints and shreds every key and
plaintext buffer on exit, on SIGTERM/SIGINT/SIGHUP/SIGQUIT and on revocation.
"""

_EPILOG = """\
commands:
  (none)      train the job given by --job (requires --attest)
  check       run the hardening self-check and print each check with how to fix it
              (--format json: one JSON document)
  validate    load and validate --job, check the files it names exist, print a summary
              (--format json: one JSON document), get no keys (exit 2 when something is
              missing)
  job-digest  print the job digest and the job claims (job.*) a node measures into its
              evidence for --job, without running anything: what a tenant pins in
              params.allowed_job_digests or a grant's job.digest (--format json: one
              JSON document). The digest covers the dataset's key version and manifest
              as the node runs them: a job file that leaves them to the brokers needs
              --manifest NAME (the name `kms-broker dataset upload` printed) and
              --key-version N (exit 2 when one is needed and missing, or differs from
              what the job file names). Needs none of the files the job names.
  completion  print a shell completion script: source <(trainer completion bash)

exit codes: 0 ok, 1 failure, 2 usage / invalid job, 3 key revoked, 4 attestation denied,
            5 code identity refused (something outside the measured code set would run),
            6 sealed channel between ranks failed authentication,
            7 broker unreachable (an outage, not a revocation: no key released,
              or the lease ran out while renewals could not reach a broker),
            8 dataset not found or not as the brokers have it on record (the manifest
              is not in the store, or the job names another manifest than the brokers
              registered): found before any key is released
            143 SIGTERM, 130 SIGINT, 129 SIGHUP, 131 SIGQUIT (128 + N, after shredding;
            under torchrun for each worker, and for `python -m trainer.launch` itself)
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trainer",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(p)
    p.add_argument("command", nargs="?", choices=("train", "check", "validate", "job-digest",
                                                   "completion"),
                   default="train", help="what to do (default: train)")
    p.add_argument("shell", nargs="?", choices=("bash", "zsh"), help=argparse.SUPPRESS)
    add_format(p, top=True)
    p.add_argument("--job", metavar="JOB.yaml",
                   help="the job file (keys: docs/reference/job-yaml.md)")
    p.add_argument("--attest", action="store_true",
                   help="obtain the dataset key by attested release from the job's brokers "
                        "(the only way this CLI obtains keys)")
    p.add_argument("--node-id", metavar="ID",
                   help="this node's enrolled id (overrides attestation.node_id in the job)")
    p.add_argument("--log-level", default=os.environ.get("TRAINER_LOG_LEVEL", "INFO"),
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="log verbosity (env TRAINER_LOG_LEVEL; default INFO)")
    p.add_argument("--log-format", default=os.environ.get("TRAINER_LOG_FORMAT", "text"),
                   choices=("text", "json"),
                   help="text lines or one JSON object per line (env TRAINER_LOG_FORMAT)")
    p.add_argument("--manifest", metavar="NAME",
                   help="job-digest: the dataset's manifest object name, when the job file "
                        "leaves it to the brokers")
    p.add_argument("--key-version", type=int, metavar="N",
                   help="job-digest: the dataset's key version, when the job file leaves it "
                        "to the brokers")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads per process (overrides the job's `threads`; default: "
                        "the cores this process may use, divided among the node's ranks)")
    return p


def setup_logging(level: str, fmt: str = "text") -> None:
    """Rank 0 logs at ``level``; other ranks log warnings, plus how they got the key (local
    rank 0 attests for its node, the others take the key from it) and their shred report
    (each rank shreds for itself)."""
    from kms_broker import logs

    rank = os.environ.get("RANK", "0")
    logs.setup(level=level if rank == "0" else "WARNING", fmt=fmt, prefix=f"rank {rank}")
    if rank != "0":
        for name in ("trainer.attest", "trainer.shred"):
            logging.getLogger(name).setLevel(level)


def default_threads() -> int:
    """This process's share of the cores it may run on: torch's default (every core for
    every rank) oversubscribes a small or shared machine several times over."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, local_ranks))


def _check(*, json_output: bool = False) -> int:
    from trainer.hardening import failed_required, format_checks, harden_process, self_check

    result = harden_process()
    checks = self_check()
    if json_output:
        failed = failed_required(checks)
        emit_json({"passed": not failed, "mlockall": bool(result.mlockall),
                   "checks": [{"name": c.name, "ok": c.ok, "required": c.required,
                               "detail": c.detail, "fix": c.fix} for c in checks]})
        return EXIT_FAILURE if failed else EXIT_OK
    print(format_checks(checks))
    if not result.mlockall:
        print(f"note: mlockall refused ({result.mlockall_error})")
    failed = failed_required(checks)
    if failed:
        print(f"self-check FAILED: {', '.join(c.name for c in failed)}", file=sys.stderr)
        return EXIT_FAILURE
    print("self-check passed")
    return EXIT_OK


def _load(parser: argparse.ArgumentParser, job: str | None) -> JobConfig:
    if not job:
        parser.error("--job JOB.yaml is required")
    try:
        return JobConfig.from_yaml(job)
    except ConfigError as exc:
        print(f"trainer: invalid job file: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def main(argv: list[str] | None = None) -> int:
    signals.start()  # the console script's first act: mask before any thread (trainer/signals.py)
    argv = quiet_grpc_core(argv)  # gRPC core's own log lines only when asked (attest/clikit.py)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.attest and args.command == "train":
        refused = _enter_code_guard()
        if refused is not None:
            return refused
    if args.command == "completion":
        sys.stdout.write(completion_script(parser, args.shell or "bash"))
        return EXIT_OK
    setup_logging(args.log_level, args.log_format)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.command == "check":
        return _check(json_output=args.format == "json")
    config = _load(parser, args.job)
    if args.command == "job-digest":
        return _job_digest(config, args.manifest, args.key_version,
                           json_output=args.format == "json")
    if args.manifest is not None or args.key_version is not None:
        parser.error("--manifest and --key-version belong to `trainer job-digest`")
    if args.command == "validate":
        if args.format == "json":
            missing = config.missing_files()
            emit_json({**_job_summary(config), "missing": list(missing)})
            return EXIT_USAGE if missing else EXIT_OK
        version = (f"v{config.dataset.key_version}" if config.dataset.key_version
                   else "(key version and manifest from the brokers)")
        print(f"job {config.job_id} (tenant {config.tenant_id}): dataset {config.dataset.id} "
              f"{version}, model {config.model.name}, {config.steps} steps, "
              f"batch {config.batch_size}x{config.grad_accum}, {config.precision}, "
              f"{len(config.brokers)} broker(s)")
        missing = config.missing_files()
        for problem in missing:
            print(f"trainer: invalid job file: {problem}", file=sys.stderr)
        return EXIT_USAGE if missing else EXIT_OK
    if not args.attest:
        print(
            "trainer: refusing to train without --attest: the dataset key is only ever "
            "released to an attested node, and this command has no other way to obtain it. "
            "Run `trainer --attest --job JOB.yaml` on an enrolled node.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    unmeasured = _unmeasured_model_code(config.model.name)
    if unmeasured:
        print(f"trainer: refusing to train: {unmeasured}", file=sys.stderr)
        return EXIT_USAGE
    refused = _enter_code_guard(config.model.name.partition(":")[0]
                                if ":" in config.model.name else None)
    if refused is not None:
        return refused
    return _train(config, args.node_id, args.threads or config.threads or default_threads())


def _job_digest(config: JobConfig, manifest: str | None, key_version: int | None, *,
                json_output: bool) -> int:
    """``trainer job-digest``: the job identity a node measures (trainer/job_identity.py),
    with the dataset's key version and manifest as the node would run them."""
    from trainer.job_identity import as_measured, job_claims, job_digest, job_identity

    try:
        measured = as_measured(config, manifest=manifest, key_version=key_version)
    except ConfigError as exc:
        print(f"trainer: job-digest: {exc}", file=sys.stderr)
        return EXIT_USAGE
    claims = job_claims(measured)
    if json_output:
        emit_json({"job_digest": job_digest(measured), "claims": claims,
                   "identity": job_identity(measured)})
        return EXIT_OK
    width = max(len(name) for name in claims)
    for name, value in claims.items():
        print(f"{name:<{width}}  {value}")
    return EXIT_OK


def _job_summary(config: JobConfig) -> dict[str, object]:
    """What ``validate --format json`` prints: the job's ids and what it would run."""
    return {
        "job_id": config.job_id, "tenant_id": config.tenant_id,
        "dataset": {"id": config.dataset.id, "key_version": config.dataset.key_version,
                    "manifest": config.dataset.manifest, "store": str(config.dataset.store)},
        "model": config.model.name, "steps": config.steps, "batch_size": config.batch_size,
        "grad_accum": config.grad_accum, "precision": config.precision,
        "brokers": [list(b.replicas) for b in config.brokers],
    }


def denial_lines(exc: Exception, reasons: tuple[str, ...]) -> list[str]:
    """``trainer: attestation denied ...`` with each failed rule once: the broker's message
    names the first failed rule and the rules list names it again, and two brokers may deny
    for the same reasons."""
    unique = list(dict.fromkeys(r for r in reasons if r))
    head = str(exc)
    for reason in unique:  # the head keeps the rule's name, the list below says why
        name = reason.split(":", 1)[0]
        head = head.replace(f"{name}: {name}", name).replace(reason, name)
        if head.endswith(f": {name}"):
            head = head[: -len(name) - 2]
    return [f"trainer: attestation denied: {head}", *(f"  - {r}" for r in unique)]


def _enter_code_guard(model_module: str | None = None) -> int | None:
    """Under --attest only measured code runs (trainer/guard.py); a refusal exits 5 before
    any broker is asked for anything. ``model_module``: the job's model factory, checked
    against the measured set before any key is requested."""
    from trainer.guard import (
        EXIT_CODE_IDENTITY,
        CodeIdentityRefused,
        enter,
        require_measured_module,
    )

    try:
        enter()
        if model_module:
            require_measured_module(model_module)
    except CodeIdentityRefused as exc:
        print(f"trainer: code identity refused: {exc}", file=sys.stderr)
        return EXIT_CODE_IDENTITY
    return None


def _unmeasured_model_code(name: str) -> str | None:
    """A model factory runs inside the process that holds the dataset key and is named by the
    job file, so with --attest it must be a module of a project package: any measured
    callable (``subprocess:run``) would otherwise be one job file away. The guard then checks
    the module itself against the measured code set (``_enter_code_guard``)."""
    from attest.code_digest import PROJECT_PACKAGES

    module, sep, _ = name.partition(":")
    if not sep or module.split(".")[0] in PROJECT_PACKAGES:
        return None
    return (
        f"model.name {name!r} names code outside the measured packages "
        f"({', '.join(PROJECT_PACKAGES)}); a model factory runs beside the dataset key, so "
        f"with --attest it must live in one of them (for example trainer.models_custom), "
        f"where the trainer code digest the tenant approved covers it"
    )


def _train(config: JobConfig, node_id: str | None, threads: int) -> int:
    import torch

    from trainer.attested import AttestedKeySource
    from trainer.dataset_check import EXIT_DATASET, DatasetMismatch
    from trainer.guard import EXIT_CODE_IDENTITY, CodeIdentityRefused
    from trainer.keysource import AttestationDenied, BrokersUnreachable, KeySourceUnavailable
    from trainer.shred import EXIT_BROKER_UNREACHABLE
    from trainer.train import DatasetMissing, HardeningFailed, run_job

    log = logging.getLogger("trainer")
    torch.set_num_threads(threads)
    log.info("using %d CPU thread(s) per process", threads)
    try:
        source = AttestedKeySource(config, node_id=node_id)
        result = run_job(config, source, require_hardening=True)
    except HardeningFailed as exc:
        print(f"trainer: refusing to start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except CodeIdentityRefused as exc:
        print(f"trainer: code identity refused: {exc}", file=sys.stderr)
        return EXIT_CODE_IDENTITY
    except AttestationDenied as exc:
        print("\n".join(denial_lines(exc, exc.reasons)), file=sys.stderr)
        return EXIT_ATTESTATION_DENIED
    except BrokersUnreachable as exc:
        print(f"trainer: broker unreachable (an outage, not a revocation): {exc}; no key was "
              f"released. Retry when the broker is back.", file=sys.stderr)
        return EXIT_BROKER_UNREACHABLE
    except DatasetMissing as exc:
        print(f"trainer: dataset not found, no key requested: {exc}", file=sys.stderr)
        return EXIT_DATASET
    except DatasetMismatch as exc:
        print(f"trainer: dataset mismatch, no key requested: {exc}", file=sys.stderr)
        return EXIT_DATASET
    except (KeySourceUnavailable, ConfigError) as exc:
        print(f"trainer: cannot obtain the dataset key: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:
        log.error("training failed: %s: %s", type(exc).__name__, exc)
        return EXIT_FAILURE
    log.info("done: %d steps, %.1f samples/s", result.steps_done, result.samples_per_s)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
