"""Sealed dataset format: encrypted shards and manifests that tenants write, trainers read.

Recipes: :func:`write_dataset` encrypts a folder or records into an :class:`ObjectStore`;
:class:`DatasetReader` authenticates the manifest and decrypts whole shards or single records.
The wire formats are documented in :mod:`sealed.streaming`, :mod:`sealed.shard` and
:mod:`sealed.manifest`.
"""

from sealed.errors import DecryptionError, FormatError, InputError, SealedError, StoreError
from sealed.keys import DEK_SIZE, SHARE_SIZE, derive_dek, validate_identifier
from sealed.manifest import Manifest, ShardEntry, open_manifest
from sealed.reader import DatasetReader
from sealed.secrets import SecretBuffer, zeroize
from sealed.shard import DEFAULT_TARGET_SHARD_SIZE, ShardView
from sealed.store import (
    CountingStore,
    DeferredSyncStore,
    LocalDirStore,
    MappedDirStore,
    MemoryStore,
    ObjectStore,
    RangeViewStore,
    open_store,
)
from sealed.streaming import StreamEncryptor
from sealed.writer import DEFAULT_MAX_RECORD_SIZE, DatasetRef, write_dataset

__all__ = [
    "DEFAULT_MAX_RECORD_SIZE",
    "DEFAULT_TARGET_SHARD_SIZE",
    "DEK_SIZE",
    "SHARE_SIZE",
    "CountingStore",
    "DatasetReader",
    "DatasetRef",
    "DecryptionError",
    "DeferredSyncStore",
    "FormatError",
    "InputError",
    "LocalDirStore",
    "Manifest",
    "MappedDirStore",
    "MemoryStore",
    "ObjectStore",
    "RangeViewStore",
    "SealedError",
    "SecretBuffer",
    "ShardEntry",
    "ShardView",
    "StoreError",
    "StreamEncryptor",
    "derive_dek",
    "open_manifest",
    "open_store",
    "validate_identifier",
    "write_dataset",
    "zeroize",
]
