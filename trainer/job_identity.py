"""Job identity: what a job trains, as claims measured into the evidence.

The **job identity document** is built from the validated job (``JobConfig``), keeping what
decides what is trained and what comes out, and leaving out what is local to one node (broker
addresses and TLS files, the attestation section, store and checkpoint directories, metrics
port, device, logging, prefetch and lease-poll settings), so every node of one job measures
the same document::

    {"job_id", "tenant_id",
     "dataset": {"id", "key_version", "manifest"},
     "model": {"name", "params"},
     "optimizer": {"lr", "weight_decay", "betas", "eps"},
     "schedule": {"warmup_steps", "min_lr_ratio"},
     "steps", "batch_size", "grad_accum", "clip", "precision", "seq_len", "seed",
     "checkpoint": {"interval", "keep_last"}}

``dataset.key_version`` and ``dataset.manifest`` are the values the job runs with: when the
job file leaves them out, those the brokers have on record (``trainer.dataset_check``,
resolved before the evidence is made), so a job file that names them and one that does not
measure the same job. :func:`as_measured` fills them in the same way for a tenant who
computes the digest offline (``trainer job-digest --manifest NAME --key-version N``), and
refuses to guess: without them the digest is not the one any node would measure.

**Canonical form**: JSON with keys sorted, no whitespace (``","`` and ``":"``), ASCII only
(``\\uXXXX`` escapes), tuples as arrays, numbers as Python's ``json`` writes them (so a YAML
``3e-3`` and ``0.003`` are the same job: the digest is over values, not over the file's
spelling, comments or key order). **Job digest** = SHA-256(b"ct-job-identity/v1\\x00" ||
canonical JSON), lowercase hex.

Claims (agreed names, read by policies as ``claims.job.*``): ``job.digest``, ``job.id``,
``job.tenant``, ``job.dataset``, ``job.key_version``, ``job.model``, ``job.precision``,
``job.steps``, ``job.batch_size``, ``job.grad_accum``, ``job.seq_len``,
``job.checkpoint.interval``, ``job.checkpoint.keep_last``.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.config import JobConfig

__all__ = ["DOMAIN", "as_measured", "job_claims", "job_digest", "job_identity"]

DOMAIN = b"ct-job-identity/v1\x00"


def job_identity(config: JobConfig) -> dict[str, Any]:
    o, s, c = config.optimizer, config.schedule, config.checkpoint
    return {
        "job_id": config.job_id,
        "tenant_id": config.tenant_id,
        "dataset": {"id": config.dataset.id, "key_version": config.dataset.key_version,
                    "manifest": config.dataset.manifest},
        "model": {"name": config.model.name, "params": dict(config.model.params)},
        "optimizer": {"lr": o.lr, "weight_decay": o.weight_decay, "betas": list(o.betas),
                      "eps": o.eps},
        "schedule": {"warmup_steps": s.warmup_steps, "min_lr_ratio": s.min_lr_ratio},
        "steps": config.steps, "batch_size": config.batch_size,
        "grad_accum": config.grad_accum, "clip": config.clip, "precision": config.precision,
        "seq_len": config.seq_len, "seed": config.seed,
        "checkpoint": {"interval": c.interval, "keep_last": c.keep_last},
    }


def as_measured(config: JobConfig, *, manifest: str | None = None,
                key_version: int | None = None) -> JobConfig:
    """``config`` with the dataset's key version and manifest a node runs it with: those the
    job file names, else ``manifest``/``key_version`` (what the brokers have on record, as
    `kms-broker dataset upload` printed). ``ConfigError`` (naming the option) when one is
    neither in the job file nor given, or is given and differs from the job file's (a node
    runs such a job only where it agrees with the brokers, so only the file's value can be
    measured)."""
    from trainer.config import ConfigError
    from trainer.dataset_check import resolved

    d = config.dataset
    missing = [option for option, named, given in (("--manifest NAME", d.manifest, manifest),
                                                   ("--key-version N", d.key_version,
                                                    key_version))
               if named is None and given is None]
    if missing:
        fields = "/".join(m[2:].split()[0].replace("-", "_") for m in missing)
        raise ConfigError(
            f"the job file names no dataset.{fields}, "
            f"which a node takes from the brokers and measures: give {' and '.join(missing)} "
            f"(as `kms-broker dataset upload` printed them, or `kms-broker dataset list` "
            f"shows them for dataset {d.id})")
    for option, named, given in (("--manifest", d.manifest, manifest),
                                 ("--key-version", d.key_version, key_version)):
        if named is not None and given is not None and named != given:
            raise ConfigError(
                f"{option} {given} differs from the job file's "
                f"dataset.{option[2:].replace('-', '_')} {named} (a node runs this job only "
                f"with {named}); leave {option} out")
    try:
        return resolved(config, key_version=d.key_version or key_version,  # type: ignore[arg-type]
                        manifest=d.manifest or manifest)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise ConfigError(f"--manifest/--key-version: {exc}") from None


def canonical(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode()


def job_digest(config: JobConfig) -> str:
    return hashlib.sha256(DOMAIN + canonical(job_identity(config))).hexdigest()


def job_claims(config: JobConfig) -> dict[str, Any]:
    return {
        "job.digest": job_digest(config),
        "job.id": config.job_id,
        "job.tenant": config.tenant_id,
        "job.dataset": config.dataset.id,
        "job.key_version": config.dataset.key_version,
        "job.model": config.model.name,
        "job.precision": config.precision,
        "job.steps": config.steps,
        "job.batch_size": config.batch_size,
        "job.grad_accum": config.grad_accum,
        "job.seq_len": config.seq_len,
        "job.checkpoint.interval": config.checkpoint.interval,
        "job.checkpoint.keep_last": config.checkpoint.keep_last,
    }
