"""The training run: keys in, encrypted data through DDP mixed precision, shredding out.

:func:`run_job` is the whole lifecycle of one process (DESIGN.md section 7):

1. shredder and signal watcher first, then process hardening (before any key arrives);
2. ``init_distributed()`` (gloo on CPU, NCCL on CUDA);
3. the key source's DEK (registered with the shredder) and a lease watcher that shreds and
   exits with code 3 on revocation or lease expiry; with several ranks, the authenticated
   rendezvous and the sealed channel (:mod:`trainer.sealed_comm_ddp`): every parameter
   broadcast, gradient bucket and barrier between ranks travels sealed under link keys
   derived from the DEK; a forged, replayed or reordered message shreds and exits with 6;
4. the dataset reader (decrypting in memory), the model, AdamW, warmup + cosine LR, and a
   ``GradScaler`` enabled only for fp16; resume from the newest encrypted checkpoint;
5. the loop: ``autocast`` (bf16/fp16) forward, gradient accumulation with ``no_sync`` on all
   but the last micro-step, clipping, optimizer step; rank 0 logs progress and metrics and
   writes encrypted checkpoints;
6. always, in ``finally``: shred (DEK, derived keys, plaintext buffers, model and optimizer
   tensors, work files) and log the shred report.

Resuming restores model, optimizer, scaler and step from the newest checkpoint; the data
stream restarts at the next epoch (a fresh deterministic shuffle) rather than mid-epoch.

``plaintext_collectives_for_tests_only`` keeps DDP's own plaintext
collectives for the wire test's positive control; it is refused with an attested key source.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sealed.secrets import SecretBuffer
from trainer.checkpoint import CheckpointStore, derive_checkpoint_key, scrub
from trainer.config import JobConfig
from trainer.data import EncryptedBatches, FeatureRecords, ShardReader, TokenWindows, make_loader
from trainer.dataset_check import DatasetMissing, require_manifest
from trainer.distributed import DistEnv, init_distributed, shutdown_distributed
from trainer.hardening import failed_required, format_checks, harden_process, self_check
from trainer.keysource import KeyHandle, KeySource
from trainer.models import build_model, model_adapter, model_loss
from trainer.sealed_comm_ddp import JobComm, open_job_comm
from trainer.shred import (
    EXIT_BROKER_UNREACHABLE,
    EXIT_REVOKED,
    Shredder,
    install_signal_handlers,
)

__all__ = ["DatasetMissing", "HardeningFailed", "JobResult", "ReaderFactory", "lr_at", "run_job"]

log = logging.getLogger("trainer")

ReaderFactory = Callable[[JobConfig, SecretBuffer], ShardReader]


class HardeningFailed(Exception):
    """A required hardening check failed; the message lists each with its fix."""


@dataclass(slots=True)
class JobResult:
    rank: int
    world_size: int
    start_step: int
    steps_done: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    samples_per_s: float = 0.0
    tokens_per_s: float = 0.0
    decrypt_gbps: float = 0.0
    seconds: float = 0.0
    checkpoint: str | None = None
    shred_report: str = ""


def lr_at(step: int, config: JobConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio``."""
    base = config.optimizer.lr
    warm = config.schedule.warmup_steps
    if warm and step < warm:
        return base * (step + 1) / warm
    span = max(1, config.steps - warm)
    progress = min(1.0, (step - warm) / span)
    floor = base * config.schedule.min_lr_ratio
    return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _autocast(env: DistEnv, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=env.device.type, dtype=dtype)


def _model_tensors(model: nn.Module) -> Callable[[], Iterator[torch.Tensor]]:
    def provider() -> Iterator[torch.Tensor]:
        for p in model.parameters():
            yield p
            if p.grad is not None:
                yield p.grad
        yield from model.buffers()

    return provider


def _optimizer_tensors(opt: torch.optim.Optimizer) -> Callable[[], Iterator[torch.Tensor]]:
    def provider() -> Iterator[torch.Tensor]:
        for state in opt.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    yield value

    return provider


class _LeaseWatcher:
    """Shreds and exits with code 3 when a broker revokes the lease (pushed, or a renewal
    refused), or 7 when the lease runs out because no broker answered a renewal in time (an
    outage, not a revocation)."""

    def __init__(self, handle: KeyHandle, shredder: Shredder, poll_s: float) -> None:
        self._handle = handle
        self._shredder = shredder
        self._poll = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainer-lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        expired = False
        while not self._stop.is_set():
            if self._handle.revoked.wait(timeout=self._poll):
                why = self._handle.revoke_reason or "the broker revoked the lease"
                break
            expiry = self._handle.lease_expiry
            if expiry is not None and time.time() > expiry:
                expired = True
                break
        else:
            return
        if self._stop.is_set():
            return
        if expired:
            # No broker refused a renewal (a refusal revokes the handle): none answered in
            # time. An outage, not a revocation: its own message and exit status.
            problem = self._handle.renewal_problem or "no answer to the renewal in time"
            log.error("broker unreachable: the key lease ran out before a broker renewed it "
                      "(%s); shredding and exiting %d", problem, EXIT_BROKER_UNREACHABLE)
            self._shredder.shred_and_exit(f"broker unreachable: {problem}",
                                          EXIT_BROKER_UNREACHABLE)
            return
        log.error("key revoked: %s; shredding and exiting", why)
        self._shredder.shred_and_exit(f"revoked: {why}", EXIT_REVOKED)


class _Metrics:
    """Optional Prometheus gauges on rank 0."""

    def __init__(self, port: int | None) -> None:
        self.enabled = port is not None
        if not self.enabled:
            return
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self.registry = CollectorRegistry()
        self.step = Gauge("trainer_step", "optimizer steps done", registry=self.registry)
        self.loss = Gauge("trainer_loss", "training loss (rank 0)", registry=self.registry)
        self.sps = Gauge("trainer_samples_per_second", "samples/s", registry=self.registry)
        self.tps = Gauge("trainer_tokens_per_second", "tokens/s", registry=self.registry)
        self.gbps = Gauge("trainer_decrypt_gbps", "decrypt GB/s", registry=self.registry)
        start_http_server(port, addr="127.0.0.1", registry=self.registry)

    def update(self, step: int, loss: float, sps: float, tps: float, gbps: float) -> None:
        if self.enabled:
            self.step.set(step)
            self.loss.set(loss)
            self.sps.set(sps)
            self.tps.set(tps)
            self.gbps.set(gbps)


def _default_reader(config: JobConfig, dek: SecretBuffer) -> ShardReader:
    from trainer.sealed_reader import open_sealed_reader

    return open_sealed_reader(config, dek)


def run_job(
    config: JobConfig,
    key_source: KeySource,
    *,
    open_reader: ReaderFactory | None = None,
    harden: bool = True,
    require_hardening: bool = False,
    handle_signals: bool = True,
    plaintext_collectives_for_tests_only: bool = False,
) -> JobResult:
    """Run one process of the job end to end (see the module docstring). Always shreds."""
    shredder = Shredder()
    if handle_signals and threading.current_thread() is threading.main_thread():
        install_signal_handlers(shredder)
    watcher: _LeaseWatcher | None = None
    result: JobResult | None = None
    comm: JobComm | None = None
    try:
        if harden:
            hardening = harden_process()
            checks = self_check()
            failed = failed_required(checks)
            if require_hardening and failed:
                raise HardeningFailed(
                    "process hardening self-check failed:\n" + format_checks(failed)
                )
            if not hardening.mlockall:
                log.warning("mlockall refused (%s): only key buffers are locked",
                            hardening.mlockall_error)
        env = init_distributed(config.device)
        if open_reader is None and config.dataset.manifest:
            require_manifest(config)  # before any key is released (and leased)
        # a job that does not name its manifest learns it from the brokers: the key source
        # checks the store then, still before any release (trainer.dataset_check)
        handle = key_source.acquire()
        if handle.config is not None:
            config = handle.config
        shredder.add_secret("dataset key", handle.dek)
        for held in handle.held:
            shredder.add_secret("dataset key for the local ranks", held)
        watcher = _LeaseWatcher(handle, shredder, config.lease_poll_interval)
        watcher.start()
        if env.distributed:  # authenticated rendezvous before any model state moves
            comm = open_job_comm(
                rank=env.rank, world_size=env.world_size, backend=env.backend or "gloo",
                dek=handle.dek, job_id=config.job_id, shredder=shredder,
                attested=bool(getattr(key_source, "attested", False)),
                plaintext_for_tests=plaintext_collectives_for_tests_only)
        trained = _train(config, env, handle, shredder, open_reader, comm)
        if comm is not None:
            comm.barrier()
        result = trained
        return trained
    finally:
        if watcher is not None:
            watcher.stop()
        report = shredder.shred("normal exit" if result is not None else "error")
        with contextlib.suppress(Exception):
            key_source.close()
        if comm is not None:
            with contextlib.suppress(Exception):
                comm.close()
        with contextlib.suppress(Exception):
            shutdown_distributed()
        if result is not None:
            result.shred_report = str(report)


def _on_device(
    batch: tuple[torch.Tensor, torch.Tensor],
    env: DistEnv,
    reused: list[torch.Tensor],
    shredder: Shredder,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy a batch into preallocated device tensors (registered with the shredder once), so
    plaintext token ids never land in fresh allocations the caching allocator frees unwiped."""
    if env.device.type == "cpu":
        return batch
    if not reused:
        reused.extend(torch.empty_like(t, device=env.device) for t in batch)
        shredder.add_tensors("device batch", lambda: list(reused))
    for dst, src in zip(reused, batch, strict=True):
        dst.copy_(src, non_blocking=True)
    return reused[0], reused[1]


def _train(
    config: JobConfig,
    env: DistEnv,
    handle: KeyHandle,
    shredder: Shredder,
    open_reader: ReaderFactory | None,
    comm: JobComm | None = None,
) -> JobResult:
    torch.manual_seed(config.seed)
    reader = (open_reader or _default_reader)(config, handle.dek)
    close = getattr(reader, "close", None)
    if close is not None:
        shredder.add_stop_hook(close)  # after the prefetcher stops (it registers first)

    model = build_model(config.model.name, config.model.params, seq_len=config.seq_len)
    model.to(env.device)
    raw_model = model
    shredder.add_tensors("model", _model_tensors(raw_model))
    if model_adapter(model) == "tokens":
        adapter: TokenWindows | FeatureRecords = TokenWindows(config.seq_len)
    else:
        adapter = FeatureRecords(int(getattr(model, "features", 16)),
                                 int(getattr(model, "classes", 4)))
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=config.optimizer.lr,
        betas=config.optimizer.betas,
        eps=config.optimizer.eps,
        weight_decay=config.optimizer.weight_decay,
    )
    shredder.add_tensors("optimizer", _optimizer_tensors(opt))
    scaler = torch.amp.GradScaler(env.device.type, enabled=config.precision == "fp16")

    ckpt_key = derive_checkpoint_key(handle.dek, config.job_id)
    shredder.add_secret("checkpoint key", ckpt_key)
    store = CheckpointStore(config.checkpoint.dir, job_id=config.job_id, key=ckpt_key,
                            keep_last=config.checkpoint.keep_last)
    store.on_temp_file = lambda path, created: (
        shredder.add_file(path) if created else shredder.discard_file(path)
    )
    start_step, start_epoch = 0, 0
    latest = store.latest()
    if latest is not None:
        step, state = store.load(latest[1])
        try:
            raw_model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            start_step = int(state["step"])
            start_epoch = int(state["epoch"]) + 1
        finally:
            scrub(state)
        if env.is_main:
            log.info("resumed from %s at step %d", latest[1].name, start_step)

    if comm is not None:
        model = comm.wrap(raw_model, env.device)  # sealed collectives (trainer/sealed_comm*)

    batches = EncryptedBatches(
        reader, adapter, batch_size=config.batch_size, rank=env.rank,
        world_size=env.world_size, seed=config.seed, prefetch_depth=config.prefetch_depth,
        shredder=shredder, start_epoch=start_epoch,
    )
    if env.is_main:
        log.info("world %d on %s, backend %s, precision %s, collectives %s; reading the "
                 "first shard", env.world_size, env.device, env.backend or "none",
                 config.precision, comm.mode if comm is not None else "none")
    it = iter(make_loader(batches))
    device_batch: list[torch.Tensor] = []  # reused device copies of the batch (CUDA only)
    metrics = _Metrics(config.metrics_port if env.is_main else None)
    result = JobResult(rank=env.rank, world_size=env.world_size, start_step=start_step,
                       steps_done=0)
    samples_per_step = config.batch_size * config.grad_accum * env.world_size
    tokens_per_sample = adapter.tokens_per_sample()
    t_start = time.perf_counter()
    t_window, window_steps = t_start, 0
    model.train()
    for step in range(start_step, config.steps):
        shredder.halt_if_shredding()
        lr = lr_at(step, config)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(config.grad_accum):
            x, y = _on_device(next(it), env, device_batch, shredder)
            if env.is_main and step == start_step and micro == 0:
                log.info("first batch after %.0f ms", (time.perf_counter() - t_start) * 1e3)
            last = micro == config.grad_accum - 1
            sync = (model.no_sync() if isinstance(model, DDP) and not last
                    else contextlib.nullcontext())
            with sync:
                with _autocast(env, config.precision):
                    logits = model(x)
                loss = model_loss(raw_model, logits, y) / config.grad_accum
                scaler.scale(loss).backward()
            loss_sum += float(loss.detach())
        if config.clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config.clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=False)  # keep gradient buffers so the shredder zeroes them
        done = step + 1
        result.steps_done += 1
        result.losses.append((done, loss_sum))
        window_steps += 1
        if env.is_main and (
            done % config.log_interval == 0 or done == config.steps or done == start_step + 1
        ):
            now = time.perf_counter()
            sps = window_steps * samples_per_step / max(now - t_window, 1e-9)
            tps = sps * tokens_per_sample
            gbps = batches.stats.decrypt_gbps
            log.info("step %d/%d loss %.4f lr %.2e samples/s %.1f tokens/s %.0f decrypt GB/s "
                     "%.2f", done, config.steps, loss_sum, lr, sps, tps, gbps)
            metrics.update(done, loss_sum, sps, tps, gbps)
            t_window, window_steps = now, 0
        if (done % config.checkpoint.interval == 0 or done == config.steps) and env.is_main:
            shredder.halt_if_shredding()
            state = {
                "model": raw_model.state_dict(),
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(),
                "step": done,
                "epoch": batches.epoch,
            }
            path = store.save(done, state)
            result.checkpoint = str(path)
            log.info("checkpoint %s written (encrypted)", path.name)
    elapsed = time.perf_counter() - t_start
    result.seconds = elapsed
    result.samples_per_s = result.steps_done * samples_per_step / max(elapsed, 1e-9)
    result.tokens_per_s = result.samples_per_s * tokens_per_sample
    result.decrypt_gbps = batches.stats.decrypt_gbps
    return result
