"""Interop at the dataset level: tink-py reads what the writer stored, the reader reads tink's."""

from __future__ import annotations

import dataclasses
import hashlib

from sealed import streaming
from sealed.manifest import manifest_aad, seal_manifest
from sealed.shard import shard_aad

from .helpers import make_records, open_reader, read_object, replace_object, write

F = streaming.FIRST_SEGMENT_CAPACITY


def _aad(m, j: int) -> bytes:
    return shard_aad(
        tenant_id=m.tenant_id,
        dataset_id=m.dataset_id,
        key_version=m.key_version,
        upload_id=m.upload_id,
        shard_index=j,
        shard_count=len(m.shards),
    )


def test_tink_decrypts_every_shard_and_the_manifest_the_writer_stored(
    store, dek, tink_oracle
) -> None:
    records = make_records([0, 1, F - 100, 3 << 20, 12345, 5 << 20])
    ref = write(store, records, dek, target_shard_size=4 << 20, plaintext_digests=True)
    assert ref.num_shards >= 3
    with open_reader(store, ref, dek) as reader:
        m = reader.manifest
        buf = bytearray(reader.max_shard_plaintext_size)
        for j, entry in enumerate(m.shards):
            plaintext = tink_oracle.decrypt(read_object(store, entry.object_name), _aad(m, j))
            assert plaintext == reader.decrypt_shard_into(j, buf)
            assert hashlib.sha256(plaintext).digest() == entry.sha256
    manifest_plain = tink_oracle.decrypt(
        read_object(store, ref.manifest_name),
        manifest_aad(
            tenant_id=ref.tenant_id,
            dataset_id=ref.dataset_id,
            key_version=ref.key_version,
            name=ref.manifest_name,
        ),
    )
    assert manifest_plain.startswith(b"SMAN")


def test_reader_reads_shards_that_tink_encrypted(store, dek, tink_oracle) -> None:
    records = make_records([F - 40, 10, 2 << 20])  # crosses the first-segment boundary
    ref = write(store, records, dek, target_shard_size=64 << 20, plaintext_digests=True)
    with open_reader(store, ref, dek) as reader:
        m = reader.manifest
        entry = m.shards[0]
        plaintext = bytes(reader.decrypt_shard_into(0, bytearray(entry.plaintext_size)))
    tink_ct = tink_oracle.encrypt(plaintext, _aad(m, 0))
    replace_object(store, entry.object_name, tink_ct)
    # the tenant re-issues the manifest for the tink-made shard (its header and size)
    new_entry = dataclasses.replace(
        entry, header=tink_ct[: streaming.HEADER_SIZE], ciphertext_size=len(tink_ct)
    )
    new_manifest = dataclasses.replace(m, shards=(new_entry,))
    replace_object(store, ref.manifest_name, seal_manifest(dek, new_manifest, ref.manifest_name))
    with open_reader(store, ref, dek) as reader:
        for k, record in enumerate(records):
            assert reader.read_record(k) == record
        assert (
            reader.decrypt_shard_into(0, bytearray(len(plaintext)), verify_digest=True) == plaintext
        )
