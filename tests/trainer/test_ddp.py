"""Two-process DDP (torchrun, gloo, bf16 autocast) on an encrypted dataset: trains, writes
encrypted checkpoints, survives SIGKILL by resuming, and leaves only ciphertext behind."""

from __future__ import annotations

import re
import stat
import time
from pathlib import Path

import pytest

from tests.trainer.conftest import (
    Proc,
    files_containing,
    job_dict,
    losses,
    torchrun_cmd,
    write_job,
)

pytestmark = pytest.mark.integration


def _checkpoint_steps(directory: Path) -> list[int]:
    if not directory.exists():
        return []
    return sorted(int(p.name[5:15]) for p in directory.glob("ckpt-*.ctck"))


def _scan_roots(tmp_path: Path) -> list[Path]:
    roots = [Path("/tmp")]
    if not tmp_path.resolve().is_relative_to("/tmp"):
        roots.append(tmp_path)
    return roots


def test_ddp_trains_encrypted_checkpoints_and_resumes_after_sigkill(
    tmp_path, dataset, key_server, procs
):
    run, logs = tmp_path / "run", tmp_path / "logs"
    ckpt = run / "ckpt"
    needles = [dataset.canary, dataset.dek_bytes()]
    assert dataset.num_shards >= 2

    # 1. a long run, SIGKILLed (torchrun and both workers) once it has checkpointed twice
    long_job = write_job(run / "long.yaml", job_dict(dataset, run, steps=1_000_000))
    killed = Proc(torchrun_cmd(long_job, key_server.path), logs, "killed")
    procs.append(killed)
    while len(_checkpoint_steps(ckpt)) < 2 or _checkpoint_steps(ckpt)[-1] < 20:
        assert killed.popen.poll() is None, f"run ended early:\n{killed.err()[-3000:]}"
        time.sleep(0.2)
    killed.kill_tree()
    assert key_server.served == 2  # each rank fetched its own key
    first = losses(killed.err())
    assert first and first[0][0] == 1, killed.err()[-2000:]
    start_loss = first[0][1]

    # only ciphertext is left after SIGKILL: no canary or key bytes in any file under /tmp
    # (run dirs, store, checkpoints, logs of both ranks and torchrun)
    assert files_containing(_scan_roots(tmp_path), needles) == []

    # 2. resume: needs the key again, continues from the newest checkpoint to the end
    last_ckpt = _checkpoint_steps(ckpt)[-1]
    total = last_ckpt + 30
    job = write_job(run / "job.yaml", job_dict(dataset, run, steps=total))
    resumed = Proc(torchrun_cmd(job, key_server.path), logs, "resumed")
    procs.append(resumed)
    assert resumed.wait() == 0, resumed.err()[-4000:]
    err = resumed.err()
    m = re.search(r"resumed from ckpt-(\d{10})\.ctck at step (\d+)", err)
    assert m and int(m.group(2)) == last_ckpt, err[-3000:]
    assert f"RESULT steps_done=30 start_step={last_ckpt}" in resumed.out()
    after = losses(err)
    assert after[0][0] == last_ckpt + 1 and after[-1][0] == total
    final_loss = after[-1][1]
    # byte-level LM: ln(256) = 5.55 at the start; the text is learnable far below that
    assert start_loss > 5.0
    assert final_loss < 0.5 * start_loss, (start_loss, final_loss)
    assert "world 2 on cpu, backend gloo, precision bf16" in err

    # encrypted checkpoints: retention of 2, owner-only, final step present
    steps = _checkpoint_steps(ckpt)
    assert steps[-1] == total and len(steps) == 2
    for s in steps:
        path = ckpt / f"ckpt-{s:010d}.ctck"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_bytes()[0] == 0x28  # a Tink streaming AEAD header (sealed.streaming)
    assert not list(ckpt.glob(".tmp-*"))
    for name in ("shred report (normal exit)", "plaintext buffers"):
        assert name in err
    assert err.count("shred report (normal exit)") == 2  # rank 0 and rank 1 both shredded

    # after the full run too: no canary or key bytes in any file
    assert files_containing(_scan_roots(tmp_path), needles) == []
