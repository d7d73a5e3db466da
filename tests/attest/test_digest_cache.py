"""The persistent digest cache of the code identity guard (attest/digest_cache.py): a cached
digest never stands for changed bytes, and a cache anyone but root could have written is
ignored. The path through ``trainer --attest`` is
tests/compose/test_code_identity.py::test_a_cached_digest_never_stands_for_a_changed_library.

Writing a cache that the next process trusts takes root (the cache must be root's), as on a
node whose trainer runs as root; the harness and CI run as root."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from attest import code_digest, digest_cache
from attest.code_digest import CACHE_NAME, hash_file_counted

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="a trusted cache is root's: these tests write one")


@pytest.fixture
def memo() -> Iterator[None]:
    """A process memo that starts empty, as in a fresh trainer process."""
    saved = dict(code_digest._memo), dict(code_digest._cached)
    _forget()
    yield
    _forget()
    code_digest._memo.update(saved[0])
    code_digest._cached.update(saved[1])


def _forget() -> None:
    code_digest._memo.clear()
    code_digest._cached.clear()


def _old_file() -> str:
    """A file changed long ago (this interpreter's ``os`` module): not racy."""
    return os.path.realpath(os.__file__)


def _key_line(path: str | Path, digest: str) -> bytes:
    st = os.stat(path)
    return (f"{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} "
            f"{digest}\n").encode()


def _write_cache(path: Path, *lines: bytes, mode: int = 0o644) -> Path:
    path.write_bytes(digest_cache.CACHE_HEADER + b"".join(lines))
    path.chmod(mode)
    return path


def test_a_saved_cache_spares_the_next_process_the_hashing(tmp_path: Path, memo: None):
    cache = tmp_path / CACHE_NAME
    digest, size, read = hash_file_counted(_old_file())
    assert read == size > 0
    assert digest_cache.save(str(cache)) == 1
    assert _key_line(_old_file(), digest) in cache.read_bytes()
    assert oct(cache.stat().st_mode & 0o777) == "0o644" and cache.stat().st_uid == 0

    _forget()  # the next process
    assert digest_cache.load(str(cache)) == 1
    assert hash_file_counted(_old_file()) == (digest, size, 0)  # nothing read


def test_a_changed_file_is_hashed_again_though_size_and_mtime_are_kept(tmp_path: Path,
                                                                       memo: None):
    target = tmp_path / "lib.so"
    target.write_bytes(b"A" * 4096)
    good = hashlib.sha256(b"A" * 4096).hexdigest()
    cache = _write_cache(tmp_path / CACHE_NAME, _key_line(target, good))
    before = target.stat()
    with open(target, "r+b") as f:  # in place: same inode, same size
        f.write(b"B")
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime put back
    assert digest_cache.load(str(cache)) == 1
    digest, size, read = hash_file_counted(str(target))
    assert read == size == 4096
    assert digest == hashlib.sha256(b"B" + b"A" * 4095).hexdigest() != good


def test_entries_no_one_asked_for_drop_out_when_the_cache_is_written(tmp_path: Path,
                                                                     memo: None):
    digest = hash_file_counted(_old_file())[0]
    _forget()
    stale = b"1 2 3 4 5 " + b"0" * 64 + b"\n"  # a file replaced since: never asked for
    cache = _write_cache(tmp_path / CACHE_NAME, stale, _key_line(_old_file(), digest))
    assert digest_cache.load(str(cache)) == 2
    fresh = tmp_path / "old-enough.so"
    fresh.write_bytes(b"x")
    assert hash_file_counted(_old_file())[2] == 0  # from the cache
    os.utime(fresh, ns=(0, 0))
    hash_file_counted(str(fresh))  # racy (ctime now): not saved, but something new to write
    assert digest_cache.save(str(cache)) == 1
    assert cache.read_bytes() == digest_cache.CACHE_HEADER + _key_line(_old_file(), digest)


def test_a_file_changed_just_before_it_was_hashed_is_not_saved(tmp_path: Path, memo: None):
    fresh = tmp_path / "fresh.so"
    fresh.write_bytes(b"new")
    hash_file_counted(str(fresh))
    hash_file_counted(_old_file())
    cache = tmp_path / CACHE_NAME
    assert digest_cache.save(str(cache)) == 1  # the old file only
    text = cache.read_bytes()
    assert f" {fresh.stat().st_ino} ".encode() not in text
    assert _key_line(_old_file(), hash_file_counted(_old_file())[0]) in text


@pytest.mark.parametrize("case", ["group-writable", "not-root", "link", "open-directory",
                                  "malformed"])
def test_a_cache_others_could_have_written_is_ignored(tmp_path: Path, memo: None, case: str):
    digest = hash_file_counted(_old_file())[0]
    _forget()
    directory = tmp_path / "env"
    directory.mkdir()
    cache = _write_cache(directory / CACHE_NAME, _key_line(_old_file(), digest))
    if case == "group-writable":
        cache.chmod(0o664)
    elif case == "not-root":
        os.chown(cache, 65534, 65534)
    elif case == "link":
        real = cache.rename(tmp_path / "elsewhere")
        cache.symlink_to(real)
    elif case == "open-directory":
        directory.chmod(0o777)  # anyone may rename a file of root's away: no sticky bit
    else:
        _write_cache(cache, _key_line(_old_file(), digest), b"not a cache line\n")
    assert digest_cache.load(str(cache)) == 0
    assert hash_file_counted(_old_file())[2] > 0  # hashed, not taken from the cache


def test_a_sticky_world_writable_directory_above_is_trusted(tmp_path: Path, memo: None):
    """``/tmp``'s mode: others may add entries but not rename or remove root's."""
    digest = hash_file_counted(_old_file())[0]
    _forget()
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "env").mkdir()
    cache = _write_cache(sticky / "env" / CACHE_NAME, _key_line(_old_file(), digest))
    assert digest_cache.untrusted_reason(str(cache)) is None
    assert digest_cache.load(str(cache)) == 1


def test_nothing_is_written_where_others_could_write(tmp_path: Path, memo: None):
    hash_file_counted(_old_file())
    directory = tmp_path / "open"
    directory.mkdir()
    directory.chmod(0o777)
    assert digest_cache.save(str(directory / CACHE_NAME)) == 0
    assert list(directory.iterdir()) == []


def test_the_cache_is_not_part_of_the_measured_code_set(tmp_path: Path):
    """The manifest of an environment is the same with a cache beside it."""
    from compose.image import build_image_environment

    env = build_image_environment(tmp_path / "env")
    before = code_digest.environment_manifest(str(env))
    _write_cache(env / CACHE_NAME, b"")
    assert code_digest.environment_manifest(str(env)) == before
