"""Job configuration: typed, frozen, keyword-only, validated once at the edge.

A job is described by one YAML document (``JobConfig.from_yaml(path)``). Unknown keys are
rejected, every value is checked in ``__post_init__`` and errors name the offending field
(``optimizer.lr must be > 0, got -1``). The objects are then passed down; nothing reads the
YAML again. Secrets never appear here: only dataset ids, paths and broker addresses.

Example::

    job_id: job-7
    tenant_id: acme
    dataset: {id: corpus, store: /data/store}
    # key_version and manifest are optional: the brokers say which manifest they have on
    # record (trainer/dataset_check.py); a job that names them must match
    # store: s3://bucket/prefix also works (sealed/s3store.py: standard AWS configuration)
    brokers:          # one per share, in share order
      - {address: "broker-a:7443", ca: ca.pem, cert: node.pem, key: node.key}
      # a share holder with replicas: addresses, tried in turn (failover)
      - {addresses: ["broker-b1:7443", "broker-b2:7443"], ca: ca.pem, cert: node.pem,
         key: node.key}
    attestation: {node_id: node-1, tcti: "device:/dev/tpmrm0"}
    model: {name: tiny-gpt, params: {layers: 2, d_model: 128, heads: 4}}
    optimizer: {lr: 3.0e-3, weight_decay: 0.1, betas: [0.9, 0.95]}
    schedule: {warmup_steps: 10, min_lr_ratio: 0.1}
    steps: 100
    batch_size: 8
    seq_len: 64
    precision: bf16
    checkpoint: {dir: /run/job-7/ckpt, interval: 20, keep_last: 2}
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sealed.errors import StoreError
from sealed.keys import validate_identifier
from sealed.s3store import parse_s3_url
from sealed.store import validate_object_name

__all__ = [
    "AttestationConfig",
    "BrokerConfig",
    "CheckpointConfig",
    "ConfigError",
    "DatasetConfig",
    "JobConfig",
    "ModelConfig",
    "OptimizerConfig",
    "Precision",
    "ScheduleConfig",
]

Precision = Literal["bf16", "fp16", "fp32"]
Device = Literal["auto", "cpu", "cuda"]
MAX_CONFIG_BYTES = 1 << 20
_BUILTIN_MODELS = ("tiny-gpt", "classifier")
_FACTORY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")
_ADDRESS = re.compile(r"^(unix:[^\s]+|[A-Za-z0-9.\-\[\]:]+:\d{1,5})$")


class ConfigError(ValueError):
    """A job configuration that cannot be used; the message names the field."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _int(where: str, value: object, *, lo: int, hi: int = 2**62) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi,
        f"{where} must be an integer from {lo} to {hi}, got {value!r:.60}",
    )


def _float(where: str, value: object, *, lo: float, hi: float, lo_open: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and value <= hi
    bound = f"> {lo}" if lo_open else f">= {lo}"
    _require(ok, f"{where} must be a number {bound} and <= {hi}, got {value!r:.60}")


def _path(where: str, value: object) -> None:
    _require(
        isinstance(value, str) and 0 < len(value) <= 4096 and "\x00" not in value,
        f"{where} must be a non-empty path, got {value!r:.60}",
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class DatasetConfig:
    id: str
    # where the sealed objects are: a local directory (or file:// URI), or s3://BUCKET/PREFIX
    # (endpoint, credentials and CA from the standard AWS variables and profile files)
    store: str
    # None: the key version whose manifest the brokers have on record
    key_version: int | None = None
    # None: the manifest the brokers have on record; given, it must match theirs
    manifest: str | None = None

    def __post_init__(self) -> None:
        try:
            validate_identifier("dataset", self.id)
        except ValueError as exc:
            raise ConfigError(f"dataset.id: {exc}") from None
        if self.key_version is not None:
            _int("dataset.key_version", self.key_version, lo=1, hi=2**32 - 1)
        if self.manifest is not None:
            _require(isinstance(self.manifest, str),
                     f"dataset.manifest must be an object name, got {self.manifest!r:.60}")
            try:
                validate_object_name(self.manifest)
            except StoreError as exc:
                raise ConfigError(f"dataset.manifest: {exc}") from None
        _path("dataset.store", self.store)
        if self.store.startswith("s3://"):
            try:
                parse_s3_url(self.store)
            except StoreError as exc:
                raise ConfigError(f"dataset.store: {exc}") from None
        else:
            _require("://" not in self.store or self.store.startswith("file://"),
                     f"dataset.store must be a directory, file://PATH or s3://BUCKET/PREFIX, "
                     f"got {self.store!r:.60}")

    @property
    def store_is_s3(self) -> bool:
        return self.store.startswith("s3://")

    @property
    def store_path(self) -> Path:
        if self.store_is_s3:
            raise ValueError("dataset.store is an s3:// address, not a local path")
        return Path(self.store.removeprefix("file://"))


@dataclass(frozen=True, kw_only=True, slots=True)
class BrokerConfig:
    """One key broker holding one share; the list order is the share order. ``address``, or
    ``addresses`` for a replica set of it (replicas on one PostgreSQL database and HSM token;
    the node fails over to the next on UNAVAILABLE, kms_broker/client.py)."""

    ca: str
    cert: str
    key: str
    address: str | None = None
    addresses: tuple[str, ...] = ()
    server_name: str | None = None  # TLS name of the broker when it differs from the address

    def __post_init__(self) -> None:
        _require((self.address is None) != (not self.addresses),
                 "brokers[]: give address (one broker) or addresses (its replicas), not both"
                 if self.address is not None else
                 "brokers[]: missing address (or addresses, for a replica set)")
        _require(isinstance(self.addresses, tuple | list) and len(self.addresses) <= 16,
                 "brokers[].addresses must be a list of at most 16 addresses")
        object.__setattr__(self, "addresses", tuple(self.addresses))
        _require(len(set(self.replicas)) == len(self.replicas),
                 f"brokers[].addresses lists an address twice: {', '.join(self.replicas)}")
        for address in self.replicas:
            _require(
                isinstance(address, str) and bool(_ADDRESS.match(address)),
                f"brokers[].address must be host:port or unix:PATH, got {address!r:.60}",
            )
        if self.server_name is not None:
            _require(
                isinstance(self.server_name, str) and 0 < len(self.server_name) <= 253,
                f"brokers[].server_name must be a host name, got {self.server_name!r:.60}",
            )
        for name in ("ca", "cert", "key"):
            _path(f"brokers[].{name}", getattr(self, name))

    @property
    def replicas(self) -> tuple[str, ...]:
        """The share holder's addresses, in the order they are tried."""
        return (self.address,) if self.address is not None else self.addresses

    @property
    def label(self) -> str:
        return ",".join(self.replicas)


@dataclass(frozen=True, kw_only=True, slots=True)
class AttestationConfig:
    """How this node proves itself: its enrolled node id and its TPM."""

    node_id: str
    tcti: str = "device:/dev/tpmrm0"  # tpm2-tss TCTI: device:PATH, swtpm:host=..,port=..
    # tpm2: a TPM quote; composite: a confidential GPU node's CPU TEE report (configfs-tsm)
    # plus one NVIDIA GPU report per GPU (NVML), see attest/tee_collect.py
    evidence: Literal["tpm2", "composite"] = "tpm2"

    def __post_init__(self) -> None:
        try:
            validate_identifier("node", self.node_id)
        except ValueError as exc:
            raise ConfigError(f"attestation.node_id: {exc}") from None
        _require(
            isinstance(self.tcti, str) and 0 < len(self.tcti) <= 512
            and self.tcti.split(":", 1)[0] in ("device", "swtpm", "mssim", "tabrmd"),
            f"attestation.tcti must be device:PATH, swtpm:..., mssim:... or tabrmd:..., "
            f"got {self.tcti!r:.60}",
        )
        _require(self.evidence in ("tpm2", "composite"), f"attestation.evidence must be tpm2 "
                 f"or composite, got {self.evidence!r:.60}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    name: str = "tiny-gpt"
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(
            isinstance(self.name, str)
            and (self.name in _BUILTIN_MODELS or bool(_FACTORY.match(self.name))),
            f"model.name must be one of {', '.join(_BUILTIN_MODELS)} or 'module:factory', "
            f"got {self.name!r:.60}",
        )
        _require(isinstance(self.params, Mapping), "model.params must be a mapping")
        for key, value in self.params.items():
            _require(
                isinstance(key, str) and isinstance(value, int | float | str | bool),
                f"model.params.{key} must be a number, string or boolean",
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerConfig:
    """AdamW."""

    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _float("optimizer.lr", self.lr, lo=0.0, hi=10.0, lo_open=True)
        _float("optimizer.weight_decay", self.weight_decay, lo=0.0, hi=10.0)
        _require(
            isinstance(self.betas, tuple | list) and len(self.betas) == 2,
            f"optimizer.betas must be two numbers, got {self.betas!r:.60}",
        )
        for i, beta in enumerate(self.betas):
            _float(f"optimizer.betas[{i}]", beta, lo=0.0, hi=0.999999)
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        _float("optimizer.eps", self.eps, lo=0.0, hi=1.0, lo_open=True)


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleConfig:
    """Linear warmup to optimizer.lr, then cosine decay to lr * min_lr_ratio at the last step."""

    warmup_steps: int = 0
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        _int("schedule.warmup_steps", self.warmup_steps, lo=0)
        _float("schedule.min_lr_ratio", self.min_lr_ratio, lo=0.0, hi=1.0)


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointConfig:
    dir: str
    interval: int = 100  # steps between checkpoints; the last step always checkpoints
    keep_last: int = 2

    def __post_init__(self) -> None:
        _path("checkpoint.dir", self.dir)
        _int("checkpoint.interval", self.interval, lo=1)
        _int("checkpoint.keep_last", self.keep_last, lo=1, hi=1000)


@dataclass(frozen=True, kw_only=True, slots=True)
class JobConfig:
    job_id: str
    tenant_id: str
    dataset: DatasetConfig
    checkpoint: CheckpointConfig
    brokers: tuple[BrokerConfig, ...] = ()
    attestation: AttestationConfig | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    steps: int = 100
    batch_size: int = 8  # per rank, per micro-step
    grad_accum: int = 1
    clip: float = 1.0  # max gradient norm; 0 disables clipping
    precision: Precision = "bf16"
    seq_len: int = 128
    seed: int = 0
    log_interval: int = 10
    prefetch_depth: int = 2
    lease_poll_interval: float = 5.0  # seconds between lease renewals / revocation polls
    metrics_port: int | None = None  # rank 0 serves Prometheus metrics here when set
    device: Device = "auto"
    threads: int | None = None  # CPU threads per process; None: this process's share of cores

    def __post_init__(self) -> None:
        for kind in ("job", "tenant"):
            try:
                validate_identifier(kind, getattr(self, f"{kind}_id"))
            except ValueError as exc:
                raise ConfigError(f"{kind}_id: {exc}") from None
        for name, cls in (
            ("dataset", DatasetConfig),
            ("checkpoint", CheckpointConfig),
            ("model", ModelConfig),
            ("optimizer", OptimizerConfig),
            ("schedule", ScheduleConfig),
        ):
            _require(isinstance(getattr(self, name), cls), f"{name} must be a {cls.__name__}")
        _require(
            self.attestation is None or isinstance(self.attestation, AttestationConfig),
            "attestation must be an AttestationConfig",
        )
        _require(
            isinstance(self.brokers, tuple | list)
            and all(isinstance(b, BrokerConfig) for b in self.brokers)
            and len(self.brokers) <= 16,
            "brokers must be a list of at most 16 brokers",
        )
        object.__setattr__(self, "brokers", tuple(self.brokers))
        _int("steps", self.steps, lo=1, hi=10**9)
        _int("batch_size", self.batch_size, lo=1, hi=1 << 16)
        _int("grad_accum", self.grad_accum, lo=1, hi=1 << 12)
        _float("clip", self.clip, lo=0.0, hi=1e6)
        _require(
            self.precision in typing.get_args(Precision),
            f"precision must be one of bf16, fp16, fp32, got {self.precision!r:.60}",
        )
        _int("seq_len", self.seq_len, lo=1, hi=1 << 16)
        _int("seed", self.seed, lo=0, hi=2**63 - 1)
        _int("log_interval", self.log_interval, lo=1)
        _int("prefetch_depth", self.prefetch_depth, lo=1, hi=64)
        _float("lease_poll_interval", self.lease_poll_interval, lo=0.05, hi=3600.0)
        if self.metrics_port is not None:
            _int("metrics_port", self.metrics_port, lo=0, hi=65535)
        if self.threads is not None:
            _int("threads", self.threads, lo=1, hi=1024)
        _require(
            self.device in typing.get_args(Device),
            f"device must be one of auto, cpu, cuda, got {self.device!r:.60}",
        )

    @classmethod
    def from_mapping(cls, data: object) -> JobConfig:
        """Build from parsed YAML/JSON; unknown keys and wrong types are rejected by name."""
        return _build(cls, data, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> JobConfig:
        import yaml  # the edge is the only place that parses YAML

        path = Path(path)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ConfigError(f"cannot read job file {path}: {exc.strerror}") from None
        _require(size <= MAX_CONFIG_BYTES, f"job file {path} is larger than 1 MiB")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"job file {path} is not valid YAML: {exc}") from None
        except ValueError as exc:  # an integer past Python's 4300-digit conversion limit
            raise ConfigError(f"job file {path} is not valid YAML: {exc}") from None
        except RecursionError:
            raise ConfigError(f"job file {path} is nested too deeply") from None
        return cls.from_mapping(data)

    def missing_files(self) -> list[str]:
        """What this job names on this node that is not there (``trainer validate``): each
        broker's TLS files, the store and its manifest, a ``device:`` TPM."""
        problems = []
        for i, broker in enumerate(self.brokers):
            for name in ("ca", "cert", "key"):
                if not Path(getattr(broker, name)).is_file():
                    problems.append(f"brokers[{i}].{name}: no file {getattr(broker, name)}")
        store = self.dataset.store
        if "://" not in store or store.startswith("file://"):
            if not self.dataset.store_path.is_dir():
                problems.append(f"dataset.store: no directory {store}")
            elif self.dataset.manifest and \
                    not (self.dataset.store_path / self.dataset.manifest).is_file():
                problems.append(f"dataset.manifest: {self.dataset.manifest} is not in {store}")
        if self.attestation is not None and self.attestation.tcti.startswith("device:"):
            device = self.attestation.tcti.removeprefix("device:").split(",")[0]
            if not Path(device).exists():
                problems.append(f"attestation.tcti: no TPM device {device}")
        return problems

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


_NESTED: dict[str, type] = {
    "attestation": AttestationConfig,
    "dataset": DatasetConfig,
    "checkpoint": CheckpointConfig,
    "model": ModelConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
}


def _build(cls: type, data: object, where: str) -> Any:
    label = where or "job config"
    _require(isinstance(data, Mapping), f"{label} must be a mapping, got {type(data).__name__}")
    assert isinstance(data, Mapping)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in names)
    _require(
        not unknown,
        f"{label}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}",
    )
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(data))
    _require(not missing, f"{label}: missing required key(s) {', '.join(missing)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        sub = f"{where}.{key}" if where else key
        if cls is JobConfig and key == "attestation" and value is None:
            kwargs[key] = None
        elif cls is JobConfig and key in _NESTED:
            kwargs[key] = _build(_NESTED[key], value, sub)
        elif cls is JobConfig and key == "brokers":
            _require(isinstance(value, list), "brokers must be a list")
            kwargs[key] = tuple(
                _build(BrokerConfig, b, f"brokers[{i}]") for i, b in enumerate(value)
            )
        elif cls is BrokerConfig and key == "addresses":
            _require(isinstance(value, list) and all(isinstance(a, str) for a in value),
                     f"{sub} must be a list of host:port addresses")
            kwargs[key] = tuple(value)
        elif cls is OptimizerConfig and key == "betas":
            _require(isinstance(value, list | tuple), "optimizer.betas must be a list")
            kwargs[key] = tuple(value)
        elif cls is ModelConfig and key == "params":
            kwargs[key] = dict(value) if isinstance(value, Mapping) else value
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{label}: {exc}") from None
