"""The confidential trainer: attested key release, in-memory decryption, DDP, shredding.

Public API (imported lazily so ``trainer check`` does not load torch)::

    from trainer import JobConfig, run_job, StaticKeySource, AttestedKeySource
    result = run_job(JobConfig.from_yaml("job.yaml"), key_source)
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "AttestationDenied",
    "AttestedKeySource",
    "CheckpointStore",
    "ConfigError",
    "JobConfig",
    "JobResult",
    "KeyHandle",
    "KeySource",
    "Shredder",
    "StaticKeySource",
    "run_job",
]

_WHERE = {
    "AttestationDenied": "trainer.keysource",
    "AttestedKeySource": "trainer.attested",
    "CheckpointStore": "trainer.checkpoint",
    "ConfigError": "trainer.config",
    "JobConfig": "trainer.config",
    "JobResult": "trainer.train",
    "KeyHandle": "trainer.keysource",
    "KeySource": "trainer.keysource",
    "Shredder": "trainer.shred",
    "StaticKeySource": "trainer.keysource",
    "run_job": "trainer.train",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
