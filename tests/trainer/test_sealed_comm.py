"""Sealed collectives (issue 14): key schedule, and the transport on a real gloo group.

The multi-process tests start one ``tests.trainer.comm_worker`` per rank (separate
processes, a real gloo process group over loopback TCP); this test process hosts their
TCPStore on port 0, so no port is raced for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from sealed.secrets import SecretBuffer
from trainer.checkpoint import derive_checkpoint_key
from trainer.sealed_comm_ddp import PlaintextRefused, choose_mode, launcher_spans_nodes
from trainer.sealed_comm_keys import (
    Hello,
    confirm_tag,
    derive_job_channel_key,
    derive_link_key,
    transcript_hash,
)

REPO = Path(__file__).resolve().parents[2]
EXIT_CHANNEL_AUTH = 6
DEK_HEX = "11" * 32


# key schedule ------------------------------------------------------------------------------
def _hellos(world: int, seed: int) -> list[Hello]:
    return [Hello(rank=r, world_size=world, nonce=bytes([seed, r]) * 16, node=b"n" * 32)
            for r in range(world)]


def _raw(secret: SecretBuffer) -> bytes:
    with secret.view() as v:
        return bytes(v)


def test_job_channel_key_is_its_own_key_bound_to_the_job():
    dek = SecretBuffer.from_bytes(bytes.fromhex(DEK_HEX))
    job = derive_job_channel_key(dek, "job-1")
    assert len(job) == 32
    assert _raw(job) != _raw(dek)
    assert _raw(job) != _raw(derive_checkpoint_key(dek, "job-1"))
    assert _raw(job) != _raw(derive_job_channel_key(dek, "job-2"))
    assert _raw(job) == _raw(derive_job_channel_key(dek, "job-1"))
    with pytest.raises(ValueError):
        derive_job_channel_key(dek, "bad job/id")


def test_link_keys_differ_per_direction_per_pair_and_per_run():
    job = derive_job_channel_key(SecretBuffer.from_bytes(bytes.fromhex(DEK_HEX)), "job-1")
    t1 = transcript_hash("job-1", _hellos(3, 1))
    t2 = transcript_hash("job-1", _hellos(3, 2))  # same job restarted: fresh nonces
    keys = {(s, d, t): _raw(derive_link_key(job, t, s, d))
            for t in (t1, t2) for s in range(3) for d in range(3) if s != d}
    assert len(set(keys.values())) == len(keys) == 12
    with pytest.raises(ValueError):
        derive_link_key(job, t1, 1, 1)
    assert confirm_tag(job, t1, "job-1", 0, 3) != confirm_tag(job, t1, "job-1", 1, 3)
    assert confirm_tag(job, t1, "job-1", 0, 3) != confirm_tag(job, t2, "job-1", 0, 3)


def test_hello_round_trip_and_malformed_hellos_are_refused():
    hello = _hellos(2, 1)[1]
    assert Hello.decode(hello.encode()) == hello
    with pytest.raises(ValueError):
        Hello.decode(hello.encode()[:-1])
    with pytest.raises(ValueError):
        Hello.decode(b"XXXX" + hello.encode()[4:])
    with pytest.raises(ValueError):
        Hello(rank=2, world_size=2, nonce=b"\0" * 32, node=b"\0" * 32)
    swapped = _hellos(2, 1)[::-1]
    with pytest.raises(ValueError, match="claims rank"):
        transcript_hash("job-1", swapped)


# the plaintext rule ------------------------------------------------------------------------
def test_plaintext_is_refused_with_attested_keys_and_gloo_is_always_sealed():
    with pytest.raises(PlaintextRefused, match="--attest"):
        choose_mode(backend="gloo", multi_node=True, attested=True, plaintext_for_tests=True)
    with pytest.raises(PlaintextRefused):
        choose_mode(backend="gloo", multi_node=False, attested=True, plaintext_for_tests=True)
    assert choose_mode(backend="gloo", multi_node=False, attested=True,
                       plaintext_for_tests=False) == "sealed"
    assert choose_mode(backend="nccl", multi_node=True, attested=True,
                       plaintext_for_tests=False) == "sealed"
    assert choose_mode(backend="nccl", multi_node=False, attested=True,
                       plaintext_for_tests=False) == "node-local"
    assert choose_mode(backend="gloo", multi_node=True, attested=False,
                       plaintext_for_tests=True) == "plaintext-test"


def test_launcher_view_of_nodes(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert launcher_spans_nodes(2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    assert not launcher_spans_nodes(2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    assert launcher_spans_nodes(2)


# real gloo groups --------------------------------------------------------------------------
@dataclass
class RankRun:
    rank: int
    code: int
    out: str
    err: str

    @property
    def result(self) -> dict:
        for line in self.out.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        raise AssertionError(f"rank {self.rank} printed no result:\n{self.err[-3000:]}")


def run_ranks(scenario: str, world: int, *, deks: dict[int, str] | None = None,
              extra: tuple[str, ...] = ()) -> list[RankRun]:
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True,
                          timeout=timedelta(seconds=600), wait_for_workers=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINER_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = []
    for rank in range(world):
        dek = (deks or {}).get(rank, DEK_HEX)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.trainer.comm_worker", scenario, "--rank", str(rank),
             "--world", str(world), "--store-port", str(store.port), "--dek", dek, *extra],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    runs = []
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=900)  # a backstop against a hang, not a limit
        runs.append(RankRun(rank, proc.returncode, out.decode(), err.decode(errors="replace")))
    return runs


@pytest.mark.integration
@pytest.mark.parametrize("world", [2, 4])
def test_sealed_collectives_match_gloo(world: int):
    runs = run_ranks("collectives", world)
    for run in runs:
        assert run.code == 0, run.err[-3000:]
    # 2 ranks: bit-identical to gloo's all-reduce (a + b either way) for fp32, bf16, fp16;
    # 4 ranks: another summation order, within rounding of the dtype (fp16/bf16 included),
    # relative to the largest magnitude of the result
    worst = runs[0].result["worst_relative_error"]
    assert worst == 0.0 if world == 2 else worst < 2 ** -6


@pytest.mark.integration
@pytest.mark.parametrize(("scenario", "why"), [
    ("forge", "authentication tag invalid (reduce-scatter #2, sequence 5)"),
    ("replay", "replayed (sequence 3, expected 5)"),
    ("reorder", "out of order or a message was dropped (sequence 6, expected 5)"),
    ("drop", "out of order or a message was dropped (sequence 6, expected 5)"),
])
def test_tampered_message_stops_the_job_with_the_named_error_and_shreds(scenario, why):
    """Rank 0 forges, replays, reorders or drops one of its frames to rank 1; rank 1 stops
    with ChannelAuthError, shreds (its report in the log) and exits 6; rank 0 does not go
    on training (its peer is gone)."""
    tamperer, victim = run_ranks(scenario, 2)
    assert victim.code == EXIT_CHANNEL_AUTH, victim.err[-3000:]
    assert f"ChannelAuthError: sealed channel: message from rank 0 rejected: {why}" in victim.err
    assert "shred report (channel authentication failed:" in victim.err
    assert "RESULT" not in victim.out
    assert tamperer.code != 0 and "RESULT" not in tamperer.out


@pytest.mark.integration
def test_rank_without_the_job_key_cannot_join():
    """Rank 1 holds another DEK (it was not released the dataset key): the key confirmation
    fails both ways, both ranks shred and exit 6 before any model state moves."""
    runs = run_ranks("rendezvous", 2, deks={1: "22" * 32})
    for run in runs:
        assert run.code == EXIT_CHANNEL_AUTH, run.err[-3000:]
        peer = 1 - run.rank
        assert (f"message from rank {peer} rejected: it could not prove it holds the job key"
                in run.err)
        assert "shred report (channel authentication failed:" in run.err
    ok = run_ranks("rendezvous", 2)
    assert [r.code for r in ok] == [0, 0]
    assert ok[0].result == {"nodes": 1, "mode": "sealed"}


@pytest.mark.integration
@pytest.mark.parametrize("world", [2, 4])
def test_encrypted_hook_gives_the_parameters_of_plain_ddp(world: int):
    """N optimizer steps (2 micro-steps each, ``no_sync`` on the first), per-rank data,
    per-rank initial weights (the sealed broadcast must replace them with rank 0's), a
    buffer updated in forward (synced from rank 0 as DDP does): plain DDP against DDP with
    the sealed hook, fp32 and bf16 parameters (bf16 buckets).

    2 ranks: bit-identical (x/2 is exact and a + b = b + a). 4 ranks: gloo's ring adds in
    another order, so the results differ by rounding: fp32 within 1e-6, bf16 within four
    bf16 epsilons (4 * 2**-7) of the parameter scale after AdamW amplifies one-ulp
    differences of the gradients. Every replica ends bit-identical to every other."""
    runs = run_ranks("equivalence", world, extra=("--steps", "6"))
    for run in runs:
        assert run.code == 0, run.err[-3000:]
    result = runs[0].result
    for name in ("fp32", "bf16"):
        assert result[name]["replicas_agree"], result
        assert result[name]["buffer_steps"] == 12
    if world == 2:
        assert result["fp32"]["identical"] and result["bf16"]["identical"], result
    else:
        assert result["fp32"]["max_abs_diff"] <= 1e-6, result
        assert result["bf16"]["max_abs_diff"] <= 4 * 2 ** -7, result
