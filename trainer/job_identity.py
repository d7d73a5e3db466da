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
measure the same job.

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

__all__ = ["DOMAIN", "job_claims", "job_digest", "job_identity"]

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
