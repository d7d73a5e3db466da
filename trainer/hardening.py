"""Process hardening applied before any key arrives, and a self-check that reports on it.

:func:`harden_process` does, in order:

1. ``prctl(PR_SET_DUMPABLE, 0)``: no core dumps, ``/proc/PID/mem`` closed to other users'
   debuggers and non-root ptrace;
2. ``RLIMIT_CORE = 0`` (soft and hard): no core file even if dumpability comes back;
3. ``umask(0o077)``: whatever the trainer writes (encrypted checkpoints) is owner-only;
4. ``mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`` where allowed, so no page of the process
   (keys, plaintext buffers) can be swapped out. ``MCL_ONFAULT`` locks pages as they are
   touched rather than populating every reservation. It is only attempted with
   ``CAP_IPC_LOCK`` or an unlimited ``RLIMIT_MEMLOCK``: under a finite limit every later
   allocation would count against it and fail once it is reached. Otherwise the check reports
   it, and key buffers are still ``mlock``-ed one by one by
   :class:`~sealed.secrets.SecretBuffer`.

:func:`self_check` returns one :class:`Check` per property with how to fix a failure.
``required`` checks must pass for ``trainer --attest`` to start; the others are advisory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
from dataclasses import dataclass

__all__ = [
    "Check",
    "HardeningResult",
    "failed_required",
    "format_checks",
    "harden_process",
    "self_check",
]

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4
_KEY_PROBE_BYTES = 8 * 1024  # the key buffers of a job (a few 32-byte keys) fit in this

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    required: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        status = "ok  " if self.ok else ("FAIL" if self.required else "warn")
        text = f"[{status}] {self.name}: {self.detail}"
        if not self.ok and self.fix:
            text += f"\n       fix: {self.fix}"
        return text


@dataclass(frozen=True, slots=True)
class HardeningResult:
    mlockall: bool
    mlockall_error: str


def harden_process() -> HardeningResult:
    """Apply every hardening step; never raises for an mlockall refusal (the check reports it)."""
    if _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_DUMPABLE, 0) failed: {os.strerror(err)}")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.umask(0o077)
    if not _mlockall_unbounded():
        # with MCL_FUTURE, every later allocation would count against a finite
        # RLIMIT_MEMLOCK and fail once it is reached: lock key buffers only
        limit = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
        return HardeningResult(
            mlockall=False,
            mlockall_error=f"skipped: RLIMIT_MEMLOCK is {limit} bytes and CAP_IPC_LOCK is absent",
        )
    if _libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0:
        return HardeningResult(mlockall=True, mlockall_error="")
    err = ctypes.get_errno()
    return HardeningResult(mlockall=False, mlockall_error=os.strerror(err))


CAP_IPC_LOCK = 14


def _has_cap_ipc_lock() -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    except (OSError, ValueError):
        pass
    return False


def _mlockall_unbounded() -> bool:
    """Whether locking all future memory cannot make allocations fail."""
    limit = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    return limit == resource.RLIM_INFINITY or _has_cap_ipc_lock()


def _locked_kib() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmLck:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _can_mlock_keys() -> tuple[bool, str]:
    buf = ctypes.create_string_buffer(_KEY_PROBE_BYTES)
    if _libc.mlock(buf, _KEY_PROBE_BYTES) != 0:
        return False, os.strerror(ctypes.get_errno())
    _libc.munlock(buf, _KEY_PROBE_BYTES)
    return True, ""


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return None


def self_check() -> list[Check]:
    """Report each hardening property of the current process and host."""
    checks: list[Check] = []
    dumpable = _libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    checks.append(
        Check(
            "not-dumpable",
            dumpable == 0,
            True,
            f"PR_GET_DUMPABLE = {dumpable}",
            "the trainer sets prctl(PR_SET_DUMPABLE, 0) itself; if it is still 1, a wrapper or "
            "a setuid transition re-enabled it: run the trainer directly",
        )
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    checks.append(
        Check(
            "no-core-dumps",
            soft == 0 and hard == 0,
            True,
            f"RLIMIT_CORE = ({soft}, {hard})",
            "run with `ulimit -c 0`, or let the trainer lower it (it needs no privilege)",
        )
    )
    mask = os.umask(0o077)
    os.umask(mask)
    checks.append(
        Check(
            "umask-077",
            mask & 0o077 == 0o077,
            True,
            f"umask = {mask:04o}",
            "run with `umask 077` so files the trainer writes are owner-only",
        )
    )
    can_lock, why = _can_mlock_keys()
    memlock = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    checks.append(
        Check(
            "mlock-key-buffers",
            can_lock,
            True,
            "key buffers can be locked in RAM" if can_lock
            else f"mlock refused ({why}); RLIMIT_MEMLOCK = {memlock}",
            "raise the locked-memory limit (`ulimit -l 1024` or more, LimitMEMLOCK= in systemd, "
            "--ulimit memlock= in docker) or grant CAP_IPC_LOCK",
        )
    )
    locked = _locked_kib()
    checks.append(
        Check(
            "mlockall",
            locked > 0,
            False,
            f"{locked} KiB locked" if locked else "process memory is not locked (mlockall not "
            "applied or refused)",
            "grant CAP_IPC_LOCK or set RLIMIT_MEMLOCK to unlimited so the whole trainer can be "
            "locked; otherwise only key buffers are locked and plaintext pages could swap",
        )
    )
    swaps = _read("/proc/swaps")
    swap_on = bool(swaps and len(swaps.splitlines()) > 1)
    checks.append(
        Check(
            "swap-off",
            not swap_on,
            False,
            "swap is enabled" if swap_on else "no swap device",
            "disable swap (`swapoff -a`) or rely on mlockall; the attestation policy may require "
            "it",
        )
    )
    pattern = _read("/proc/sys/kernel/core_pattern") or ""
    checks.append(
        Check(
            "core-pattern",
            not pattern.startswith("|") or (soft == 0 and hard == 0),
            False,
            f"core_pattern = {pattern!r}",
            "core dumps piped to a helper ignore RLIMIT_CORE for some handlers; keep the process "
            "non-dumpable",
        )
    )
    return checks


def format_checks(checks: list[Check]) -> str:
    return "\n".join(c.line() for c in checks)


def failed_required(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.required and not c.ok]
