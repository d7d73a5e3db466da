"""The shredder zeroes every registered secret, buffer and tensor and removes work files."""

from __future__ import annotations

import threading

import pytest
import torch

from sealed.secrets import SecretBuffer
from trainer.shred import Shredder, signal_exit_code


def test_shred_zeroes_everything_once_and_reports_counts(tmp_path):
    shredder = Shredder()
    key = shredder.add_secret("dek", SecretBuffer.from_bytes(b"\x42" * 32))
    buf = bytearray(b"plaintext record " * 64)
    shredder.add_buffer("shard", buf)
    view_owner = bytearray(b"\x07" * 100)
    shredder.add_buffer("view", memoryview(view_owner)[10:60])
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    shredder.add_tensors("model", lambda: list(model.parameters()))
    # optimizer state appears after registration: the provider is evaluated at shred time
    shredder.add_tensors("optimizer", lambda: [t for s in opt.state.values()
                                              for t in s.values() if torch.is_tensor(t)])
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    work = tmp_path / "work.bin"
    work.write_bytes(b"x")
    shredder.add_file(work)
    stopped = []
    shredder.add_stop_hook(lambda: stopped.append("reader"))
    shredder.add_stop_hook(lambda: stopped.append("prefetch"), first=True)

    report = shredder.shred("test")
    assert stopped == ["prefetch", "reader"]
    assert not key.alive
    assert buf == bytearray(len(buf))
    assert view_owner[:10] == b"\x07" * 10 and view_owner[10:60] == bytes(50)
    assert view_owner[60:] == b"\x07" * 40
    assert all(float(p.abs().sum()) == 0 for p in model.parameters())
    assert all(float(t.abs().sum()) == 0 for s in opt.state.values() for t in s.values())
    assert not work.exists()
    assert (report.secrets, report.secret_bytes, report.buffers, report.files) == (1, 32, 2, 1)
    assert report.buffer_bytes == len(buf) + 50
    assert report.tensors == 2 + 6  # weight, bias; per param: step, exp_avg, exp_avg_sq
    assert report.errors == 0
    text = str(report)
    assert "shred report (test): secrets 1 (32 B)" in text and "work files 1 removed" in text
    assert "plaintext record" not in text
    assert shredder.shred("again") is report  # idempotent


def test_read_only_buffers_are_refused():
    with pytest.raises(TypeError, match="must be writable"):
        Shredder().add_buffer("bytes", memoryview(b"abc"))


def test_discarded_work_file_is_not_removed(tmp_path):
    shredder = Shredder()
    kept = tmp_path / "ckpt.ctck"
    kept.write_bytes(b"ciphertext")
    shredder.add_file(kept)
    shredder.discard_file(kept)
    assert shredder.shred("x").files == 0 and kept.exists()


def test_halt_only_blocks_the_main_thread_after_shredding():
    shredder = Shredder()
    shredder.halt_if_shredding()  # returns: nothing shredded yet
    shredder.shred("x")
    done = []
    t = threading.Thread(target=lambda: (shredder.halt_if_shredding(), done.append(1)))
    t.start()
    t.join()
    assert done == [1]


def test_signal_exit_codes():
    assert [signal_exit_code(s) for s in (15, 2, 1)] == [143, 130, 129]
