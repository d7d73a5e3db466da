"""The CUDA path: NCCL process group, bf16 autocast on the GPU, CUDA tensors scrubbed and the
cache emptied. Collected everywhere; runs only where torch sees a CUDA device."""

from __future__ import annotations

import pytest
import torch

from tests.trainer import custom_model
from tests.trainer.conftest import Proc, job_dict, losses, torchrun_cmd, write_job
from trainer.config import JobConfig
from trainer.keysource import StaticKeySource
from trainer.shred import Shredder
from trainer.train import run_job

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


def test_cuda_training_in_bf16_scrubs_the_gpu(dataset, tmp_path):
    cfg = JobConfig.from_mapping(job_dict(
        dataset, tmp_path / "run", steps=30, device="cuda", precision="bf16",
        model={"name": "tests.trainer.custom_model:make",
               "params": {"layers": 2, "d_model": 64, "heads": 4}}))
    result = run_job(cfg, StaticKeySource(dataset.dek), harden=False, handle_signals=False)
    assert result.losses[-1][1] < 0.75 * result.losses[0][1]
    model = custom_model.INSTANCES[-1]
    assert next(model.parameters()).is_cuda
    assert all(float(p.detach().abs().sum()) == 0 for p in model.parameters())
    assert "on cuda" in result.shred_report and " 0 on cuda" not in result.shred_report


def test_shredder_zeroes_cuda_tensors_and_empties_the_cache():
    t = torch.full((1024, 1024), 7.0, device="cuda")
    shredder = Shredder()
    shredder.add_tensors("gpu", lambda: [t])
    report = shredder.shred("test")
    assert report.cuda_tensors == 1 and float(t.abs().sum()) == 0 and report.errors == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_rank_nccl(tmp_path, dataset, key_server, procs):
    job = write_job(tmp_path / "job.yaml", job_dict(dataset, tmp_path / "run", steps=30,
                                                    device="cuda"))
    proc = Proc(torchrun_cmd(job, key_server.path), tmp_path / "logs", "nccl")
    procs.append(proc)
    assert proc.wait() == 0, proc.err()[-3000:]
    assert "backend nccl" in proc.err()
    found = losses(proc.err())
    assert found[-1][1] < 0.75 * found[0][1]
