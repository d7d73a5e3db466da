"""A sealed dataset on a real S3-compatible server (moto's server mode, a subprocess): written
with multipart uploads, read whole and by record, every object scanned for plaintext, and
objects tampered with, truncated, swapped or removed behind the store's back (as anyone with
write access to the bucket could) detected on read.
"""

from __future__ import annotations

import itertools
import os
import re
import uuid

import pytest

from sealed import DatasetReader, DecryptionError, SecretBuffer, StoreError, write_dataset

from .conftest import DATASET, TENANT, VERSION

MIB = 1 << 20
OPAQUE = re.compile(r"^(shards|manifests)/[0-9a-f]{32}$")


class Dataset:
    def __init__(self, server, dek: SecretBuffer) -> None:
        self.server = server
        self.dek = dek
        self.canary = f"CANARY-{uuid.uuid4().hex}".encode()
        self.prefix = f"tenants/t-{os.urandom(6).hex()}"
        # records carry the canary and readable names; 3 shards of ~6 MiB (multipart at 5 MiB)
        self.records = [self.canary + b" record %d " % i + os.urandom(256 * 1024)
                        + self.canary for i in range(66)]
        self.store = server.store(self.prefix, part_size=5 * MIB)
        self.ref = write_dataset(self.store, self.records, dek=dek, tenant_id=TENANT,
                                 dataset_id=DATASET, key_version=VERSION,
                                 share_holders=["broker-a:7443"], target_shard_size=6 * MIB)
        assert self.ref.num_shards == 3

    def reader(self) -> DatasetReader:
        return DatasetReader.open(self.store, self.ref.manifest_name, dek=self.dek,
                                  tenant_id=TENANT, dataset_id=DATASET, key_version=VERSION)

    def shard_names(self) -> list[str]:
        with self.reader() as r:
            return [s.object_name for s in r.manifest.shards]

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def raw_get(self, name: str) -> bytes:
        return self.server.raw.get_object(Bucket=self.server.bucket,
                                          Key=self.key(name))["Body"].read()

    def raw_put(self, name: str, body: bytes) -> None:
        """Overwrite behind the store's back (no If-None-Match)."""
        self.server.raw.put_object(Bucket=self.server.bucket, Key=self.key(name), Body=body)


@pytest.fixture
def ds(s3_server, dek):
    d = Dataset(s3_server, dek)
    yield d
    d.store.close()


def _read_all(d: Dataset) -> list[bytes]:
    out = []
    with d.reader() as r:
        buf = bytearray(r.max_shard_plaintext_size)
        for j in range(r.num_shards):
            out += [bytes(rec) for rec in r.shard_view(j, buf)]
    return out


def test_dataset_round_trips_through_s3_and_the_bucket_holds_only_ciphertext(ds) -> None:
    assert _read_all(ds) == ds.records
    objects = ds.server.objects()
    ours = {k: v for k, v in objects.items() if k.startswith(ds.prefix + "/")}
    assert len(ours) == ds.ref.num_shards + 1
    for key, body in ours.items():
        name = key[len(ds.prefix) + 1 :]
        assert OPAQUE.fullmatch(name), key  # random hex: no dataset, tenant or file name
        assert ds.canary not in body
        assert b"record 1 " not in body
        head = ds.server.raw.head_object(Bucket=ds.server.bucket, Key=key)
        assert head.get("Metadata", {}) == {}
    # shards above the part size went up as multipart uploads (ETag "<md5>-<parts>")
    etags = [ds.server.raw.head_object(Bucket=ds.server.bucket, Key=k)["ETag"].strip('"')
             for k in ours if k.split("/")[-2] == "shards"]
    assert any(re.fullmatch(r"[0-9a-f]{32}-\d+", e) for e in etags), etags


def test_a_record_read_fetches_only_its_segments(ds) -> None:
    from tests.sealed.test_s3store import Requests

    requests = Requests(ds.store._client)
    with ds.reader() as r:
        requests.clear()
        k = 40
        assert bytes(r.read_record(k)) == ds.records[k]
        fetched = sum(b - a for a, b in requests.ranges())
        # one or two 1 MiB segments (with their tags) of a ~6 MiB shard
        assert 0 < fetched <= 2 * (MIB + 16)


def test_naming_the_next_shard_fetches_its_start_ahead_and_each_byte_once(ds) -> None:
    """The trainer's way through a dataset on S3: each shard decrypted naming the next one.
    The next shard's GETs start before it is asked for (they overlap this shard's
    decryption and the caller's use of it) and no byte is fetched twice."""
    import threading

    from tests.sealed.test_s3store import Requests

    with ds.reader() as r:
        buf = bytearray(r.max_shard_plaintext_size)
        expected = [bytes(r.decrypt_shard_into(j, buf)) for j in range(r.num_shards)]
    names = ds.shard_names()
    paths = [f"/{ds.server.bucket}/{ds.key(n)}" for n in names]
    requests = Requests(ds.store._client)

    def gets(j: int) -> list[tuple[int, int]]:
        out = []
        for method, url, rng, _ in list(requests.seen):
            if method == "GET" and rng and url.endswith(paths[j]):
                a, b = rng.removeprefix("bytes=").split("-")
                out.append((int(a), int(b) + 1))
        return sorted(out)

    with ds.reader() as r:
        buf = bytearray(r.max_shard_plaintext_size)
        assert bytes(r.decrypt_shard_into(0, buf, next_shard=1)) == expected[0]
        for _ in range(2400):  # a hang guard on a busy machine, not a timing check
            if gets(1):
                break
            threading.Event().wait(0.05)
        assert gets(1) and gets(1)[0][0] == 0  # shard 1's start requested before it is read
        for j in range(1, r.num_shards):
            nxt = j + 1 if j + 1 < r.num_shards else None
            assert bytes(r.decrypt_shard_into(j, buf, next_shard=nxt)) == expected[j]
        sizes = [s.ciphertext_size for s in r.manifest.shards]
    for j, size in enumerate(sizes):
        ranges = gets(j)
        assert ranges[0][0] == 0 and ranges[-1][1] == size, (j, ranges)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges)), (j, ranges)


def test_a_tampered_shard_is_detected(ds) -> None:
    name = ds.shard_names()[1]
    blob = bytearray(ds.raw_get(name))
    blob[len(blob) // 2] ^= 0x01
    ds.raw_put(name, bytes(blob))
    with ds.reader() as r:
        r.decrypt_shard_into(0, bytearray(r.max_shard_plaintext_size))  # untouched: fine
        buf = bytearray(r.max_shard_plaintext_size)
        with pytest.raises(DecryptionError, match=r"shard 1"):
            r.decrypt_shard_into(1, buf)
        assert not any(buf)  # the segments before the flipped one were decrypted, then zeroed


def test_a_truncated_shard_is_detected(ds) -> None:
    name = ds.shard_names()[2]
    ds.raw_put(name, ds.raw_get(name)[:-100])
    with ds.reader() as r, pytest.raises(DecryptionError, match=r"shard 2"):
        r.decrypt_shard_into(2, bytearray(r.max_shard_plaintext_size))


def test_swapped_shards_are_detected(ds) -> None:
    a, b = ds.shard_names()[:2]
    blob_a, blob_b = ds.raw_get(a), ds.raw_get(b)
    ds.raw_put(a, blob_b)
    ds.raw_put(b, blob_a)
    with ds.reader() as r, pytest.raises(DecryptionError, match=r"shard 0"):
        r.decrypt_shard_into(0, bytearray(r.max_shard_plaintext_size))


def test_a_missing_shard_is_a_clear_store_error(ds) -> None:
    name = ds.shard_names()[0]
    ds.server.raw.delete_object(Bucket=ds.server.bucket, Key=ds.key(name))
    with ds.reader() as r, pytest.raises(StoreError, match=f"object {name} not found"):
        r.decrypt_shard_into(0, bytearray(r.max_shard_plaintext_size))


def test_a_tampered_or_missing_manifest_is_detected(ds) -> None:
    blob = bytearray(ds.raw_get(ds.ref.manifest_name))
    blob[-5] ^= 0x80
    ds.raw_put(ds.ref.manifest_name, bytes(blob))
    with pytest.raises(DecryptionError, match="manifest"):
        ds.reader()
    ds.server.raw.delete_object(Bucket=ds.server.bucket, Key=ds.key(ds.ref.manifest_name))
    with pytest.raises(StoreError, match="not found"):
        ds.reader()
