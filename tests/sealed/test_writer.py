"""Writer input: folders and record iterables, and what happens with bad input."""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sealed import InputError, LocalDirStore, write_dataset
from sealed.errors import StoreError

from .conftest import DATASET, TENANT, VERSION
from .helpers import make_records, open_reader, write

REPO = Path(__file__).resolve().parents[2]


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def assert_store_empty(store) -> None:
    assert store.list() == []
    if isinstance(store, LocalDirStore):
        assert _all_files(store._root) == []  # no temporary files either


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_folder_round_trip_keeps_names_in_sorted_order(tmp_path, store, dek) -> None:
    files = {"b.txt": b"bee", "a/z.bin": os.urandom(3 << 20), "a/y.bin": b"", "c": b"c" * 999}
    src = _tree(tmp_path / "src", files)
    (src / "link-to-c").symlink_to(src / "c")  # a link inside the folder is followed
    progress: list[tuple[int, int]] = []
    ref = write(store, src, dek, progress=lambda d, t: progress.append((d, t)))
    assert ref.num_records == 5
    total = sum(len(v) for v in files.values()) + len(files["c"])
    assert progress[-1] == (total, total)
    assert all(d1 <= d2 for (d1, _), (d2, _) in itertools.pairwise(progress))
    with open_reader(store, ref, dek) as reader:
        names = [reader.record_name(k) for k in range(reader.num_records)]
        assert names == ["a/y.bin", "a/z.bin", "b.txt", "c", "link-to-c"]
        for k, name in enumerate(names):
            assert reader.read_record(k) == files.get(name, files["c"])


def test_empty_dataset_is_an_error(tmp_path, store, dek) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no records"):
        write(store, tmp_path / "empty", dek)
    with pytest.raises(InputError, match="no records"):
        write(store, [], dek)
    assert_store_empty(store)


def test_oversized_record_is_an_error_naming_it(tmp_path, store, dek) -> None:
    src = _tree(tmp_path / "src", {"ok.bin": b"x" * 100, "big.bin": b"x" * 5000})
    with pytest.raises(InputError, match=r"big\.bin: 5000 bytes exceeds the maximum record size"):
        write(store, src, dek, max_record_size=4096)
    with pytest.raises(InputError, match=r"record 2: 5000 bytes exceeds"):
        write(store, [b"a", b"b", b"x" * 5000], dek, max_record_size=4096)
    with pytest.raises(InputError, match=r"huge: 5000 bytes exceeds"):
        write(store, [("small", b"a"), ("huge", b"x" * 5000)], dek, max_record_size=4096)
    assert_store_empty(store)


@pytest.mark.parametrize(
    "name", ["../etc/passwd", "/etc/passwd", "a/../../b", "a/./b", "a//b", "", "a\nb", "dir/"]
)
def test_record_names_with_traversal_are_rejected(name, store, dek) -> None:
    with pytest.raises(InputError, match="record name"):
        write(store, [("fine.txt", b"1"), (name, b"2")], dek)
    assert_store_empty(store)


def test_symlink_escaping_the_folder_is_rejected(tmp_path, store, dek) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not part of the dataset")
    src = _tree(tmp_path / "src", {"a.txt": b"a"})
    (src / "escape").symlink_to(Path("..") / "outside.txt")
    with pytest.raises(InputError, match="escape: symbolic link points outside the source"):
        write(store, src, dek)
    assert_store_empty(store)


def test_symlinked_folder_and_special_files_are_rejected(tmp_path, store, dek) -> None:
    src = _tree(tmp_path / "src", {"sub/a.txt": b"a"})
    (src / "loop").symlink_to(src / "sub")
    with pytest.raises(InputError, match="loop: a folder"):
        write(store, src, dek)
    (src / "loop").unlink()
    os.mkfifo(src / "pipe")
    with pytest.raises(InputError, match="pipe: not a regular file"):
        write(store, src, dek)
    (src / "pipe").unlink()
    (src / "dangling").symlink_to(src / "missing")
    with pytest.raises(InputError, match="dangling: cannot read"):
        write(store, src, dek)
    assert_store_empty(store)


def test_unreadable_file_is_rejected_before_anything_is_written(tmp_path) -> None:
    """A real permission failure in a real process (root loses its DAC override for it)."""
    src = _tree(tmp_path / "src", {"a.bin": os.urandom(2 << 20), "m/locked.bin": b"secret"})
    (src / "m" / "locked.bin").chmod(0)
    store_dir = tmp_path / "store"
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from sealed import InputError, LocalDirStore, SecretBuffer, write_dataset
        store = LocalDirStore({str(store_dir)!r})
        try:
            write_dataset(store, Path({str(src)!r}), dek=SecretBuffer.random(32),
                          tenant_id={TENANT!r}, dataset_id={DATASET!r}, key_version={VERSION},
                          share_holders=["b"], target_shard_size=1 << 20)
        except InputError as exc:
            print(exc)
            sys.exit(3)
        """
    )
    cmd = [sys.executable, "-c", script]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=None)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.strip() == "m/locked.bin: cannot read: Permission denied"
    assert_store_empty(LocalDirStore(store_dir))


class _Flaky:
    """A re-iterable source whose second pass fails at record ``fail_at`` (a real OSError)."""

    def __init__(self, records: list[bytes], fail_at: int) -> None:
        self.records, self.fail_at, self.passes = records, fail_at, 0

    def __iter__(self):
        self.passes += 1
        for k, r in enumerate(self.records):
            if self.passes == 2 and k == self.fail_at:
                raise OSError("disk went away")
            yield r


def test_failure_mid_write_removes_every_published_shard(store, dek) -> None:
    records = make_records([1 << 20] * 9)
    src = _Flaky(records, fail_at=7)
    with pytest.raises(OSError, match="disk went away"):
        write(store, src, dek, target_shard_size=2 << 20)  # 4+ shards, 3 published by then
    assert src.passes == 2
    assert_store_empty(store)


def test_source_that_changes_between_passes_is_an_error(store, dek) -> None:
    class Changing:
        def __init__(self) -> None:
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            yield b"a" * (1 << 20)
            yield b"b" * (10 if self.passes == 1 else 11)

    with pytest.raises(InputError, match="record 1: the source changed between the two passes"):
        write(store, Changing(), dek, target_shard_size=1 << 20)
    assert_store_empty(store)


def test_file_that_grows_while_encrypting_is_an_error(tmp_path, store, dek) -> None:
    src = _tree(tmp_path / "src", {"a.bin": b"a" * 100, "b.bin": b"b" * 100})

    def grow(done: int, total: int) -> None:  # after record a, b.bin changes on disk
        if done == 100:
            (src / "b.bin").write_bytes(b"b" * 150)

    with pytest.raises(InputError, match=r"b\.bin: file changed size"):
        write(store, src, dek, progress=grow)
    assert_store_empty(store)


def test_one_shot_iterators_and_bad_items_are_rejected(store, dek) -> None:
    with pytest.raises(InputError, match="re-iterable"):
        write(store, (r for r in [b"a", b"b"]), dek)
    with pytest.raises(InputError, match="record 1: expected a bytes-like object, got int"):
        write(store, [b"a", 5], dek)
    with pytest.raises(InputError, match="source must be"):
        write(store, "/some/path", dek)
    assert_store_empty(store)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"key_version": 0}, "key_version"),
        ({"tenant_id": "../x"}, "tenant id"),
        ({"share_holders": []}, "share_holders"),
        ({"share_holders": "broker"}, "share_holders"),
        ({"target_shard_size": 10}, "target_shard_size"),
        ({"max_record_size": 0}, "max_record_size"),
    ],
)
def test_bad_arguments_are_value_errors(kw, match, store, dek) -> None:
    with pytest.raises(ValueError, match=match):
        write(store, [b"a"], dek, **kw)
    assert_store_empty(store)


def test_dek_must_be_a_secret_buffer(store) -> None:
    with pytest.raises(ValueError, match="SecretBuffer"):
        write_dataset(
            store,
            [b"a"],
            dek=b"k" * 32,
            tenant_id=TENANT,
            dataset_id=DATASET,
            key_version=1,
            share_holders=["b"],
        )


class _FailingStore:
    """Delegates to ``inner`` but fails the ``fail_at``-th put after consuming some chunks."""

    def __init__(self, inner, fail_at: int) -> None:
        self.inner, self.fail_at, self.puts = inner, fail_at, 0

    def _put(self, name, data, put):
        self.puts += 1
        if self.puts == self.fail_at:
            for i, _chunk in enumerate(data):
                if i == 2:
                    raise StoreError(f"cannot write object {name}: disk full")
        return put(name, data)

    def put(self, name, data):
        return self._put(name, data, self.inner.put)

    def __getattr__(self, attr):
        if attr == "put_unsynced" and hasattr(self.inner, attr):  # the writer's shard puts
            return lambda name, data: self._put(name, data, self.inner.put_unsynced)
        return getattr(self.inner, attr)


def test_store_failure_in_the_store_thread_is_raised_and_leaves_nothing(store, dek) -> None:
    failing = _FailingStore(store, fail_at=3)
    with pytest.raises(StoreError, match="disk full"):
        write(failing, make_records([1 << 20] * 9), dek, target_shard_size=2 << 20)
    assert_store_empty(store)


def test_segment_aligned_records_round_trip_through_the_pipeline(tmp_path, store, dek) -> None:
    # records that end exactly on segment boundaries, empty records, and one record spanning
    # many segments: the pipeline fills each segment exactly, whatever the record boundaries
    from sealed import streaming

    first = streaming.FIRST_SEGMENT_CAPACITY
    sizes = [first - 16 - 8 * 7, 0, streaming.SEGMENT_CAPACITY, 0, 5 * (1 << 20) + 3, 1]
    src = _tree(tmp_path / "src", {f"r{i}.bin": os.urandom(n) for i, n in enumerate(sizes)})
    ref = write(store, src, dek, plaintext_digests=True)
    with open_reader(store, ref, dek) as reader:
        for k in range(ref.num_records):
            assert bytes(reader.read_record(k)) == (src / f"r{k}.bin").read_bytes()
        for j in range(ref.num_shards):  # the digests the digest thread computed are right
            buf = bytearray(reader.shard_plaintext_size(j))
            view = reader.decrypt_shard_into(j, buf, verify_digest=True)
            assert reader.manifest.shards[j].sha256 == hashlib.sha256(view).digest()


def test_without_plaintext_digests_the_manifest_records_none_and_says_so(store, dek) -> None:
    from sealed.manifest import NO_DIGEST

    records = make_records([3 << 20, 5, 2 << 20])
    ref = write(store, records, dek, target_shard_size=2 << 20)  # the default: no digests
    with open_reader(store, ref, dek) as reader:
        assert all(e.sha256 == NO_DIGEST for e in reader.manifest.shards)
        buf = bytearray(reader.max_shard_plaintext_size)
        assert [bytes(r) for j in range(ref.num_shards)
                for r in reader.iter_shard_records(j, buf)] == records
        with pytest.raises(ValueError, match="no plaintext digest"):
            reader.decrypt_shard_into(0, buf, verify_digest=True)
