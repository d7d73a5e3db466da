"""tink-py as an interop oracle: a StreamingAead over a keyset built from raw key bytes.

Used by the tests and by benchmarks/bench_sealed.py, never by the product (tink is a test
dependency). The parameters are Tink's AES256_GCM_HKDF_1MB: HKDF-SHA256, 32-byte derived
keys, 1 MiB ciphertext segments, the same as ``sealed.streaming``.
"""

from __future__ import annotations

from sealed import streaming


def tink_streaming_aead(raw_key: bytes):  # -> tink.streaming_aead.StreamingAead
    import tink  # noqa: F401 - registers the proto modules
    from tink import cleartext_keyset_handle, streaming_aead
    from tink.proto import aes_gcm_hkdf_streaming_pb2 as pb
    from tink.proto import common_pb2, tink_pb2

    streaming_aead.register()
    key = pb.AesGcmHkdfStreamingKey(
        version=0,
        key_value=raw_key,
        params=pb.AesGcmHkdfStreamingParams(
            ciphertext_segment_size=streaming.SEGMENT_SIZE,
            derived_key_size=32,
            hkdf_hash_type=common_pb2.SHA256,
        ),
    )
    keyset = tink_pb2.Keyset(
        primary_key_id=1,
        key=[
            tink_pb2.Keyset.Key(
                key_data=tink_pb2.KeyData(
                    type_url="type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey",
                    value=key.SerializeToString(),
                    key_material_type=tink_pb2.KeyData.SYMMETRIC,
                ),
                status=tink_pb2.ENABLED,
                key_id=1,
                output_prefix_type=tink_pb2.RAW,
            )
        ],
    )
    return cleartext_keyset_handle.from_keyset(keyset).primitive(streaming_aead.StreamingAead)
