"""One contract suite for every ObjectStore backend (local directory, mapped directory, the
in-memory fake and S3 on a real local server)."""

from __future__ import annotations

import os

import pytest

from sealed import CountingStore, LocalDirStore, ObjectStore, RangeViewStore, StoreError
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


def test_mapped_store_sees_a_replaced_object_and_reads_ahead(tmp_path) -> None:
    import os
    import threading

    from sealed import MappedDirStore

    store = MappedDirStore(tmp_path)
    store.put("shards/a", b"1" * 10_000)
    assert bytes(store.view_range("shards/a", 0, 4)) == b"1111"
    store.delete("shards/a")
    store.put("shards/a", b"2" * 20_000)  # a new file under the same name: mapped afresh
    assert bytes(store.view_range("shards/a", 19_996, 4)) == b"2222"
    # a cached range needs no read-ahead; an uncached one is read by the thread
    assert store.will_need("shards/a", 0, 20_000) is None
    fd = os.open(tmp_path / "shards" / "a", os.O_RDONLY)
    os.fdatasync(fd)
    store.close()  # unmapped: the kernel may now drop the cached pages
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    ticket = store.will_need("shards/a", 0, 20_000)
    if ticket is not None:  # the kernel dropped the pages (it may keep them; both are fine)
        assert isinstance(ticket, threading.Event)
        assert ticket.wait(60)
    assert bytes(store.view_range("shards/a", 0, 4)) == b"2222"
    store.close()
