"""Encrypted checkpoints: round trip, binding to key/job/step, tamper detection, atomicity,
retention, no plaintext in the file, and the shards' streaming AEAD format."""

from __future__ import annotations

import stat
import uuid

import pytest
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealed import streaming
from sealed.secrets import SecretBuffer
from trainer import checkpoint as ck
from trainer.checkpoint import (
    CheckpointDecryptionError,
    CheckpointError,
    CheckpointStore,
    derive_checkpoint_key,
)


@pytest.fixture
def dek():
    key = SecretBuffer.random(32)
    yield key
    key.zeroize()


def _state(canary: str, features: int = 64) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(features, 64)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, features)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "note": canary,
            "step": 5}


def _store(tmp_path, dek, job="job-1", **kw):
    return CheckpointStore(tmp_path / "ckpt", job_id=job, key=derive_checkpoint_key(dek, job),
                           **kw)


def test_key_is_hkdf_of_the_dek_bound_to_the_job(dek):
    with dek.view() as v:
        raw = bytes(v)
    expected = HKDF(hashes.SHA256(), 32, salt=None, info=b"checkpoint/v1\x00job-1").derive(raw)
    key = derive_checkpoint_key(dek, "job-1")
    with key.view() as kv:
        assert bytes(kv) == expected
    assert not key.equals(derive_checkpoint_key(dek, "job-2"))


def test_round_trip_owner_only_and_no_plaintext_in_file(tmp_path, dek):
    canary = f"CANARY-{uuid.uuid4().hex}"
    state = _state(canary)
    store = _store(tmp_path, dek)
    path = store.save(5, state)
    assert path.name == "ckpt-0000000005.ctck"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    blob = path.read_bytes()
    assert canary.encode() not in blob
    weight = state["model"]["weight"]
    assert bytes(weight.contiguous().view(torch.uint8).flatten()[:64].tolist()) not in blob
    step, loaded = store.load(path)
    assert step == 5 and loaded["note"] == canary
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"],
                       state["optimizer"]["state"][0]["exp_avg"])
    assert not list(path.parent.glob(".tmp-*"))


def test_file_is_one_stream_of_the_shard_format(tmp_path, dek):
    """A checkpoint is a Tink AES-GCM-HKDF stream under K_ckpt with the documented AAD:
    sealed.streaming (the shards' decrypter) opens it as it is."""
    store = _store(tmp_path, dek)
    path = store.save(7, {"step": 7, "w": torch.arange(400_000, dtype=torch.float32)})
    blob = path.read_bytes()
    assert blob[0] == streaming.HEADER_SIZE
    assert streaming.segment_count(len(blob)) == 2  # 1.6 MB of plaintext: two 1 MiB segments
    aad = b"checkpoint/v2\x00" + (5).to_bytes(2, "big") + b"job-1" + (7).to_bytes(8, "big")
    key = derive_checkpoint_key(dek, "job-1")
    plain = streaming.decrypt(key, aad, blob)
    assert b"w" in plain and len(plain) == streaming.plaintext_size(len(blob))
    with pytest.raises(streaming.DecryptionError):
        streaming.decrypt(key, aad[:-1] + b"\x08", blob)  # another step


def test_resume_needs_the_same_dek_and_job(tmp_path, dek):
    path = _store(tmp_path, dek).save(3, _state("x"))
    other = SecretBuffer.random(32)
    with pytest.raises(CheckpointDecryptionError, match="decryption failed"):
        _store(tmp_path, other).load(path)
    with pytest.raises(CheckpointDecryptionError):
        _store(tmp_path, dek, job="job-2").load(path)


def test_every_modification_is_detected(tmp_path, dek):
    store = _store(tmp_path, dek)
    path = store.save(3, _state("x", features=3000))
    original = path.read_bytes()
    assert len(original) > 2 * streaming.SEGMENT_SIZE  # several segments
    seg = streaming.SEGMENT_SIZE
    for offset in (0, 1, 20, 33, 39, 40, 100, seg - 1, seg, seg + 5, len(original) - 1):
        tampered = bytearray(original)
        tampered[offset] ^= 0x01
        path.write_bytes(tampered)
        with pytest.raises(CheckpointError):
            store.load(path)
    for blob in (original[:-1], original + b"\x00", original[: 2 * seg],
                 original[:seg] + original[2 * seg :]):
        path.write_bytes(blob)
        with pytest.raises(CheckpointDecryptionError):
            store.load(path)
    # a checkpoint renamed to another step is refused (the step is authenticated)
    path.write_bytes(original)
    moved = path.with_name("ckpt-0000000004.ctck")
    path.rename(moved)
    with pytest.raises(CheckpointDecryptionError):
        store.load(moved)


def test_malformed_files_get_specific_errors(tmp_path, dek):
    store = _store(tmp_path, dek)
    store.directory.mkdir(parents=True)
    path = store.directory / "ckpt-0000000001.ctck"
    for blob in (b"", b"PK\x03\x04 not ours", b"\x28" + bytes(60)):
        path.write_bytes(blob)
        with pytest.raises(CheckpointDecryptionError, match="decryption failed"):
            store.load(path)
    with pytest.raises(CheckpointError, match="not a checkpoint file name"):
        store.load(store.directory / "model.pt")


def test_retention_keeps_the_newest(tmp_path, dek):
    store = _store(tmp_path, dek, keep_last=2)
    for step in (10, 20, 30, 40):
        store.save(step, {"step": step})
    assert [s for s, _ in store.list()] == [30, 40]
    assert store.latest()[0] == 40
    assert store.load(store.latest()[1])[1]["step"] == 40


def test_failed_write_leaves_previous_checkpoint_and_no_temp_file(tmp_path, dek, monkeypatch):
    store = _store(tmp_path, dek)
    store.save(1, {"step": 1})
    temp_files = []
    store.on_temp_file = lambda path, created: temp_files.append((path.name, created))
    calls = {"n": 0}
    real = ck._write_all

    def failing(fd, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(ck, "_write_all", failing)
    with pytest.raises(OSError, match="No space"):
        store.save(2, {"step": 2, "blob": torch.zeros(10000)})
    assert [s for s, _ in store.list()] == [1]
    assert not list(store.directory.glob(".tmp-*"))
    assert temp_files == [(".tmp-ckpt-0000000002-" + temp_files[0][0].split("-")[-1], True),
                          (temp_files[0][0], False)]
    assert store.load(store.latest()[1])[1]["step"] == 1


def test_scrub_zeroes_loaded_tensors():
    state = {"a": torch.ones(4), "b": [torch.ones(2)], "c": {"d": torch.ones(3)}, "e": 1}
    ck.scrub(state)
    assert all(float(t.abs().sum()) == 0 for t in ck._tensors(state))
