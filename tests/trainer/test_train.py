"""run_job in-process (single rank): precisions, accumulation, schedule, baseline
equivalence, shredding of the model, resume only with the right key, metrics."""

from __future__ import annotations

import struct
import urllib.request

import pytest

from compose.ports import free_port
from sealed.errors import DecryptionError
from sealed.secrets import SecretBuffer
from sealed.store import LocalDirStore
from sealed.writer import write_dataset
from tests.trainer import custom_model
from tests.trainer.conftest import corpus, job_dict
from trainer.checkpoint import CheckpointDecryptionError
from trainer.config import JobConfig
from trainer.data import PlaintextShards
from trainer.keysource import StaticKeySource
from trainer.sealed_reader import open_sealed_reader
from trainer.train import lr_at, run_job


def _run(config, dek, **kw):
    return run_job(config, StaticKeySource(dek), harden=False, handle_signals=False, **kw)


def _cfg(ds, tmp_path, **overrides):
    return JobConfig.from_mapping(job_dict(ds, tmp_path / "run", **overrides))


def test_lr_schedule_warms_up_then_decays_to_the_floor(dataset, tmp_path):
    cfg = _cfg(dataset, tmp_path, steps=100, schedule={"warmup_steps": 10, "min_lr_ratio": 0.1},
               optimizer={"lr": 1.0})
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    values = [lr_at(s, cfg) for s in range(10, 101)]
    assert values == sorted(values, reverse=True)


@pytest.mark.parametrize(("precision", "accum"), [("bf16", 1), ("fp16", 2), ("fp32", 1)])
def test_tiny_gpt_learns_in_every_precision(dataset, tmp_path, precision, accum):
    cfg = _cfg(dataset, tmp_path, steps=30, precision=precision, grad_accum=accum,
               checkpoint={"dir": str(tmp_path / "ckpt"), "interval": 100})
    result = _run(cfg, dataset.dek)
    assert result.steps_done == 30 and result.start_step == 0
    first, last = result.losses[0][1], result.losses[-1][1]
    assert first > 5.0 and last < 0.75 * first, (first, last)
    assert result.decrypt_gbps > 0 and result.tokens_per_s > 0
    assert result.checkpoint and result.checkpoint.endswith("ckpt-0000000030.ctck")
    assert "shred report (normal exit)" in result.shred_report


def test_plaintext_baseline_gives_the_same_training(dataset, tmp_path):
    cfg = _cfg(dataset, tmp_path, steps=8, precision="fp32",
               checkpoint={"dir": str(tmp_path / "c1"), "interval": 100})
    encrypted = _run(cfg, dataset.dek)
    reader = open_sealed_reader(cfg, dataset.dek)
    records, shards, start = corpus(400, canary=dataset.canary.decode()), [], 0
    for entry in reader.reader.manifest.shards:
        shards.append(records[start : start + entry.record_count])
        start += entry.record_count
    reader.close()
    cfg2 = _cfg(dataset, tmp_path, steps=8, precision="fp32",
                checkpoint={"dir": str(tmp_path / "c2"), "interval": 100})
    plain = _run(cfg2, dataset.dek, open_reader=lambda config, dek: PlaintextShards(shards))
    assert [round(v, 5) for _, v in encrypted.losses] == [round(v, 5) for _, v in plain.losses]


def test_model_and_optimizer_are_zeroed_after_the_run(dataset, tmp_path):
    cfg = _cfg(dataset, tmp_path, steps=3,
               model={"name": "tests.trainer.custom_model:make",
                      "params": {"layers": 1, "d_model": 32, "heads": 2}})
    result = _run(cfg, dataset.dek)
    model = custom_model.INSTANCES[-1]
    assert result.steps_done == 3
    assert all(float(p.detach().abs().sum()) == 0 for p in model.parameters())
    assert all(float(p.grad.abs().sum()) == 0 for p in model.parameters())


def test_resume_continues_and_needs_the_same_key(dataset, tmp_path):
    cfg = _cfg(dataset, tmp_path, steps=10, checkpoint={"dir": str(tmp_path / "ck"),
                                                        "interval": 5})
    _run(cfg, dataset.dek)
    longer = _cfg(dataset, tmp_path, steps=14, checkpoint={"dir": str(tmp_path / "ck"),
                                                           "interval": 5})
    resumed = _run(longer, dataset.dek)
    assert resumed.start_step == 10 and resumed.steps_done == 4
    assert resumed.losses[0][0] == 11
    # another key cannot resume: with the dataset readable (the real key opens the reader
    # here), the job's wrong DEK derives a checkpoint key that does not authenticate
    wrong = SecretBuffer.random(32)
    even_longer = _cfg(dataset, tmp_path, steps=20, checkpoint={"dir": str(tmp_path / "ck"),
                                                                "interval": 5})
    with pytest.raises(CheckpointDecryptionError, match="decryption failed"):
        _run(even_longer, wrong, open_reader=lambda c, _dek: open_sealed_reader(c, dataset.dek))
    # and with the wrong key throughout, already the dataset manifest fails
    with pytest.raises(DecryptionError):
        _run(even_longer, wrong)


def test_classifier_on_sealed_feature_records(tmp_path, dataset):
    rows = []
    for i in range(512):
        label = i % 4
        feats = [float(label == k) * 2.0 - 1.0 + 0.01 * ((i * 7 + k) % 5) for k in range(4)]
        rows.append(struct.pack("<4f", *feats) + struct.pack("<I", label))
    ref = write_dataset(LocalDirStore(tmp_path / "feat"), rows, dek=dataset.dek,
                        tenant_id="acme", dataset_id="feat", key_version=1,
                        share_holders=["a"], target_shard_size=4096)
    cfg = JobConfig.from_mapping(job_dict(
        dataset, tmp_path / "run", steps=40, precision="bf16",
        dataset={"id": "feat", "key_version": 1, "manifest": ref.manifest_name,
                 "store": str(tmp_path / "feat")},
        model={"name": "classifier", "params": {"features": 4, "classes": 4, "hidden": 16}},
        optimizer={"lr": 0.01}, batch_size=16,
    ))
    result = _run(cfg, dataset.dek)
    assert result.losses[0][1] > 1.0 and result.losses[-1][1] < 0.3


def test_prometheus_endpoint_reports_progress(dataset, tmp_path):
    port = free_port()  # reserved: no other process is handed it meanwhile
    cfg = _cfg(dataset, tmp_path, steps=4, log_interval=2, metrics_port=port)
    _run(cfg, dataset.dek)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    assert "trainer_step 4.0" in body
    assert "trainer_decrypt_gbps" in body and "trainer_tokens_per_second" in body


def test_errors_still_shred(dataset, tmp_path, caplog):
    cfg = _cfg(dataset, tmp_path, steps=3, model={"name": "tiny-gpt",
                                                  "params": {"d_model": 30, "heads": 4}})
    with pytest.raises(ValueError, match="divisible by heads"):
        _run(cfg, dataset.dek)
    assert "shred report (error): secrets 1 (32 B)" in caplog.text
