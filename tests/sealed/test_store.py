"""One contract suite for every ObjectStore backend (local directory, mapped directory, the
in-memory fake and S3 on a real local server)."""

from __future__ import annotations

import os

import pytest

from sealed import (
    CountingStore,
    LocalDirStore,
    MemoryStore,
    ObjectStore,
    RangeViewStore,
    StoreError,
)
from sealed.s3store import S3Store


def test_backends_implement_the_protocol(store) -> None:
    assert isinstance(store, ObjectStore)
    assert isinstance(CountingStore(store), ObjectStore)


def test_put_get_range_size_list_delete(store) -> None:
    data = os.urandom(10_000)
    assert store.put("shards/abc", [data[:3000], memoryview(data)[3000:], b""]) == 10_000
    store.put("manifests/m1", b"manifest")
    assert store.exists("shards/abc") and not store.exists("shards/abd")
    assert store.size("shards/abc") == 10_000
    assert store.get_range("shards/abc", 1234, 100) == data[1234:1334]
    buf = bytearray(500)
    store.readinto("shards/abc", 9500, buf)
    assert buf == data[9500:]
    assert store.list() == ["manifests/m1", "shards/abc"]
    assert store.list("shards/") == ["shards/abc"]
    store.delete("shards/abc")
    store.delete("shards/abc")  # idempotent
    assert store.list() == ["manifests/m1"]


def test_objects_are_immutable(store) -> None:
    store.put("a", b"1")
    with pytest.raises(StoreError, match="already exists"):
        store.put("a", b"2")
    assert store.get_range("a", 0, 1) == b"1"


def test_failed_put_leaves_nothing(store, tmp_path) -> None:
    def chunks():
        yield b"partial data"
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        store.put("shards/x", chunks())
    assert not store.exists("shards/x")
    assert store.list() == []
    if isinstance(store, LocalDirStore):
        assert [p for p in store._root.rglob("*") if p.is_file()] == []


def test_reads_past_the_end_and_missing_objects_are_store_errors(store) -> None:
    store.put("a", b"12345")
    with pytest.raises(StoreError, match="shorter than 10 bytes"):
        store.get_range("a", 5, 5)
    with pytest.raises(StoreError, match="not found"):
        store.size("missing")
    with pytest.raises(StoreError, match="not found"):
        store.readinto("missing", 0, bytearray(1))
    with pytest.raises(StoreError, match="invalid range"):
        store.get_range("a", -1, 2)


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "/abs",
        "a/../b",
        ".hidden",
        "a//b",
        "",
        "a/",
        "sp ace",
        "x" * 513,
        "a\x00b",
        "/".join("a" * 9),
    ],
)
def test_invalid_names_are_rejected(store, name) -> None:
    with pytest.raises(StoreError, match="object name"):
        store.put(name, b"x")
    assert store.list() == []


def test_local_store_writes_only_inside_its_root(tmp_path) -> None:
    store = LocalDirStore(tmp_path / "root")
    store.put("shards/s1", b"data")
    assert (tmp_path / "root" / "shards" / "s1").read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
    assert "root" not in repr(store) and str(tmp_path) not in repr(store)


def test_local_store_ignores_leftover_temporary_files(tmp_path) -> None:
    store = LocalDirStore(tmp_path / "root")
    (tmp_path / "root" / "shards").mkdir()
    (tmp_path / "root" / "shards" / ".tmp-deadbeef").write_bytes(b"crashed write")
    store.put("shards/s1", b"data")
    assert store.list() == ["shards/s1"]


def test_counting_store_counts_bytes_and_calls(store) -> None:
    store.put("a", b"0123456789")
    counting = CountingStore(store)
    counting.get_range("a", 2, 3)
    counting.readinto("a", 0, bytearray(4))
    assert (counting.bytes_read, counting.reads) == (7, 2)
    assert counting.ranges == [("a", 2, 3), ("a", 0, 4)]


def test_zero_copy_views_match_ranged_reads(store) -> None:
    data = os.urandom(5000)
    store.put("a", data)
    if not isinstance(store, RangeViewStore):
        assert type(store) in (LocalDirStore, S3Store)
        return
    view = store.view_range("a", 100, 4000)
    assert view.readonly and view == data[100:4100] == store.get_range("a", 100, 4000)
    assert store.view_range("a", 5000, 0) == b""
    with pytest.raises(StoreError, match="shorter than 5001 bytes"):
        store.view_range("a", 1, 5000)
    with pytest.raises(StoreError, match="not found"):
        store.view_range("missing", 0, 1)
    del view
    store.delete("a")
    assert not store.exists("a")


def _drop_cached(path) -> None:
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_mapped_store_sees_a_replaced_object_and_fetches_in_the_background(tmp_path) -> None:
    from sealed import MappedDirStore

    store = MappedDirStore(tmp_path)
    store.put("shards/a", b"1" * 10_000)
    assert bytes(store.view_range("shards/a", 0, 4)) == b"1111"
    store.delete("shards/a")
    data = os.urandom(20_000)
    store.put("shards/a", data)  # a new file under the same name: mapped afresh
    assert bytes(store.view_range("shards/a", 19_996, 4)) == data[-4:]
    with store.fetch("shards/a") as fetch:
        assert fetch.cached(0, 20_000)  # just read through the mapping
        assert fetch.cached(5, 0)
        store.close()  # unmapped: the kernel may now drop the cached pages
        _drop_cached(tmp_path / "shards" / "a")
        # the kernel may keep the pages; whether cached or not, the I/O thread reads them
        buf = bytearray(12_000)
        ticket = fetch.read_into(7_000, memoryview(buf))
        ticket.wait()
        assert buf == data[7_000:19_000]
        two = [bytearray(10_000), bytearray(10_000)]
        tickets = [fetch.read_into(k * 10_000, memoryview(b)) for k, b in enumerate(two)]
        for t in tickets:
            t.wait()
        assert b"".join(two) == data
    with pytest.raises(StoreError, match="closed"):
        fetch.read_into(0, memoryview(bytearray(1)))
    with pytest.raises(StoreError, match="not found"):
        store.fetch("shards/missing")
    store.close()


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux's")
def test_fetch_advises_the_kernel_of_a_sequential_read(tmp_path, monkeypatch) -> None:
    # what the kernel does with the advice (a read-ahead window twice the device's) is not
    # observable from here; that the fetch's own file is advised, whole, is
    from sealed import MappedDirStore

    store = MappedDirStore(tmp_path)
    data = os.urandom(30_000)
    store.put("shards/a", data)
    advised: list[tuple[int, int, int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append((os.fstat(fd).st_ino, offset, length, advice))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    with store.fetch("shards/a") as fetch:
        ino = os.stat(tmp_path / "shards" / "a").st_ino
        assert advised == [(ino, 0, 0, os.POSIX_FADV_SEQUENTIAL)]
        buf = bytearray(30_000)
        fetch.read_into(0, memoryview(buf)).wait()
        assert buf == data

    def refused(fd: int, offset: int, length: int, advice: int) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refused)  # advice refused: still read in full
    with store.fetch("shards/a") as fetch:
        buf = bytearray(30_000)
        fetch.read_into(0, memoryview(buf)).wait()
        assert buf == data
    store.close()


def test_a_background_read_past_the_end_is_an_error_not_a_short_buffer(tmp_path) -> None:
    from sealed import MappedDirStore

    store = MappedDirStore(tmp_path)
    store.put("shards/a", b"x" * 5000)
    with store.fetch("shards/a") as fetch:
        ticket = fetch.read_into(4000, memoryview(bytearray(2000)))
        with pytest.raises(StoreError, match="shorter than 6000 bytes"):
            ticket.wait()
        ticket = fetch.read_into(0, memoryview(bytearray(5000)))  # the thread still serves
        ticket.wait()
    store.close()


def test_counting_store_counts_background_reads(tmp_path) -> None:
    from sealed import MappedDirStore

    store = MappedDirStore(tmp_path)
    store.put("shards/a", b"y" * 5000)
    counting = CountingStore(store)
    fetch = counting.fetch("shards/a")
    assert fetch is not None
    buf = bytearray(3000)
    fetch.read_into(1000, memoryview(buf)).wait()
    fetch.close()
    assert buf == b"y" * 3000
    assert counting.ranges == [("shards/a", 1000, 3000)]
    assert CountingStore(LocalDirStore(tmp_path)).fetch("shards/a") is None
    store.close()


def test_unsynced_puts_are_complete_at_once_and_durable_after_sync(tmp_path) -> None:
    from sealed import DeferredSyncStore, MappedDirStore

    for store in (LocalDirStore(tmp_path / "l"), MappedDirStore(tmp_path / "m")):
        assert isinstance(store, DeferredSyncStore)
        data = os.urandom(20_000)
        assert store.put_unsynced("shards/a", [data[:7], data[7:]]) == 20_000
        assert store.get_range("shards/a", 0, 20_000) == data  # complete for readers now
        with pytest.raises(StoreError, match="already exists"):
            store.put_unsynced("shards/a", b"x")
        store.put_unsynced("shards/b", b"y")
        store.delete("shards/b")  # deleted before the sync: skipped, not an error
        store.sync()
        store.sync()  # nothing left to sync
        assert store.list() == ["shards/a"]
    assert not isinstance(MemoryStore(), DeferredSyncStore)


@pytest.mark.parametrize("probe", ["cachestat", "rwf_nowait"])
def test_the_cache_probe_sees_what_was_read_and_misses_what_was_dropped(
    tmp_path, monkeypatch, probe
) -> None:
    from sealed import MappedDirStore
    from sealed import store as store_module

    if probe == "rwf_nowait":  # a kernel without cachestat(2): the fallback probe
        monkeypatch.setattr(store_module, "_cachestat", [None])
    store = MappedDirStore(tmp_path)
    data = os.urandom(3 << 20)
    store.put("shards/a", data)
    with store.fetch("shards/a") as fetch:
        buf = bytearray(len(data))
        fetch.read_into(0, memoryview(buf)).wait()  # read: now in the page cache
        assert buf == data
        assert fetch.cached(0, len(data)) and fetch.cached(4096, 10)
        _drop_cached(tmp_path / "shards" / "a")  # never mapped: clean pages go
        dropped = not fetch.cached(0, len(data))
        if probe == "cachestat" and store_module._cachestat[0] is not None:
            assert dropped  # exact: a range with any page missing is not cached
    store.close()
