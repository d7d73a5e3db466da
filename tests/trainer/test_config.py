"""Job configuration: typed, frozen, validated up front with messages naming the field."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from trainer.config import ConfigError, JobConfig

BASE = {
    "job_id": "job-1",
    "tenant_id": "acme",
    "dataset": {"id": "corpus", "key_version": 1, "manifest": "manifests/ab12", "store": "/s"},
    "checkpoint": {"dir": "/c"},
}


def _with(**changes: object) -> dict:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = data
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return data


def test_yaml_round_trip_and_defaults(tmp_path):
    job = dict(BASE, brokers=[{"address": "broker-a:7443", "ca": "ca.pem", "cert": "n.pem",
                               "key": "n.key"}],
               optimizer={"lr": 0.001, "betas": [0.9, 0.99]}, precision="fp16", steps=7)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    cfg = JobConfig.from_yaml(path)
    assert cfg.precision == "fp16" and cfg.steps == 7
    assert cfg.optimizer.betas == (0.9, 0.99)
    assert cfg.brokers[0].address == "broker-a:7443"
    assert cfg.model.name == "tiny-gpt" and cfg.grad_accum == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 8  # type: ignore[misc]
    with pytest.raises(TypeError):
        JobConfig("job-1")  # type: ignore[misc]  # keyword-only


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"precision": "fp8"}, "precision must be one of bf16, fp16, fp32, got 'fp8'"),
        ({"optimizer__lr": -1}, "optimizer.lr must be a number > 0.0"),
        ({"optimizer__betas": [0.9]}, "optimizer.betas must be two numbers"),
        ({"optimizer__betas": [0.9, 1.5]}, "optimizer.betas[1] must be a number"),
        ({"steps": 0}, "steps must be an integer from 1"),
        ({"batch_size": "8"}, "batch_size must be an integer"),
        ({"grad_accum": True}, "grad_accum must be an integer"),
        ({"seq_len": 0}, "seq_len must be an integer from 1"),
        ({"clip": float("nan")}, "clip must be a number"),
        ({"job_id": "../x"}, "job_id: job id must be 1-128 characters"),
        ({"tenant_id": ""}, "tenant_id: tenant id must be"),
        ({"dataset__key_version": 0}, "dataset.key_version must be an integer from 1"),
        ({"dataset__manifest": "../etc/passwd"}, "dataset.manifest: invalid object name"),
        ({"dataset__id": "a b"}, "dataset.id: dataset id must be"),
        ({"checkpoint__keep_last": 0}, "checkpoint.keep_last must be an integer from 1"),
        ({"checkpoint__interval": -5}, "checkpoint.interval must be an integer from 1"),
        ({"model__name": "resnet"}, "model.name must be one of tiny-gpt, classifier"),
        ({"model__params": {"layers": [1]}}, "model.params.layers must be a number"),
        ({"prefetch_depth": 0}, "prefetch_depth must be an integer from 1 to 64"),
        ({"lease_poll_interval": 0}, "lease_poll_interval must be a number >= 0.05"),
        ({"metrics_port": 70000}, "metrics_port must be an integer from 0 to 65535"),
        ({"device": "tpu"}, "device must be one of auto, cpu, cuda"),
        ({"brokers": [{"address": "nope", "ca": "a", "cert": "b", "key": "c"}]},
         "brokers[].address must be host:port or unix:PATH"),
        ({"schedule__warmup_steps": -1}, "schedule.warmup_steps must be an integer from 0"),
    ],
)
def test_invalid_values_name_the_field(changes, message):
    with pytest.raises(ConfigError) as info:
        JobConfig.from_mapping(_with(**changes))
    assert message in str(info.value)


def test_unknown_and_missing_keys_are_rejected_by_name():
    with pytest.raises(ConfigError, match=r"job config: unknown key\(s\) stepz; allowed: "):
        JobConfig.from_mapping(dict(BASE, stepz=3))
    with pytest.raises(ConfigError, match=r"optimizer: unknown key\(s\) momentum"):
        JobConfig.from_mapping(dict(BASE, optimizer={"momentum": 0.9}))
    with pytest.raises(ConfigError, match=r"brokers\[0\]: missing required key\(s\) ca, cert"):
        JobConfig.from_mapping(dict(BASE, brokers=[{"address": "a:1", "key": "k"}]))
    data = dict(BASE)
    del data["dataset"]
    with pytest.raises(ConfigError, match=r"job config: missing required key\(s\) dataset"):
        JobConfig.from_mapping(data)
    with pytest.raises(ConfigError, match="job config must be a mapping, got list"):
        JobConfig.from_mapping([1, 2])
    with pytest.raises(ConfigError, match="dataset must be a mapping, got str"):
        JobConfig.from_mapping(dict(BASE, dataset="corpus"))


def test_yaml_file_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="cannot read job file"):
        JobConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        JobConfig.from_yaml(bad)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * ((1 << 20) + 1))
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        JobConfig.from_yaml(big)


def test_dataset_key_version_and_manifest_are_optional(tmp_path):
    job = dict(BASE)
    job["dataset"] = {"id": "ds1", "store": str(tmp_path)}
    config = JobConfig.from_mapping(job)
    assert (config.dataset.key_version, config.dataset.manifest) == (None, None)
    assert config.missing_files() == []  # no manifest named: nothing to look for yet
    named = {**job, "dataset": {**job["dataset"], "manifest": "manifests/" + "a" * 32}}
    assert JobConfig.from_mapping(named).missing_files() == [
        f"dataset.manifest: manifests/{'a' * 32} is not in {tmp_path}"]
    for bad, message in (({"manifest": "../x"}, "dataset.manifest"),
                         ({"manifest": 7}, "dataset.manifest must be an object name"),
                         ({"key_version": 0}, "dataset.key_version must be an integer")):
        with pytest.raises(ConfigError, match=message):
            JobConfig.from_mapping({**job, "dataset": {**job["dataset"], **bad}})


def test_a_broker_is_one_address_or_a_replica_set():
    tls = {"ca": "ca.pem", "cert": "n.pem", "key": "n.key"}
    config = JobConfig.from_mapping({**BASE, "brokers": [
        {"address": "a:1", **tls}, {"addresses": ["b1:1", "b2:1"], **tls}]})
    assert [b.replicas for b in config.brokers] == [("a:1",), ("b1:1", "b2:1")]
    for broker, message in (
            ({"address": "a:1", "addresses": ["b:1"]}, "not both"),
            ({}, "missing address"),
            ({"addresses": []}, "missing address"),
            ({"addresses": ["b:1", "b:1"]}, "lists an address twice"),
            ({"addresses": ["b"]}, "must be host:port"),
            ({"addresses": "b:1"}, "must be a list of host:port")):
        with pytest.raises(ConfigError, match=message):
            JobConfig.from_mapping({**BASE, "brokers": [{**broker, **tls}]})
