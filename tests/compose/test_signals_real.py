"""Issue 10 item 3: stop signals through the real entry point, at every phase of a job.

The deployment is docker-compose.yml run by the local harness (two real brokers, swtpm,
enrolment and the tenant's upload: ``tests.compose.test_scenarios.deployment``). Node-a's
trainer is started the way ``deploy/bin/node.py`` starts it, with node-a's environment:
``python -m trainer --attest`` (ALONE; the first case runs node.py itself, which renders the
job file and execs the trainer), or ``python -m trainer.launch ... -m trainer --attest``
(TORCHRUN: torchrun's agent with one worker, as node.py starts a multi-node job), and once
through plain ``python -m torch.distributed.run`` (TORCHRUN-PLAIN). The signal goes to the
trainer, or to the torchrun agent as a scheduler sends it.

Matrix (every signal and every phase at least once per entry point)::

    phase               ALONE            TORCHRUN
    before attestation  SIGTERM          SIGQUIT
    during release      SIGQUIT          SIGHUP
    on the first shard  SIGHUP           SIGINT
    mid-training        SIGINT, SIGTERM  SIGTERM
    checkpoint write    SIGTERM          SIGINT

(ALONE mid-training takes both signals of the issue's bug reports: SIGTERM ended the trainer
with -15 and no shred report, SIGINT raised a KeyboardInterrupt out of ``backward()``.)
    plain torchrun: mid-training SIGHUP (the worker shreds and exits 129; torchrun itself
    exits 1, its own status for a signal, as ``trainer --help`` documents)

How each phase is reached, without timing assumptions and without anything in the trainer:

* before attestation: the provider broker (first in share order) is stopped with SIGSTOP
  before the trainer starts, so the trainer cannot get past its first call; the signal is
  sent once the trainer's main thread has the stop signals blocked (/proc status SigBlk).
  Afterwards neither broker has audited an attestation by node-a.
* during release: the test holds the exclusive ``flock`` on the tenant broker's audit log
  (the lock every audit append takes) from before the trainer starts. The key client
  challenges both brokers (a challenge writes no audit record), makes one evidence for both
  and attests to both at once: the provider audits and answers, the tenant's attestation
  waits at its audit append (write-before-act). The signal is sent once the provider broker
  has audited node-a's attestation (allowed): node-a is inside the key release exchange,
  attested at one broker and waiting for the other; then the lock is let go.
* on the first shard: the trainer logs ``dataset key from N broker(s) ...`` once it holds the
  DEK, then builds the model and opens the dataset (seconds of work here) before it logs
  ``world ...; reading the first shard`` just ahead of the first batch. When the test reads
  the key line it fills the pipe the trainer's stderr goes to: the trainer blocks writing its
  next line (a thread of it waits in ``[anon_]pipe_write``, /proc/PID/task/TID/wchan), the
  signal is sent, the pipe is drained. The line it was blocked on is its first line after the
  filler in what is drained, and the test checks that it is the first-shard line (so the
  phase was reached, not assumed). Both brokers audited the release to node-a.
* mid-training: the signal is sent after the trainer logged ``step 1/``.
* checkpoint write: the trainer's stderr is a pipe the test holds. The job logs every 1000
  steps and checkpoints at step 10, so after ``step 1/`` its next line is ``checkpoint
  writing``, which the trainer logs after creating the checkpoint's temp file. The test
  fills the pipe when it reads ``step 1/``: the trainer blocks on that line, inside the
  write, with the temp file present (checked); then the signal, then the pipe is drained.

Each case checks: the exit status 128 + N (from the trainer, or from the launcher for the
whole torchrun job), a shred report naming the signal, no traceback, no process of the node
left (/proc scan), and no canary sentence or DEK byte string in any file of the deployment.
A mid-training case also reads the signal mask of every thread of the live trainer.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from compose.ports import free_port_pairs
from tests.compose.conftest import live_processes
from tests.compose.test_deployment import CANARIES, _files_containing
from tests.compose.test_scenarios import Deployment, deployment  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODE, SERVICE = "node-a", "node-a"
STOP_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)
WAIT_S = 180  # a deadline on each wait, never a time limit on the trainer
# The image's interpreter (first on the service's PATH): `trainer --attest` runs only from its
# measured environment (trainer/guard.py)
PYTHON = "python"

_DEK_SNIPPET = """
import sys
from trainer.attested import AttestedKeySource
from trainer.config import JobConfig
source = AttestedKeySource(JobConfig.from_yaml(sys.argv[1]), node_id=sys.argv[2])
handle = source.acquire()
with handle.dek.view() as view:
    sys.stdout.write(bytes(view).hex())
handle.dek.zeroize()
source.close()
"""


class Started:
    """A trainer job started with node-a's environment; its output through a pipe we read."""

    def __init__(self, dep: Deployment, argv: list[str]) -> None:
        harness = dep.harness
        runtime = harness._runtime(SERVICE)
        env = harness._environment(runtime)
        read, write = os.pipe()
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=write, stderr=write, env=env,
            cwd=harness._working_dir(runtime), start_new_session=True)
        os.close(write)
        self._read = read
        self._filler: int | None = None
        self.output = ""
        self.eof = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pump(self, wait_s: float = 0.1) -> None:
        if self.eof:
            time.sleep(wait_s)
            return
        ready, _, _ = select.select([self._read], [], [], wait_s)
        if ready:
            data = os.read(self._read, 1 << 16)
            if not data:
                self.eof = True
            self.output += data.decode(errors="replace")

    def wait_until(self, condition: Callable[[], object], what: str, *, read: bool = True) -> None:
        deadline = time.monotonic() + WAIT_S
        while not condition():
            assert self.popen.poll() is None, f"exited before {what}:\n{self.output[-4000:]}"
            assert time.monotonic() < deadline, f"no {what}:\n{self.output[-4000:]}"
            if read:
                self.pump()
            else:
                time.sleep(0.05)

    def fill_pipe(self) -> None:
        """Fill the output pipe: the job's next write to it blocks until :meth:`finish`."""
        # a new open file description, so O_NONBLOCK does not reach the job's own end
        self._filler = os.open(f"/proc/self/fd/{self._read}", os.O_WRONLY | os.O_NONBLOCK)
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(self._filler, b"." * 4096)
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(self._filler, b".")

    def finish(self) -> int:
        if self._filler is not None:
            os.close(self._filler)
            self._filler = None
        deadline = time.monotonic() + WAIT_S
        while not self.eof or self.popen.poll() is None:
            assert time.monotonic() < deadline, f"did not exit:\n{self.output[-4000:]}"
            self.pump()
        os.close(self._read)
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        with contextlib.suppress(OSError):
            os.close(self._read)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat[stat.rfind(")") + 2 :].split()[1]) == pid:
                    found.append(int(entry))
    return found


def _trainer_pid(job: Started, entry: str) -> int | None:
    """The process that runs ``trainer --attest``: the job itself, or torchrun's worker."""
    if entry == "alone":
        return job.pid
    for child in _children(job.pid):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if b"trainer" in cmdline and b"--attest" in cmdline:
                return child
    return None


def _blocked(pid: int, tid: int | str) -> set[int]:
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    mask = int(re.search(r"^SigBlk:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    return {n for n in range(1, 65) if mask & (1 << (n - 1))}


def _masked(pid: int | None) -> bool:
    if pid is None:
        return False
    with contextlib.suppress(OSError):
        return set(STOP_SIGNALS) <= _blocked(pid, pid)
    return False


def _assert_every_thread_masked(pid: int) -> None:
    """Every thread blocks the stop signals, except the one that receives them: it waits in
    ``sigwait``, during which the kernel shows the awaited signals as unblocked."""
    tids = os.listdir(f"/proc/{pid}/task")
    assert len(tids) > 2, tids  # torch, OpenMP and gRPC threads exist by now
    receivers = []
    for tid in tids:
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            blocked = _blocked(pid, tid)
            if Path(f"/proc/{pid}/task/{tid}/wchan").read_text().startswith("do_sigtimedwait"):
                receivers.append(tid)
                continue
            assert set(STOP_SIGNALS) <= blocked, (tid, sorted(blocked))
    assert len(receivers) == 1, receivers


def _writing_to_full_pipe(pid: int | None) -> bool:
    if pid is None:
        return False
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                # pipe_write, anon_pipe_write since Linux 6.14
                if Path(f"/proc/{pid}/task/{tid}/wchan").read_text().endswith("pipe_write"):
                    return True
    return False


@contextlib.contextmanager
def _audit_held(dep: Deployment, broker: str) -> Iterator[None]:
    """Hold the exclusive flock of ``broker``'s audit log: its next audit append waits."""
    path = dep.harness.volume_path(f"{broker}-broker") / "state" / "audit.log"
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _stopped(dep: Deployment, service: str) -> Iterator[None]:
    pgids = list(dep.harness._runtime(service).pgids)
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pgid in pgids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGCONT)


@pytest.fixture(scope="module")
def signal_job(deployment: Deployment) -> Path:  # noqa: F811 - the imported fixture
    """Node-a's job file as node.py renders it (a first node.py run that is stopped before
    attestation renders it), with steps, log interval and checkpoint interval set for the
    phases (see the module docstring)."""
    rendered = deployment.harness.host_path(SERVICE, f"/var/lib/{NODE}/job.yaml")
    return rendered.parent / "job-signals.yaml"


def _write_signal_job(rendered: Path, target: Path) -> None:
    text = rendered.read_text()
    text = re.sub(r"^steps: .*$", "steps: 100000", text, flags=re.M)
    text = re.sub(r"^log_interval: .*$", "log_interval: 1000", text, flags=re.M)
    text, n = re.subn(r"interval: 20,", "interval: 10,", text)
    assert n == 1 and "steps: 100000" in text, text
    target.write_text(text)


def _argv(dep: Deployment, entry: str, job: Path) -> list[str]:
    trainer = ["-m", "trainer", "--attest", "--job", str(job), "--node-id", NODE]
    if entry == "alone":
        return [PYTHON, *trainer]
    (port,) = free_port_pairs(1)
    launcher = "trainer.launch" if entry == "torchrun" else "torch.distributed.run"
    return [PYTHON, "-m", launcher, "--nnodes", "1", "--node-rank", "0",
            "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
            *trainer]


def _attested_since(dep: Deployment, broker: str, since_ms: int) -> bool:
    return any(r["event"] == "attest" and r["outcome"] == "allowed"
               and r["actor"] == f"node:{NODE}"
               for r in dep.audit_since(broker, since_ms))


_DEK: list[bytes] = []

CASES = [
    ("alone", "before-attestation", signal.SIGTERM),
    ("alone", "release", signal.SIGQUIT),
    ("alone", "first-shard", signal.SIGHUP),
    ("alone", "mid-training", signal.SIGINT),
    ("alone", "mid-training", signal.SIGTERM),
    ("alone", "checkpoint", signal.SIGTERM),
    ("torchrun", "before-attestation", signal.SIGQUIT),
    ("torchrun", "release", signal.SIGHUP),
    ("torchrun", "first-shard", signal.SIGINT),
    ("torchrun", "mid-training", signal.SIGTERM),
    ("torchrun", "checkpoint", signal.SIGINT),
    ("torchrun-plain", "mid-training", signal.SIGHUP),
]


@pytest.mark.parametrize(("entry", "phase", "signum"), CASES,
                         ids=[f"{e}-{p}-{s.name}" for e, p, s in CASES])
def test_stop_signal_shreds_and_exits_documented_status(
    deployment: Deployment, signal_job: Path, entry: str, phase: str,  # noqa: F811
    signum: signal.Signals,
):
    harness = deployment.harness
    rendered = signal_job.parent / "job.yaml"
    first_run = not signal_job.exists()
    if first_run:
        assert (entry, phase) == ("alone", "before-attestation"), "the matrix starts here"
    checkpoints = harness.volume_path("store") / "checkpoints"
    shutil.rmtree(checkpoints, ignore_errors=True)  # each case starts at step 0
    since = int(time.time() * 1000)
    job: Started | None = None
    with contextlib.ExitStack() as stack:
        if phase == "before-attestation":
            stack.enter_context(_stopped(deployment, "provider-broker"))
        elif phase == "release":
            stack.enter_context(_audit_held(deployment, "tenant"))
        if first_run:  # node.py itself: it renders the job file and execs the trainer
            argv = [PYTHON, *deployment.node_argv(SERVICE, NODE,
                                                          deployment.variables["TPM_A_PORT"])[1:]]
        else:
            argv = _argv(deployment, entry, signal_job)
        job = Started(deployment, argv)
        try:
            if phase == "before-attestation":
                job.wait_until(lambda: _masked(_trainer_pid(job, entry)), "signal mask")
            elif phase == "release":
                job.wait_until(lambda: _attested_since(deployment, "provider", since),
                               "attestation at the provider broker")
            elif phase == "first-shard":
                job.wait_until(lambda: "dataset key from" in job.output, "the dataset key")
                job.fill_pipe()
                job.wait_until(lambda: _writing_to_full_pipe(_trainer_pid(job, entry)),
                               "the trainer's next line", read=False)
            elif phase == "mid-training":
                job.wait_until(lambda: "step 1/" in job.output, "step 1")
                _assert_every_thread_masked(_trainer_pid(job, entry))
            else:
                job.wait_until(lambda: "step 1/" in job.output, "step 1")
                job.fill_pipe()
                job.wait_until(lambda: any(checkpoints.rglob(".tmp-ckpt-*")),
                               "a checkpoint being written")
            os.kill(job.pid, signum)
            code = job.finish()
        finally:
            job.kill()
    if first_run:  # node.py rendered node-a's job file: the other cases run a copy of it
        _write_signal_job(rendered, signal_job)
    output = job.output
    name = signal.Signals(signum).name
    assert f"shred report (signal {name})" in output, output[-4000:]
    if entry == "torchrun-plain":
        assert code == 1, (code, output[-4000:])  # torch elastic re-raises the signal
        assert f"got signal: {int(signum)}" in output  # its SignalException, after the workers
    else:
        assert code == 128 + signum, (code, output[-4000:])
        assert "Traceback" not in output, output[-4000:]
    if phase == "before-attestation":
        assert not _attested_since(deployment, "provider", since)
        assert not _attested_since(deployment, "tenant", since)
    if phase == "first-shard":
        # the trainer's line it was blocked on is its first after the filler (torchrun's agent,
        # also writing to the pipe, may get its own lines in first once it is drained)
        filler = output.index("." * 4096)
        held = [line for line in output[filler:].lstrip(".").splitlines() if " rank 0 " in line]
        assert held and "reading the first shard" in held[0], output[-4000:]
        for broker in ("provider", "tenant"):
            assert any(r["event"] == "release" and r["outcome"] == "allowed"
                       and r["actor"] == f"node:{NODE}"
                       for r in deployment.audit_since(broker, since)), broker
    if phase in ("first-shard", "mid-training", "checkpoint"):
        assert re.search(r"shred report \(signal \w+\): secrets [1-9]", output), output[-4000:]
    if phase == "checkpoint":
        assert "checkpoint writing ckpt-0000000010" in output
        assert not any(checkpoints.rglob(".tmp-ckpt-*")), "temp file left"
    marker = f"CT_COMPOSE_ID={harness.run_id}:{SERVICE}\0"
    deadline = time.monotonic() + WAIT_S
    while live_processes(pgids={job.pid}, marker=marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live_processes(pgids={job.pid}, marker=marker) == []
    if not _DEK:
        fetched = harness.run(SERVICE, ["python", "-c", _DEK_SNIPPET, str(signal_job), NODE])
        assert fetched.returncode == 0, fetched.stderr.decode(errors="replace")[-3000:]
        _DEK.append(bytes.fromhex(fetched.stdout.decode()))
        assert len(_DEK[0]) == 32
    assert _files_containing(harness.run_dir, [*CANARIES, _DEK[0]]) == []
