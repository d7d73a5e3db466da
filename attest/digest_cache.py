"""A persistent cache of file digests for the code identity guard, trusted only where no one
but root can have written it.

``trainer --attest`` checks each library it maps against the code manifest, and
``libtorch_cpu.so`` alone is over 400 MB: hashing it at every start is most of what the
checks cost (``trainer.guard.CheckCost``). This cache keeps a file's SHA-256 across starts
under the same key as the in-process memo of :func:`attest.code_digest.hash_file`::

    (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)

**Why a remembered digest never stands for other bytes.** Every write to a file, its
replacement by rename, a truncation or a ``chmod`` sets ``st_ctime`` to the current time, and
no one but root can choose that time (setting the clock needs ``CAP_SYS_TIME``); ``utime``
can put ``st_mtime`` back but it, too, sets ``st_ctime``. A file whose ctime or mtime lies
within :data:`RACY_NS` of the moment it was hashed is not saved: timestamps come from a
coarse clock, so a write in the same tick as the hash could keep the key (git's "racily
clean" rule).

**Where it is trusted** (:func:`untrusted_reason`): the cache file is read only if it is a
regular file (not a link) owned by root and not writable by group or others, and every
directory on its resolved path is owned by root and either not writable by group or others,
or sticky (``/tmp``: no one else can then rename or remove root's entries). A cache that fails
any of this, or is malformed or too large, is ignored: the guard hashes as if there were none.
So an attacker who can write files as the trainer's (non-root) user can neither forge an
entry nor make one stand for a changed file; root can do anything on a node anyway (it can
also reset PCR 23, DESIGN.md section 6). It is written only by a process running as root
(:func:`save`), atomically (a temporary file in the same directory, then ``rename``), so the
next start trusts what it wrote; it holds what that process hashed or used, so entries of
files since replaced drop out. The file is opened without following a link and checked on the
open descriptor, so what was checked is what is read.

**Format** (``ENV/ct-code-cache``, beside the manifest; never part of the measured set)::

    b"ct-code-cache/v1\\n"
    one line per file, each ending in b"\\n", fields separated by one b" ":
        DEV INO SIZE MTIME_NS CTIME_NS (decimal ASCII, no sign) SHA256-HEX(64, lowercase)

at most :data:`MAX_CACHE_BYTES` bytes.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat

from attest.code_digest import CACHE_NAME, remember, remembered

__all__ = ["CACHE_HEADER", "CACHE_NAME", "MAX_CACHE_BYTES", "RACY_NS", "load", "save",
           "untrusted_reason"]

CACHE_HEADER = b"ct-code-cache/v1\n"
MAX_CACHE_BYTES = 16 << 20
RACY_NS = 2_000_000_000
_LINE = re.compile(rb"(\d{1,20}) (\d{1,20}) (\d{1,20}) (\d{1,20}) (\d{1,20}) ([0-9a-f]{64})")
_GROUP_OR_OTHER_WRITE = stat.S_IWGRP | stat.S_IWOTH


def untrusted_reason(path: str) -> str | None:
    """Why the cache at ``path`` cannot be trusted (None when it can); see the module doc."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    try:
        return _untrusted_file(path, os.fstat(fd))
    finally:
        os.close(fd)


def _untrusted_file(path: str, st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return f"{path}: not a regular file"
    if st.st_uid != 0 or st.st_mode & _GROUP_OR_OTHER_WRITE:
        return f"{path}: not owned by root, or writable by group or others"
    return _untrusted_directory(os.path.dirname(os.path.realpath(path)))


def _untrusted_directory(directory: str) -> str | None:
    while True:
        try:
            st = os.stat(directory)
        except OSError as exc:
            return f"{directory}: {exc.strerror}"
        if st.st_uid != 0 or (st.st_mode & _GROUP_OR_OTHER_WRITE
                              and not st.st_mode & stat.S_ISVTX):
            return f"{directory}: not owned by root, or writable by others without sticky bit"
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def load(path: str) -> int:
    """Remember the digests of a trusted cache in this process (:func:`remember`); the number
    of entries taken, 0 when there is no cache or it is not trusted or not well formed. The
    checks are made on the open file (no link followed), so what was checked is what is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return 0
    with os.fdopen(fd, "rb") as f:
        if _untrusted_file(path, os.fstat(f.fileno())) is not None:
            return 0
        try:
            data = f.read(MAX_CACHE_BYTES + 1)
        except OSError:
            return 0
    if len(data) > MAX_CACHE_BYTES or not data.startswith(CACHE_HEADER):
        return 0
    entries = []
    for line in data[len(CACHE_HEADER):].split(b"\n")[:-1]:
        match = _LINE.fullmatch(line)
        if match is None:
            return 0  # not ours: ignore all of it
        *key, digest = match.groups()
        entries.append((tuple(int(k) for k in key), digest.decode()))
    for key, digest in entries:
        remember(key, digest)  # type: ignore[arg-type]
    return len(entries)


def save(path: str) -> int:
    """Write the digests this process hashed or used (except racy entries; cached entries it
    never asked for drop out) to the cache at ``path``, when running as root into a trusted
    directory; the number of entries written (0: not written). Failure to write (a read-only
    image) is not an error."""
    if os.geteuid() != 0:
        return 0
    directory = os.path.dirname(os.path.realpath(path))
    if _untrusted_directory(directory) is not None:
        return 0
    known = remembered()
    if not any(hashed_at_ns for _, hashed_at_ns in known.values()):
        return 0  # nothing new: everything came from the cache
    lines = []
    for key, (digest, hashed_at_ns) in sorted(known.items()):
        _dev, _ino, _size, mtime_ns, ctime_ns = key
        if hashed_at_ns and max(mtime_ns, ctime_ns) > hashed_at_ns - RACY_NS:
            continue
        lines.append(f"{' '.join(map(str, key))} {digest}\n".encode())
    data = CACHE_HEADER + b"".join(lines)
    if len(data) > MAX_CACHE_BYTES:
        return 0
    import tempfile  # here: the guard imports this module before it is installed

    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{CACHE_NAME}.", suffix=".tmp", dir=directory)
    except OSError:
        return 0
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), 0o644)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        return 0
    return len(lines)
