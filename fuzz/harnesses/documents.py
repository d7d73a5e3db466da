"""YAML documents from outside: tenant policies, job files, docker-compose.yml.

* ``policy_yaml``: ``Policy.from_yaml`` (the text a tenant's PutPolicy carries: a protobuf
  string, so valid UTF-8; other bytes are skipped), then ``evaluate`` over typical claims and
  over none. Expected error: ``PolicyError``.
* ``job_yaml``: ``JobConfig.from_yaml`` over a job file (``trainer validate`` and ``trainer
  --attest`` read it). Expected error: ``ConfigError``.
* ``compose_spec``: ``compose.spec.load_project`` over a compose file with the harness's
  variables. Expected error: ``ComposeFileError``.

Files are written to one temporary directory per process, as the parsers read paths.

Seeds: policies/*.yaml, the project's docker-compose.yml, the job file the trainer tests
write, and small variants.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

from fuzz.base import Harness, repo_root
from fuzz.mutators import yaml_mutator

__all__ = ["HARNESSES"]

_TMP: list[Path] = []


def _file(name: str, data: bytes) -> Path:
    if not _TMP:
        _TMP.append(Path(tempfile.mkdtemp(prefix="fuzz-docs-")))
    path = _TMP[0] / name
    path.write_bytes(data)
    return path


_CLAIMS = {
    "evidence.kind": "tpm2", "evidence.verified": True, "node.ksm.enabled": False,
    "node.swap.enabled": False, "node.core_dump.limit": 0, "code.digest": "ab" * 32,
    "job.model": "tiny-gpt", "job.steps": 60, "job.digest": "cd" * 32,
}


def _policy(data: bytes) -> None:
    from attest.policy import Policy

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # a protobuf string field carries only UTF-8: the decoder refuses the rest
    policy = Policy.from_yaml(text)
    policy.evaluate(_CLAIMS)
    policy.evaluate({})


def _policy_seeds() -> Iterator[tuple[str, bytes]]:
    for p in sorted((repo_root() / "policies").glob("*.yaml")):
        yield p.stem, p.read_bytes()
    yield "minimal", (b"name: p\nversion: 1\nparams: {n: 5}\nrules:\n  - name: r\n"
                      b"    expr: claims.job.steps < params.n\n    reason: too many steps\n")


def _job(data: bytes) -> None:
    from trainer.config import JobConfig

    JobConfig.from_yaml(_file("job.yaml", data))


_JOB = b"""\
job_id: job-1
tenant_id: acme
dataset: {id: corpus, key_version: 1, manifest: m-1, store: /tmp/store}
checkpoint: {dir: /tmp/ckpt, interval: 10, keep_last: 2}
model:
  name: tiny-gpt
  params: {layers: 2, d_model: 64, heads: 4}
optimizer: {lr: 0.003, weight_decay: 0.05}
schedule: {warmup_steps: 5, min_lr_ratio: 0.1}
steps: 60
batch_size: 8
seq_len: 64
precision: bf16
log_interval: 5
lease_poll_interval: 0.2
attestation: {node_id: node-a, tcti: "swtpm:host=127.0.0.1,port=2321", evidence: tpm2}
"""


def _job_seeds() -> Iterator[tuple[str, bytes]]:
    yield "job", _JOB
    yield "job-no-attestation", _JOB[: _JOB.index(b"attestation:")]


def _compose(data: bytes) -> None:
    from compose.spec import load_project

    load_project(_file("docker-compose.yml", data),
                 variables={"CT_ROOT": "/srv/ct", "PORT": "7000", "TENANT_ID": "acme"})


def _compose_seeds() -> Iterator[tuple[str, bytes]]:
    yield "project", (repo_root() / "docker-compose.yml").read_bytes()
    yield "small", (b"name: demo\nservices:\n  one:\n    image: x\n    command: [python, -m, "
                    b"thing, --port, '${PORT}']\n    depends_on: {two: {condition: "
                    b"service_started}}\n    healthcheck: {test: [CMD, 'true'], interval: 1m30s}"
                    b"\n  two:\n    image: x\n    environment: {A: '1', B: null}\n")


def _harnesses() -> list[Harness]:
    from attest.policy import PolicyError
    from compose.errors import ComposeFileError
    from trainer.config import ConfigError

    return [
        Harness("policy_yaml", "attest.policy.Policy.from_yaml + evaluate (YAML, CEL)",
                _policy, (PolicyError,), _policy_seeds, max_len=16384, mutator=yaml_mutator()),
        Harness("job_yaml", "trainer.config.JobConfig.from_yaml", _job, (ConfigError,),
                _job_seeds, max_len=8192, mutator=yaml_mutator()),
        Harness("compose_spec", "compose.spec.load_project (docker-compose.yml)", _compose,
                (ComposeFileError,), _compose_seeds, max_len=16384, mutator=yaml_mutator()),
    ]


HARNESSES = _harnesses
