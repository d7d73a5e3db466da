"""SIGTERM/SIGINT/SIGHUP/SIGQUIT mid-training (test entry point; the real entry point is
tests/compose/test_signals_real.py): exit 128 + N, shred report, no key bytes in memory;
revocation: every rank shreds and exits with code 3."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests.trainer.conftest import (
    Proc,
    files_containing,
    job_dict,
    memory_contains,
    single_cmd,
    torchrun_cmd,
    write_job,
)

pytestmark = pytest.mark.integration


def _wait_for(proc: Proc, text: str) -> None:
    while text not in proc.err() + proc.out():
        assert proc.popen.poll() is None, f"exited early:\n{proc.err()[-3000:]}"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("signum", "code"),
    [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129), (signal.SIGQUIT, 131)],
)
def test_signal_mid_training_shreds(tmp_path, dataset, key_server, procs, signum, code):
    run, logs = tmp_path / "run", tmp_path / "logs"
    job = write_job(run / "job.yaml", job_dict(dataset, run, steps=1_000_000, log_interval=1))
    proc = Proc(single_cmd(job, key_server.path), logs, "trainer")
    procs.append(proc)
    _wait_for(proc, "step 3/")
    os.kill(proc.pid, signum)
    assert proc.wait() == code
    err = proc.err()
    assert f"received {signal.Signals(signum).name}" in err
    assert f"shred report (signal {signal.Signals(signum).name})" in err
    assert "secrets 2 (64 B)" in err  # the DEK and the checkpoint key
    assert files_containing([tmp_path], [dataset.canary, dataset.dek_bytes()]) == []


def test_sigterm_memory_scan_after_shredding_finds_no_key(tmp_path, dataset, key_server, procs):
    run, logs = tmp_path / "run", tmp_path / "logs"
    job = write_job(run / "job.yaml", job_dict(dataset, run, steps=1_000_000, log_interval=1))
    proc = Proc(single_cmd(job, key_server.path), logs, "trainer",
                TRAINER_TEST_SHRED_HOOK="pause")
    procs.append(proc)
    _wait_for(proc, "step 3/")
    dek = dataset.dek_bytes()
    # positive control: while training, the live process holds the key (and plaintext)
    before = memory_contains(proc.pid, [dek, dataset.canary])
    assert {i for _, i in before} == {0, 1}
    os.kill(proc.pid, signal.SIGTERM)
    _wait_for(proc, f"SHRED-DONE {proc.pid}")
    assert "shred report (signal SIGTERM)" in proc.err()
    after = memory_contains(proc.pid, [dek, dataset.canary])
    assert after == [], after
    proc.kill_tree()


def test_revocation_stops_and_shreds_every_rank(tmp_path, dataset, key_server, procs):
    run, logs = tmp_path / "run", tmp_path / "logs"
    job = write_job(run / "job.yaml", job_dict(dataset, run, steps=1_000_000, log_interval=1,
                                               lease_poll_interval=0.2))
    proc = Proc(torchrun_cmd(job, key_server.path), logs, "torchrun")
    procs.append(proc)
    _wait_for(proc, "step 3/")
    assert key_server.revoke_all() == 2
    rc = proc.wait()
    err = proc.err()
    assert rc != 0
    assert err.count("shred report (revoked: revoked by the test key server)") == 2, err[-3000:]
    # torchrun's failure summary lists each worker with its exit code
    assert len(re.findall(r"exitcode\s*:\s*3 \(pid", err)) == 2, err[-3000:]
    assert files_containing([tmp_path], [dataset.canary, dataset.dek_bytes()]) == []
