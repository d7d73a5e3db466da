"""Job identity: the canonical job digest and the job claims, a policy that pins a job
field denies a job file that differs, naming the rule, and `trainer job-digest` prints the
digest a node measures (the broker-side proof: tests/compose/test_code_identity.py)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from attest.policy import Policy
from tests.trainer.conftest import PY, child_env
from trainer.config import JobConfig
from trainer.dataset_check import resolved
from trainer.job_identity import DOMAIN, job_claims, job_digest, job_identity

ROOT = Path(__file__).resolve().parents[2]
CODE = "5f" * 32


def job(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "job_id": "job-1", "tenant_id": "acme",
        "dataset": {"id": "corpus", "key_version": 1, "manifest": "m.bin", "store": "/s"},
        "brokers": [{"address": "b:1", "ca": "/ca.pem", "cert": "/c.pem", "key": "/k.pem"}],
        "attestation": {"node_id": "node-a", "tcti": "swtpm:port=1"},
        "checkpoint": {"dir": "/ckpt", "interval": 20, "keep_last": 2},
        "model": {"name": "tiny-gpt", "params": {"layers": 2, "d_model": 64, "heads": 4}},
        "optimizer": {"lr": 3.0e-3},
        "steps": 100, "precision": "bf16",
    }
    data.update(overrides)
    return data


def config(**overrides: Any) -> JobConfig:
    return JobConfig.from_mapping(job(**overrides))


def test_the_digest_is_sha256_over_the_documented_canonical_json():
    c = config()
    doc = job_identity(c)
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert job_digest(c) == hashlib.sha256(DOMAIN + canonical.encode()).hexdigest()
    assert set(doc) == {"job_id", "tenant_id", "dataset", "model", "optimizer", "schedule",
                        "steps", "batch_size", "grad_accum", "clip", "precision", "seq_len",
                        "seed", "checkpoint"}


def test_spelling_order_and_node_local_settings_do_not_change_the_digest():
    base = job_digest(config())
    assert job_digest(config(optimizer={"lr": 0.003})) == base  # 3.0e-3 is 0.003
    other_node = config(
        attestation={"node_id": "node-b", "tcti": "device:/dev/tpmrm0"},
        brokers=[{"address": "x:2", "ca": "/o.pem", "cert": "/o.pem", "key": "/o.key"}],
        dataset={"id": "corpus", "key_version": 1, "manifest": "m.bin", "store": "/other"},
        checkpoint={"dir": "/elsewhere", "interval": 20, "keep_last": 2},
        device="cpu", log_interval=3, metrics_port=9100)
    assert job_digest(other_node) == base


@pytest.mark.parametrize("change", [
    {"steps": 101}, {"precision": "fp32"}, {"seed": 1}, {"batch_size": 9},
    {"model": {"name": "tiny-gpt", "params": {"layers": 3, "d_model": 64, "heads": 4}}},
    {"model": {"name": "classifier"}}, {"optimizer": {"lr": 0.004}},
    {"dataset": {"id": "other", "key_version": 1, "manifest": "m.bin", "store": "/s"}},
    {"dataset": {"id": "corpus", "key_version": 2, "manifest": "m.bin", "store": "/s"}},
    {"checkpoint": {"dir": "/ckpt", "interval": 21, "keep_last": 2}},
])
def test_what_is_trained_or_written_changes_the_digest(change):
    assert job_digest(config(**change)) != job_digest(config())


def test_claims_carry_the_fields_a_tenant_constrains():
    claims = job_claims(config())
    assert claims["job.digest"] == job_digest(config())
    assert claims["job.model"] == "tiny-gpt"
    assert claims["job.steps"] == 100
    assert claims["job.precision"] == "bf16"
    assert claims["job.dataset"] == "corpus" and claims["job.key_version"] == 1
    assert claims["job.checkpoint.interval"] == 20


def node(job_config: JobConfig) -> dict[str, Any]:
    return {
        "evidence.kind": "tpm2", "evidence.verified": True, "node.ksm.enabled": False,
        "node.swap.enabled": False, "node.core_dump.limit": 0, "trainer.code_digest": CODE,
        **job_claims(job_config),
    }


@pytest.mark.parametrize("policy_file", ["dev-swtpm.yaml", "production.yaml"])
@pytest.mark.parametrize(("params", "differing", "rule"), [
    ({"allowed_job_models": ["tiny-gpt"]}, {"model": {"name": "classifier"}},
     "job-model-allowed"),
    ({"max_job_steps": 100}, {"steps": 101}, "job-steps-bounded"),
    ({"allowed_job_digests": [job_digest(config())]}, {"precision": "fp32"},
     "job-digest-allowed"),
])
def test_a_policy_pinning_a_job_field_denies_a_job_that_differs(policy_file, params,
                                                                 differing, rule):
    policy = Policy.from_file(ROOT / "policies" / policy_file).with_params(
        {"allowed_code_digests": [CODE], **params})
    approved = policy.evaluate(node(config()))
    assert rule not in [r.name for r in approved.failed], approved.summary()
    denied = policy.evaluate(node(config(**differing)))
    assert rule in [r.name for r in denied.failed]
    assert not denied.allowed
    if policy_file == "dev-swtpm.yaml":
        assert approved.allowed, approved.summary()
        assert [r.name for r in denied.failed] == [rule]


def test_unpinned_job_rules_pass_any_job():
    policy = Policy.from_file(ROOT / "policies/dev-swtpm.yaml").with_params(
        {"allowed_code_digests": [CODE]})
    assert policy.evaluate(node(config(steps=10**6, model={"name": "classifier"}))).allowed


# ---------------------------------------------------------------- trainer job-digest
def job_digest_cli(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "trainer", "job-digest", "--job", str(path), *args],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True)


def job_file(tmp_path: Path, name: str, **overrides: Any) -> Path:
    """A job file as deploy/bin/node.py renders one: the dataset's key version and manifest
    left to the brokers, and none of the files it names present."""
    data = job(**overrides)
    data["dataset"] = {k: v for k, v in data["dataset"].items()
                       if k not in ("key_version", "manifest")}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_job_digest_prints_what_a_node_measures_with_the_brokers_values(tmp_path):
    """The digest and claims a node measures once the brokers named key version 1 and
    manifest m.bin (trainer/attested.py: job_claims of the resolved job) are what
    `trainer job-digest --manifest m.bin --key-version 1` prints, as JSON and as text."""
    path = job_file(tmp_path, "job.yaml")
    node_measures = resolved(JobConfig.from_yaml(path), key_version=1, manifest="m.bin")
    out = job_digest_cli(path, "--manifest", "m.bin", "--key-version", "1", "--format", "json")
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert printed["job_digest"] == job_digest(node_measures) == job_digest(config())
    assert printed["claims"] == job_claims(node_measures)
    assert printed["identity"] == json.loads(json.dumps(job_identity(node_measures)))
    text = job_digest_cli(path, "--manifest", "m.bin", "--key-version", "1")
    assert text.returncode == 0, text.stderr
    lines = dict(line.split(None, 1) for line in text.stdout.splitlines())
    assert lines["job.digest"] == printed["job_digest"]
    assert lines["job.steps"] == "100" and lines["job.key_version"] == "1"


def test_job_digest_differs_for_a_job_differing_in_one_measured_field(tmp_path):
    args = ("--manifest", "m.bin", "--key-version", "1", "--format", "json")
    digests = {json.loads(job_digest_cli(job_file(tmp_path, f"{n}.yaml", **c), *args).stdout)[
        "job_digest"] for n, c in (("base", {}), ("steps", {"steps": 101}),
                                   ("fp32", {"precision": "fp32"}))}
    assert len(digests) == 3
    other_manifest = json.loads(job_digest_cli(
        job_file(tmp_path, "base.yaml"), "--manifest", "m2.bin", "--key-version", "1",
        "--format", "json").stdout)["job_digest"]
    assert other_manifest not in digests


@pytest.mark.parametrize(("args", "message"), [
    ((), "the job file names no dataset.manifest/key_version, which a node takes from the "
         "brokers and measures: give --manifest NAME and --key-version N"),
    (("--manifest", "m.bin"), "give --key-version N ("),
    (("--key-version", "1"), "give --manifest NAME ("),
    (("--manifest", "../m", "--key-version", "1"), "invalid object name '../m'"),
    (("--manifest", "m.bin", "--key-version", "0"), "dataset.key_version must be an integer"),
])
def test_job_digest_without_what_the_brokers_decide_is_one_clear_line(tmp_path, args,
                                                                       message):
    out = job_digest_cli(job_file(tmp_path, "job.yaml"), *args)
    assert out.returncode == 2
    assert out.stdout == "" and "Traceback" not in out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith("trainer: job-digest: ") and message in line


def test_job_digest_refuses_a_value_that_contradicts_the_job_file(tmp_path):
    path = tmp_path / "named.yaml"
    path.write_text(yaml.safe_dump(job()))  # names key version 1 and manifest m.bin
    assert json.loads(job_digest_cli(path, "--format", "json").stdout)["job_digest"] == \
        job_digest(config())  # nothing to supply
    out = job_digest_cli(path, "--manifest", "other.bin")
    assert out.returncode == 2 and out.stdout == ""
    assert "--manifest other.bin differs from the job file's dataset.manifest m.bin" in out.stderr
