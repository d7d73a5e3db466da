"""S3Store against a real S3-compatible server (moto's server mode as a subprocess).

The generic contract runs in test_store.py (the ``store`` fixture includes S3); here: what is
S3's own: multipart uploads, ranged and parallel GETs, prefetch, the standard configuration
chain (profile files, environment), TLS to the endpoint, addresses, errors.
"""

from __future__ import annotations

import itertools
import os
import re
import threading

import pytest

from sealed import StoreError, open_store
from sealed.s3store import S3Store, parse_s3_url
from tests.s3server import S3Server

MIB = 1 << 20


class Requests:
    """Every HTTP request a botocore client sends: (method, path, Range header)."""

    def __init__(self, client) -> None:
        self.seen: list[tuple[str, str, str | None, str]] = []
        self._lock = threading.Lock()
        client.meta.events.register("before-send.s3", self._record)

    def _record(self, request, **_: object) -> None:
        rng = request.headers.get("Range")
        auth = request.headers.get("Authorization", b"")
        with self._lock:
            self.seen.append((request.method, request.url.split("?")[0],
                              rng.decode() if isinstance(rng, bytes) else rng,
                              auth.decode() if isinstance(auth, bytes) else auth))

    def ranges(self) -> list[tuple[int, int]]:
        out = []
        for method, _, rng, _ in self.seen:
            if method == "GET" and rng:
                a, b = re.fullmatch(r"bytes=(\d+)-(\d+)", rng).groups()
                out.append((int(a), int(b) + 1))
        return sorted(out)

    def clear(self) -> None:
        with self._lock:
            self.seen.clear()


@pytest.fixture
def s3(s3_server):
    store = s3_server.store(f"t-{os.urandom(8).hex()}", part_size=5 * MIB)
    yield store
    store.close()


def test_large_objects_are_multipart_uploads_with_bounded_parts(s3, s3_server) -> None:
    data = os.urandom(17 * MIB + 123)
    chunks = [data[i : i + 300_000] for i in range(0, len(data), 300_000)]
    assert s3.put("shards/big", chunks) == len(data)
    key = f"{s3.prefix}shards/big"
    head = s3_server.raw.head_object(Bucket=s3_server.bucket, Key=key)
    # a multipart ETag ends in -<parts>: 17 MiB in 5 MiB parts is 4 parts
    assert head["ETag"].strip('"').endswith("-4")
    assert head["ContentLength"] == len(data)
    assert s3.get_range("shards/big", 0, len(data)) == data
    # nothing of ours in the object: no metadata, no content type of our choosing
    assert head.get("Metadata", {}) == {}


def test_a_failed_multipart_upload_is_aborted_and_leaves_nothing(s3, s3_server) -> None:
    def chunks():
        yield os.urandom(12 * MIB)  # two parts uploaded already
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        s3.put("shards/x", chunks())
    assert not s3.exists("shards/x")
    uploads = s3_server.raw.list_multipart_uploads(Bucket=s3_server.bucket,
                                                   Prefix=s3.prefix).get("Uploads", [])
    assert uploads == []


def test_replacing_an_object_is_refused_by_the_server_atomically(s3, s3_server) -> None:
    s3.put("m", b"first")
    # bypass the store's own existence check: the conditional write itself must refuse
    big = os.urandom(11 * MIB)
    s3.exists = lambda name: False  # type: ignore[method-assign]
    with pytest.raises(StoreError, match="already exists"):
        s3.put("m", b"second")
    with pytest.raises(StoreError, match="already exists"):
        s3.put("m", big)
    del s3.exists
    assert s3.get_range("m", 0, 5) == b"first"


def test_large_reads_are_split_into_parallel_ranged_gets(s3) -> None:
    data = os.urandom(12 * MIB)
    s3.put("obj", data)
    requests = Requests(s3._client)
    buf = bytearray(8 * MIB)
    s3.readinto("obj", 1000, buf)
    assert buf == data[1000 : 1000 + 8 * MIB]
    ranges = requests.ranges()
    assert len(ranges) == 4  # four GETs of 2 MiB, together exactly the range asked for
    assert ranges[0][0] == 1000 and ranges[-1][1] == 1000 + 8 * MIB
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


def test_small_reads_fetch_only_their_range(s3) -> None:
    data = os.urandom(3 * MIB)
    s3.put("obj", data)
    requests = Requests(s3._client)
    assert s3.get_range("obj", 777, 100) == data[777:877]
    assert requests.ranges() == [(777, 877)]


def test_sequential_reads_are_prefetched_ahead(s3) -> None:
    data = os.urandom(20 * MIB + 5)
    s3.put("obj", data)
    requests = Requests(s3._client)
    out = bytearray(len(data))
    view = memoryview(out)
    chunk = 4 * MIB
    # the reader's pattern: a header, then chunks ending on multiples of the chunk size
    # (the first one shorter), so prefetched ranges do not line up with the reads
    s3.readinto("obj", 0, view[:100])
    s3.readinto("obj", 100, view[100:chunk])
    # the second read continued the first: the next ranges are requested before asked for
    for _ in range(2400):
        if any(a >= chunk for a, _ in requests.ranges()):
            break
        threading.Event().wait(0.05)
    assert any(a >= chunk for a, _ in requests.ranges())
    for at in range(chunk, len(data), chunk):
        s3.readinto("obj", at, view[at : min(len(data), at + chunk)])
    assert out == data
    # every byte was fetched once: prefetched ranges were used, not read again
    ranges = requests.ranges()
    assert sum(b - a for a, b in ranges) == len(data)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


def test_a_shard_scan_fetches_each_byte_once_in_8_mib_gets(s3) -> None:
    """The reader's way through a shard: size, the 40-byte header at 0, then chunks ending on
    multiples of 8 MiB. The header read starts the read-ahead: one GET per 8 MiB in all."""
    data = os.urandom(30 * MIB + 77)
    s3.put("shard", data)
    requests = Requests(s3._client)
    assert s3.size("shard") == len(data)
    out = bytearray(len(data))
    view = memoryview(out)
    s3.readinto("shard", 0, view[:40])
    starts = [40, *range(8 * MIB, len(data), 8 * MIB)]
    for a, b in itertools.pairwise([*starts, len(data)]):
        s3.readinto("shard", a, view[a:b])
    assert out == data
    ranges = requests.ranges()
    assert ranges == [(a, min(a + 8 * MIB, len(data))) for a in range(0, len(data), 8 * MIB)]


def test_will_need_hint_fetches_in_the_background(s3) -> None:
    data = os.urandom(6 * MIB)
    s3.put("obj", data)
    requests = Requests(s3._client)
    event = s3.will_need("obj", MIB, 4 * MIB)
    assert event is not None and event.wait(120)
    before = len(requests.ranges())
    buf = bytearray(4 * MIB)
    s3.readinto("obj", MIB, buf)
    assert buf == data[MIB : 5 * MIB]
    assert len(requests.ranges()) == before  # served from the prefetched range


def test_a_hint_is_fetched_in_8_mib_pieces_and_a_scan_after_it_fetches_the_rest(s3) -> None:
    """The reader hints a shard's first pieces before it enters the shard (size, header at 0,
    then chunks): the scan uses the hinted pieces and its read-ahead starts after them."""
    data = os.urandom(50 * MIB + 3)
    s3.put("shard", data)
    requests = Requests(s3._client)
    # more than ``prefetch`` (4) pieces asked for: 4 fetched, parts already coming not again
    assert s3.will_need("shard", 0, 8 * MIB).wait(120)
    assert s3.will_need("shard", 0, 48 * MIB).wait(120)
    assert requests.ranges() == [(a, a + 8 * MIB) for a in range(0, 32 * MIB, 8 * MIB)]
    assert s3.size("shard") == len(data)
    out = bytearray(len(data))
    view = memoryview(out)
    s3.readinto("shard", 0, view[:40])
    starts = [40, *range(8 * MIB, len(data), 8 * MIB)]
    for a, b in itertools.pairwise([*starts, len(data)]):
        s3.readinto("shard", a, view[a:b])
    assert out == data
    assert requests.ranges() == [(a, min(a + 8 * MIB, len(data)))
                                 for a in range(0, len(data), 8 * MIB)]


def test_random_reads_trigger_no_read_ahead(s3) -> None:
    data = os.urandom(12 * MIB)
    s3.put("obj", data)
    requests = Requests(s3._client)
    for off in (9 * MIB, 0, 5 * MIB):
        assert s3.get_range("obj", off, 100) == data[off : off + 100]
    assert requests.ranges() == [(0, 100), (5 * MIB, 5 * MIB + 100), (9 * MIB, 9 * MIB + 100)]


class _CutBody:
    """A response body whose connection drops after ``after`` bytes."""

    def __init__(self, body, after: int) -> None:
        self._body, self._left = body, after

    def readinto(self, b) -> int:
        from botocore.exceptions import ResponseStreamingError

        if self._left <= 0:
            raise ResponseStreamingError(error="connection reset by peer")
        n = self._body.readinto(memoryview(b)[: self._left])
        self._left -= n
        return n

    def close(self) -> None:
        self._body.close()


def _cut_transfers(s3, cuts: int, after: int) -> list[str]:
    """The next ``cuts`` GETs of the store's client drop after ``after`` bytes."""
    real = s3._client.get_object
    ranges: list[str] = []

    def get_object(**kwargs):
        resp = real(**kwargs)
        ranges.append(kwargs["Range"])
        if len(ranges) <= cuts:
            resp["Body"] = _CutBody(resp["Body"], after)
        return resp

    s3._client.get_object = get_object
    return ranges


def test_a_transfer_cut_off_mid_body_resumes_where_it_stopped(s3) -> None:
    data = os.urandom(MIB + 5)
    s3.put("obj", data)
    ranges = _cut_transfers(s3, cuts=2, after=300_000)
    assert s3.get_range("obj", 5, MIB) == data[5 : MIB + 5]
    assert ranges == [f"bytes=5-{MIB + 4}", f"bytes=300005-{MIB + 4}",
                      f"bytes=600005-{MIB + 4}"]


def test_a_transfer_cut_off_every_time_is_a_store_error(s3) -> None:
    s3.put("obj", os.urandom(MIB))
    _cut_transfers(s3, cuts=99, after=1000)
    with pytest.raises(StoreError, match="transfer was cut off 3 times"):
        s3.get_range("obj", 0, MIB)


def test_a_short_object_is_an_error_never_a_short_read(s3) -> None:
    s3.put("obj", os.urandom(3 * MIB))
    with pytest.raises(StoreError, match=r"shorter than \d+ bytes"):
        s3.readinto("obj", 2 * MIB, bytearray(2 * MIB))
    with pytest.raises(StoreError, match="shorter than"):
        s3.readinto("obj", 3 * MIB + 1, bytearray(0))


def test_list_sees_only_its_prefix_and_skips_foreign_keys(s3, s3_server) -> None:
    s3.put("shards/a", b"1")
    other = s3_server.store(f"t-{os.urandom(8).hex()}")
    other.put("shards/b", b"2")
    s3_server.raw.put_object(Bucket=s3_server.bucket, Key=f"{s3.prefix}shards/bad name",
                             Body=b"x")
    assert s3.list() == ["shards/a"]
    assert other.list("shards/") == ["shards/b"]
    other.close()


@pytest.mark.parametrize("url,message", [
    ("s3://", "invalid bucket"),
    ("s3://UPPER/x", "invalid bucket"),
    ("s3://b/x", "invalid bucket"),
    ("s3://bucket/../x", "invalid s3 prefix"),
    ("s3://bucket/a b", "invalid s3 prefix"),
    ("s3://user@bucket/x", "nothing else"),
    ("s3://bucket/x?versionId=1", "nothing else"),
    ("http://bucket/x", "not an s3:// URL"),
])
def test_bad_addresses_are_refused_clearly(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=re.escape(message)):
        parse_s3_url(url)


def test_addresses_parse_to_bucket_and_prefix() -> None:
    assert parse_s3_url("s3://ct-data") == ("ct-data", "")
    assert parse_s3_url("s3://ct-data/") == ("ct-data", "")
    assert parse_s3_url("s3://ct-data/tenants/acme/") == ("ct-data", "tenants/acme/")
    with pytest.raises(StoreError, match="unsupported store address"):
        open_store("ftp://host/x")


def _use_profile(monkeypatch: pytest.MonkeyPatch, server: S3Server) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)


def test_configuration_and_credentials_come_from_the_profile_files(
        monkeypatch, s3_server) -> None:
    _use_profile(monkeypatch, s3_server)
    store = open_store(s3_server.url(f"p-{os.urandom(4).hex()}"))
    assert isinstance(store, S3Store)
    requests = Requests(store._client)
    store.put("obj", b"data")
    assert store.get_range("obj", 0, 4) == b"data"
    key_id = re.search(r"aws_access_key_id = (\S+)",
                       s3_server.credentials_file.read_text()).group(1)
    assert requests.seen and all(f"Credential={key_id}/" in auth
                                 for _, _, _, auth in requests.seen)
    store.close()


def test_credentials_and_endpoint_from_the_environment(monkeypatch, s3_server) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVIRONMENT0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-from-env")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    store = open_store(s3_server.url("env"))
    requests = Requests(store._client)
    store.put(f"o-{os.urandom(4).hex()}", b"x")
    assert "Credential=AKIAENVIRONMENT0001/" in requests.seen[-1][3]
    store.close()


def test_no_credentials_is_a_clear_error(monkeypatch, s3_server) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    store = open_store(s3_server.url("nocreds"))
    with pytest.raises(StoreError, match="no S3 credentials found"):
        store.size("obj")
    store.close()


def test_tls_endpoint_verified_with_the_profile_ca(monkeypatch, s3_tls_server) -> None:
    _use_profile(monkeypatch, s3_tls_server)
    monkeypatch.delenv("AWS_CA_BUNDLE")  # the profile's ca_bundle alone
    assert s3_tls_server.endpoint.startswith("https://")
    store = open_store(s3_tls_server.url(f"p-{os.urandom(4).hex()}"))
    data = os.urandom(9 * MIB)
    store.put("obj", data)
    assert store.get_range("obj", 0, len(data)) == data
    store.close()


def test_tls_endpoint_with_an_untrusted_certificate_is_refused(
        monkeypatch, s3_tls_server, tmp_path) -> None:
    from tests.kms_broker.pki import DevPki

    _use_profile(monkeypatch, s3_tls_server)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(DevPki(tmp_path / "other").ca_path))
    store = open_store(s3_tls_server.url("x"))
    with pytest.raises(StoreError, match="TLS handshake with the S3 endpoint failed"):
        store.exists("obj")
    store.close()


def test_plain_http_is_refused_except_to_loopback(monkeypatch) -> None:
    with pytest.raises(StoreError, match="must be https://"):
        S3Store("bucket", endpoint_url="http://s3.example.com:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://10.1.2.3:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAX")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    with pytest.raises(StoreError, match="must be https://"):
        open_store("s3://bucket/x")


def test_errors_name_no_credential(monkeypatch, s3_server) -> None:
    _use_profile(monkeypatch, s3_server)
    secret = re.search(r"aws_secret_access_key = (\S+)",
                       s3_server.credentials_file.read_text()).group(1)
    store = open_store("s3://no-such-bucket-here/x")
    with pytest.raises(StoreError) as info:
        store.put("obj", b"x")
    assert "no-such-bucket-here" in str(info.value) and secret not in str(info.value)
    assert secret not in repr(store)
    store.close()
