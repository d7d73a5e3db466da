"""What each ``job.yaml`` key means: the source of docs/reference/job-yaml.md.

``scripts/gen_config_docs.py`` writes the page from :func:`entries`: key names, types,
defaults and which keys are required come from the dataclasses of :mod:`trainer.config`
(:class:`~trainer.config.JobConfig` and its sections), the descriptions from
:data:`DESCRIPTIONS`. tests/docs/test_reference.py fails when a dataclass gains a field
this table does not describe, when the table describes a field that no longer exists, or
when the page on disk differs from what the definitions generate.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

__all__ = ["DESCRIPTIONS", "Entry", "entries"]


class Entry(NamedTuple):
    key: str
    kind: str
    default: str
    description: str


DESCRIPTIONS: dict[str, str] = {
    "job_id": "The job's id: grants name it, and the brokers bind it into every session.",
    "tenant_id": "The tenant whose dataset this job trains on.",
    "dataset.id": "The dataset id given to `kms-broker dataset upload --dataset`.",
    "dataset.key_version": "The dataset key version to ask the brokers for. Default: the "
                           "version whose manifest the brokers have on record (the last "
                           "upload registered).",
    "dataset.manifest": "The manifest's object name that `kms-broker dataset upload` printed. "
                        "Default: the one the brokers have on record (each Challenge names "
                        "the dataset and the broker answers with it); when given it must "
                        "match theirs (else exit 8). Either way the trainer checks the "
                        "manifest is in the store before it asks for any key (exit 8).",
    "dataset.store": "Where the sealed objects are: a local directory (or `file://` URI), or "
                     "`s3://BUCKET/PREFIX` (docs/s3.md).",
    "checkpoint.dir": "Directory for the encrypted checkpoints (sealed with a key derived "
                      "from the dataset key; never plaintext).",
    "checkpoint.interval": "Steps between checkpoints; the last step always checkpoints.",
    "checkpoint.keep_last": "How many checkpoints to keep.",
    "brokers": "Every broker holding a share, in share order (the order `dataset upload` "
               "used); all of them must release for the key to exist.",
    "brokers[].address": "`host:port` (or `unix:PATH`) of the broker. Give this or "
                         "`addresses`.",
    "brokers[].addresses": "A replica set of the broker (replicas on one PostgreSQL database "
                           "and HSM token): its `host:port` addresses, tried in turn; an "
                           "unavailable replica is left for the next within a deadline "
                           "(failover).",
    "brokers[].ca": "PEM of the CA that issued the broker's certificate.",
    "brokers[].cert": "This node's client certificate (role node, its node id).",
    "brokers[].key": "This node's TLS private key.",
    "brokers[].server_name": "TLS name of the broker when it differs from the address's host.",
    "attestation": "How this node proves itself; required by `trainer --attest` (the only way "
                   "the trainer obtains the key).",
    "attestation.node_id": "This node's enrolled id (`kms-broker node enrol NODE`); "
                           "`trainer --node-id` overrides it.",
    "attestation.tcti": "The TPM: `device:/dev/tpmrm0`, `swtpm:host=H,port=P`, `mssim:...` "
                        "or `tabrmd:...`.",
    "attestation.evidence": "`tpm2`: a TPM quote. `composite`: a confidential GPU node's CPU "
                            "TEE report plus one NVIDIA GPU report per GPU.",
    "model.name": "`tiny-gpt`, `classifier`, or `module:factory` in a measured project "
                  "package (under --attest).",
    "model.params": "Keyword arguments for the model (numbers, strings, booleans).",
    "optimizer.lr": "AdamW peak learning rate.",
    "optimizer.weight_decay": "AdamW weight decay.",
    "optimizer.betas": "AdamW betas, two numbers below 1.",
    "optimizer.eps": "AdamW epsilon.",
    "schedule.warmup_steps": "Linear warm-up steps to `optimizer.lr`.",
    "schedule.min_lr_ratio": "Cosine decay ends at `lr * min_lr_ratio` on the last step.",
    "steps": "Optimizer steps to train.",
    "batch_size": "Samples per rank per micro-step.",
    "grad_accum": "Micro-steps per optimizer step.",
    "clip": "Maximum gradient norm; 0 disables clipping.",
    "precision": "`bf16`, `fp16` (with a gradient scaler) or `fp32`.",
    "seq_len": "Tokens per sample (token models).",
    "seed": "Random seed of model initialisation and data order.",
    "log_interval": "Steps between progress log lines (rank 0).",
    "prefetch_depth": "Shards decrypted ahead of the training loop.",
    "lease_poll_interval": "Seconds between lease renewal checks and revocation polls.",
    "metrics_port": "Rank 0 serves Prometheus metrics on this port when set.",
    "device": "`auto` (CUDA when available), `cpu` or `cuda`.",
    "threads": "CPU threads per process (`torch.set_num_threads`); `trainer --threads` "
               "overrides it. Default: the cores this process may run on, divided among the "
               "node's local ranks.",
}


def _yaml(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return str(value)


def _rows(cls: type, prefix: str) -> list[tuple[str, str, str]]:
    from trainer.config import _NESTED, BrokerConfig

    rows: list[tuple[str, str, str]] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.default is not dataclasses.MISSING:
            default = _yaml(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            made = f.default_factory()
            default = "see below" if dataclasses.is_dataclass(made) else _yaml(made)
        else:
            default = "required"
        kind = str(f.type).replace("Precision", "bf16 | fp16 | fp32") \
            .replace("Device", "auto | cpu | cuda").replace("tuple[str, ...]", "list[str]")
        if not prefix and f.name in _NESTED:
            rows.append((key, "section", default))
            rows.extend(_rows(_NESTED[f.name], f"{key}."))
        elif not prefix and f.name == "brokers":
            rows.append((key, "list", default))
            rows.extend(_rows(BrokerConfig, "brokers[]."))
        else:
            rows.append((key, kind, default))
    return rows


def entries() -> list[Entry]:
    """The page's rows in definition order; a field without a description raises KeyError."""
    from trainer.config import JobConfig

    rows = _rows(JobConfig, "")
    keys = [key for key, _, _ in rows]
    missing = [k for k in keys if k not in DESCRIPTIONS and k not in _SECTIONS]
    if missing:
        raise KeyError(f"job.yaml keys without a description: {', '.join(missing)}")
    stale = sorted(set(DESCRIPTIONS) - set(keys))
    if stale:
        raise KeyError(f"described job.yaml keys that no longer exist: {', '.join(stale)}")
    return [Entry(key, kind, default, DESCRIPTIONS.get(key, _SECTIONS.get(key, "")))
            for key, kind, default in rows]


_SECTIONS = {
    "dataset": "The sealed dataset to train on.",
    "checkpoint": "Encrypted checkpoints.",
    "model": "The model to train.",
    "optimizer": "AdamW settings.",
    "schedule": "Learning-rate schedule.",
}
