"""docs/reference/broker-yaml.md and job-yaml.md are generated from the config definitions
and are up to date; every key they describe is one the loaders accept."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kms_broker.config import ConfigError, load_config
from kms_broker.config_reference import DESCRIPTIONS as BROKER_DESCRIPTIONS
from kms_broker.config_reference import defined_keys
from kms_broker.config_reference import entries as broker_entries
from trainer.config import JobConfig
from trainer.config_reference import entries as job_entries

REPO = Path(__file__).resolve().parents[2]


def test_pages_are_up_to_date() -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts/gen_config_docs.py"),
                             "--check"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_check_notices_a_stale_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_config_docs",
                                                  REPO / "scripts/gen_config_docs.py")
    gen = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(gen)
    page = tmp_path / "docs/reference/job-yaml.md"
    page.parent.mkdir(parents=True)
    page.write_text(gen.job_page().replace("Optimizer steps to train.", "Steps."))
    (tmp_path / "docs/reference/broker-yaml.md").write_text(gen.broker_page())
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    assert gen.main(["--check"]) == 1
    gen.main([])
    assert gen.main(["--check"]) == 0


def test_every_broker_definition_key_is_described() -> None:
    assert set(defined_keys()) <= set(BROKER_DESCRIPTIONS)
    rows = {e.key: e for e in broker_entries()}
    assert rows["limits.burst"].default == "500"
    assert rows["ttl_ms.lease"].default == "300000"
    assert rows["state_dir"].default == "required"


def _minimal_broker(tmp: Path) -> dict:
    pin = tmp / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o600)
    return {"broker_id": "b", "listen": "127.0.0.1:0", "state_dir": str(tmp),
            "tls": {"ca": "ca.pem", "cert": "c.pem", "key": "c.key"},
            "hsm": {"backend": "pkcs11", "pin_file": str(pin)}}


EXAMPLES = {  # a valid value for each described key that the minimal config lacks
    "hsm.module": "/usr/lib/softhsm/libsofthsm2.so", "hsm.token_label": "t",
    "hsm.softhsm_conf": "softhsm2.conf", "hsm.backend": "pkcs11", "verifiers": "default",
    "reference_values": {"tpm2": {}}, "ek_roots": ["ek.pem"], "ek_intermediates": [],
    "trusted_tenant_keys": {"acme": "00" * 32}, "metrics_port": 9464, "workers": 2,
    "janitor_interval_ms": 1000, "audit_checkpoint_s": 1.5, "limits.max_streams": 16,
    "limits.rate_per_s": 50.0,
}


@pytest.mark.parametrize("key", sorted(BROKER_DESCRIPTIONS))
def test_every_described_broker_key_is_accepted(key: str, tmp_path: Path) -> None:
    doc = _minimal_broker(tmp_path)
    head, _, leaf = key.partition(".")
    if leaf:
        value = EXAMPLES.get(key, 7 if head in ("ttl_ms", "limits") else None)
        if value is not None:
            doc.setdefault(head, {})[leaf] = value
    elif key in EXAMPLES:
        doc[key] = EXAMPLES[key]
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(doc))
    load_config(path)  # raises ConfigError on a key it does not know
    doc["no_such_key"] = 1
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="no_such_key"):
        load_config(path)


def test_every_job_field_is_described_and_defaults_match() -> None:
    rows = {e.key: e for e in job_entries()}
    assert rows["steps"].default == "100" and rows["job_id"].default == "required"
    assert rows["brokers[].server_name"].default == "none"
    assert rows["threads"].description.startswith("CPU threads")
    top = {f.name for f in dataclasses.fields(JobConfig)}
    assert top <= set(rows)


def test_job_page_documents_what_the_job_loader_accepts() -> None:
    example = {  # every top-level key the page lists, with a valid value
        "job_id": "j", "tenant_id": "t",
        "dataset": {"id": "d", "key_version": 1, "manifest": "m", "store": "/tmp"},
        "checkpoint": {"dir": "/tmp/c"}, "brokers": [], "attestation": None,
        "model": {"name": "tiny-gpt"}, "optimizer": {}, "schedule": {},
    }
    rows = {e.key: e for e in job_entries()}
    for key, row in rows.items():
        if "." in key or key in example:
            continue
        assert row.default != "required", key
        example[key] = None if row.default == "none" else yaml.safe_load(row.default)
    config = JobConfig.from_mapping(example)
    assert config.threads is None and config.steps == 100
