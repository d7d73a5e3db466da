"""An :class:`~sealed.store.ObjectStore` on S3-compatible object storage.

Addressed as ``s3://BUCKET[/PREFIX]``: object ``shards/3f2a...`` lives at key
``PREFIX/shards/3f2a...`` of ``BUCKET``. The bucket learns what a local store learns: object
names (random hex chosen by the writer), sizes, and the times of reads and writes. Nothing
else is sent: no metadata, no content type, no tags; bodies are ciphertext.

How each operation maps onto S3
-------------------------------
- ``put``: objects smaller than one part (16 MiB by default) are one ``PutObject``; larger
  ones a multipart upload (``CreateMultipartUpload``, ``UploadPart`` for each 16 MiB part,
  up to four parts in flight on a thread pool, ``CompleteMultipartUpload`` at the end), so an
  object of any size streams through a bounded amount of memory (parts in flight plus the
  one being filled). Both carry ``If-None-Match: *``: the server refuses to replace an
  existing object, atomically (a ``PreconditionFailed`` becomes "already exists"). A failure
  anywhere, including one raised by the caller's chunk iterator, aborts the multipart
  upload: no object appears, and the parts are dropped.
- ``readinto`` / ``get_range``: ``GetObject`` with ``Range: bytes=A-B``, read straight into
  the caller's buffer (``StreamingBody.readinto``, no intermediate copy). A read of 8 MiB or
  more is split into up to four ranged GETs that run in parallel. The response length is
  checked: a short object is an error, never a short read. botocore retries requests that
  fail before their response; a transfer cut off in the body resumes with a GET of the rest
  (three attempts in all), so a network hiccup does not end a training job.
- Parallel prefetch: ``will_need(name, offset, length)`` (a hint) starts fetching a range on
  the pool, in pieces of 8 MiB (at most ``prefetch`` pieces per hint, skipping parts already
  being fetched), each into a buffer of its own; a later ``readinto`` of any part of it waits
  for it and copies that part out. The dataset reader sends it for the *next* shard while it
  reads the last pieces of the current one (``DatasetReader.decrypt_shard_into`` with
  ``next_shard``, as the trainer's pipeline calls it), so the GETs of the next shard keep the
  pool busy across the shard boundary instead of starting after it. Without hints the store
  reads ahead by itself: when a read continues where the previous read of the object ended,
  it keeps the next ``prefetch`` pieces (8 MiB, or the read's length if larger) coming,
  bounded by the object's size (known from ``HeadObject`` or the ``Content-Range`` of a
  response); and a read at offset 0 right after ``size`` (how
  :meth:`~sealed.reader.DatasetReader.decrypt_shard_into` enters a shard: size check, then
  the stream header) starts that read-ahead at offset 0 (after whatever a hint already
  fetches), so the header and the first chunk come in one GET and a shard is fetched in
  8 MiB GETs, four in flight, each byte once. Prefetched ranges are ciphertext; at most
  ``2 * prefetch`` are held (64 MiB with the defaults; the oldest is dropped, and a read of
  it fetches it again); record reads (random access) start none.
- ``size`` / ``exists``: ``HeadObject``; ``delete``: ``DeleteObject`` (idempotent, as S3 is);
  ``list``: ``ListObjectsV2`` pages under the prefix; keys that are not valid object names
  (written by something else) are skipped, as a local store skips foreign files.

Configuration: the standard AWS chain, nothing of our own
---------------------------------------------------------
Credentials, region, endpoint and TLS trust come from the environment and profile files
exactly as every AWS SDK reads them: ``AWS_PROFILE``, ``AWS_SHARED_CREDENTIALS_FILE``
(``~/.aws/credentials``), ``AWS_CONFIG_FILE`` (``~/.aws/config``), ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, container and instance roles;
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` or ``endpoint_url`` in the profile for an
S3-compatible server; ``AWS_CA_BUNDLE`` or ``ca_bundle`` in the profile for its CA. Prefer a
credentials file (mode 0600) to the environment: the environment of a process is readable by
more than its files are. The credentials never leave the client (requests are signed with
SigV4); errors name the bucket and the object, never a credential.

TLS: endpoints are ``https://`` and the server certificate is verified (the system trust
store, or the configured CA bundle). A plain ``http://`` endpoint is refused unless it is a
loopback address (a server on the same machine, as in tests and the local compose harness):
bodies are ciphertext either way, but a signed request seen on the wire tells an observer
which objects are read, and a request signature can be replayed within its validity window.

Why botocore
------------
Considered: boto3/botocore (AWS's SDK), ``obstore`` (Rust ``object_store`` bindings) and
``minio``. botocore is the one maintained by the service's owner, released weekly, and the
reference implementation of the configuration chain above (profiles, SSO, roles, endpoint and
CA settings); the others reimplement parts of it. Its per-request CPU cost (signing, parsing
XML, about a millisecond) is amortised by large ranged reads (2-8 MiB each here), and its
``StreamingBody.readinto`` lets the body go straight into our buffers, so the bulk bytes are
copied once, by the socket read; with a few reads in parallel the read path is bound by the
server and the network, not the client (``benchmarks/bench_s3.py`` measures this against raw
ranged GETs). boto3 adds only a resource layer and ``s3transfer``, whose managed transfers
neither support ``If-None-Match`` on completion nor read into caller buffers, so this module
uses botocore directly. ``obstore`` is fast but young and reads its configuration its own
way.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from sealed.errors import StoreError
from sealed.store import MAX_NAME_LENGTH, Chunks, validate_object_name

__all__ = ["DEFAULT_PART_SIZE", "S3Store", "parse_s3_url"]

DEFAULT_PART_SIZE = 16 << 20  # multipart part size (S3 requires >= 5 MiB except the last)
MIN_PART_SIZE = 5 << 20
MAX_PARTS = 10_000  # S3's limit on parts per upload
DEFAULT_WORKERS = 4  # ranged GETs or part uploads in flight per store
DEFAULT_PREFETCH = 4  # ranges held by read-ahead
SPLIT_MIN = 2 << 20  # a read is split into parallel GETs of at least this many bytes
READ_AHEAD_PIECE = 8 << 20  # read-ahead fetches pieces of this size (or the read's, if larger)
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket[/prefix]`` -> (bucket, prefix ending in ``/`` or empty); else StoreError."""
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise StoreError(f"not an s3:// URL: {url!r:.80}")
    parts = urlsplit(url)
    if parts.query or parts.fragment or "@" in parts.netloc or ":" in parts.netloc:
        raise StoreError(f"s3 URL must be s3://BUCKET[/PREFIX] with nothing else: {url!r:.80}")
    bucket = parts.netloc
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise StoreError(f"invalid bucket name {bucket!r:.80}: 3-63 characters of lower-case "
                         "letters, digits, '.' and '-'")
    prefix = parts.path.strip("/")
    if prefix:
        if len(prefix) > MAX_NAME_LENGTH // 2:
            raise StoreError(f"s3 prefix longer than {MAX_NAME_LENGTH // 2} characters")
        try:
            validate_object_name(prefix)
        except StoreError:
            raise StoreError(f"invalid s3 prefix {prefix!r:.80}: use '/'-separated components "
                             "of letters, digits, '.', '_' or '-'") from None
        prefix += "/"
    return bucket, prefix


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def _check_endpoint(endpoint: str | None) -> None:
    if endpoint is None:
        return
    parts = urlsplit(endpoint)
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and _is_loopback(parts.hostname):
        return
    raise StoreError(f"S3 endpoint {endpoint!r:.80} must be https:// (plain http only to a "
                     "loopback address)")


class _Interrupted(Exception):
    """A response body ended before its Content-Length (resumed by another ranged GET)."""


class _Missing(StoreError):
    """The object does not exist (``exists`` answers False instead of raising)."""


class _Prefetch:
    """One range being fetched ahead of its read."""

    __slots__ = ("buf", "done", "error", "length", "offset")

    def __init__(self, offset: int, length: int) -> None:
        self.offset = offset
        self.length = length
        self.buf = bytearray(length)
        self.done = threading.Event()
        self.error: BaseException | None = None


class _Pending:
    """The pieces one :meth:`S3Store.will_need` hint fetches."""

    __slots__ = ("_pieces",)

    def __init__(self, pieces: list[_Prefetch]) -> None:
        self._pieces = pieces

    def wait(self, timeout: float | None = None) -> bool:
        """True once every piece has arrived (or failed: a read fetches it again)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for piece in self._pieces:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not piece.done.wait(left):
                return False
        return True


class S3Store:
    """Objects under ``s3://bucket/prefix`` (see the module docstring).

    ``client`` is a botocore S3 client; without one, a client is built from the standard
    configuration chain, with ``profile``, ``endpoint_url``, ``ca_bundle`` and ``region``
    overriding it where given. Thread-safe: several readers may share one store.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        profile: str | None = None,
        endpoint_url: str | None = None,
        ca_bundle: str | None = None,
        region: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        workers: int = DEFAULT_WORKERS,
        prefetch: int = DEFAULT_PREFETCH,
    ) -> None:
        bucket, prefix = parse_s3_url(f"s3://{bucket}/{prefix}")
        if not isinstance(part_size, int) or not MIN_PART_SIZE <= part_size <= 5 << 30:
            raise ValueError("part_size must be from 5 MiB to 5 GiB")
        if not isinstance(workers, int) or not 1 <= workers <= 64:
            raise ValueError("workers must be from 1 to 64")
        if not isinstance(prefetch, int) or not 0 <= prefetch <= 64:
            raise ValueError("prefetch must be from 0 to 64")
        self.bucket = bucket
        self.prefix = prefix
        self._part_size = part_size
        self._workers = workers
        self._prefetch_depth = prefetch
        self._client = client if client is not None else _make_client(
            profile=profile, endpoint_url=endpoint_url, ca_bundle=ca_bundle, region=region,
            pool=2 * workers + 2)
        _check_endpoint(getattr(getattr(self._client, "meta", None), "endpoint_url", None))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3store")
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}  # object sizes seen in responses (objects are immutable)
        self._last_end: dict[str, int] = {}  # where the previous read of each object ended
        self._ahead_end: dict[str, int] = {}  # where the read-ahead of each object has reached
        self._sized: set[str] = set()  # objects whose size was asked for since their last read
        self._ahead: OrderedDict[tuple[str, int], _Prefetch] = OrderedDict()
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> S3Store:
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, **kwargs)

    def __repr__(self) -> str:
        return f"S3Store(s3://{self.bucket}/{self.prefix})"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _key(self, name: str) -> str:
        return self.prefix + validate_object_name(name)

    # ------------------------------------------------------------------ errors

    @contextlib.contextmanager
    def _errors(self, what: str, name: str, *, end: int | None = None) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound") or (
                    status == 404 and code != "NoSuchBucket"):
                raise _Missing(f"object {name} not found") from None
            if code == "NoSuchBucket":
                raise StoreError(f"bucket {self.bucket} does not exist") from None
            if code in ("PreconditionFailed", "412") or status == 412:
                raise StoreError(f"object {name} already exists") from None
            if code in ("InvalidRange", "416") or status == 416:
                raise StoreError(f"object {name} is shorter than {end} bytes") from None
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StoreError(f"cannot {what} object {name} in bucket {self.bucket}: access "
                                 f"denied ({code}); check the S3 credentials") from None
            raise StoreError(f"cannot {what} object {name} in bucket {self.bucket}: "
                             f"{code or status}") from None
        except BotoCoreError as exc:
            raise StoreError(f"cannot {what} object {name}: {_describe(exc)}") from None

    # ------------------------------------------------------------------ writes

    def put(self, name: str, data: Chunks) -> int:
        from sealed.store import _iter_chunks

        key = self._key(name)
        if self.exists(name):
            raise StoreError(f"object {name} already exists")
        part = bytearray()  # grows to one part: a small object costs only its size
        size = 0
        upload: _Multipart | None = None
        try:
            for chunk in _iter_chunks(data):
                # copied at once: the caller may reuse its buffer after the iterator moves on
                while chunk:
                    n = min(len(chunk), self._part_size - len(part))
                    part += chunk[:n]
                    size += n
                    chunk = chunk[n:]
                    if len(part) == self._part_size:
                        if upload is None:
                            upload = _Multipart(self, name, key)
                        upload.send(part)
                        part = bytearray()
            if upload is None:
                with self._errors("write", name):
                    self._client.put_object(Bucket=self.bucket, Key=key,
                                            Body=bytes(part),
                                            IfNoneMatch="*")
            else:
                if part:
                    upload.send(part)
                upload.complete()
                upload = None
        finally:
            if upload is not None:
                upload.abort()
        with self._lock:
            self._sizes[name] = size
        return size

    # ------------------------------------------------------------------ reads

    def _get_into(self, name: str, offset: int, view: memoryview) -> None:
        """Ranged GETs of ``[offset, offset + len(view))`` straight into ``view``.

        botocore retries a request that fails before its response; a transfer cut off in the
        body (connection reset, read timeout, early close) resumes here with a GET of the rest,
        up to ``_BODY_ATTEMPTS`` times in all.
        """
        progress = [0]
        for attempt in range(1, _BODY_ATTEMPTS + 1):
            try:
                self._get_once(name, offset, view, progress)
                return
            except _Interrupted:
                if attempt == _BODY_ATTEMPTS:
                    raise StoreError(f"cannot read object {name}: the transfer was cut off "
                                     f"{_BODY_ATTEMPTS} times") from None

    def _get_once(self, name: str, offset: int, view: memoryview, progress: list[int]) -> None:
        from botocore.exceptions import ReadTimeoutError, ResponseStreamingError

        length = len(view)
        start = offset + progress[0]
        with self._errors("read", name, end=offset + length):
            resp = self._client.get_object(Bucket=self.bucket, Key=self._key(name),
                                           Range=f"bytes={start}-{offset + length - 1}")
            body = resp["Body"]
            try:
                total = _total_size(resp.get("ContentRange"))
                if total is not None:
                    with self._lock:
                        self._sizes[name] = total
                if resp.get("ContentLength") != offset + length - start:
                    raise StoreError(f"object {name} is shorter than {offset + length} bytes")
                while progress[0] < length:
                    try:
                        n = body.readinto(view[progress[0]:])
                    except (ResponseStreamingError, ReadTimeoutError):
                        raise _Interrupted from None
                    if not n:  # the server promised more (Content-Length): cut off
                        raise _Interrupted
                    progress[0] += n
            finally:
                body.close()

    def _submit(self, name: str, offset: int, view: memoryview) -> list[Future[None]]:
        """Start fetching ``view``'s range, a large one as parallel GETs of >= 2 MiB."""
        length = len(view)
        pieces = max(1, min(self._workers, length // SPLIT_MIN))
        step = -(-length // pieces)
        return [self._pool.submit(self._get_into, name, offset + a, view[a : a + step])
                for a in range(0, length, step)]

    def readinto(self, name: str, offset: int, buf: memoryview | bytearray) -> None:
        from sealed.store import _check_range

        view = memoryview(buf).cast("B")
        _check_range(offset, len(view))
        validate_object_name(name)
        if not view:
            if offset > self.size(name):
                raise StoreError(f"object {name} is shorter than {offset} bytes")
            return
        end = offset + len(view)
        with self._lock:
            # the reader's way into a whole shard: the size checked, then the stream header
            # read at offset 0. That begins a scan: the read-ahead starts with this read,
            # which is served from its first piece (one GET for header and first chunk)
            scan = offset == 0 and name in self._sized
            self._sized.discard(name)
        if scan:
            self._read_ahead(name, 0, len(view), start_of_scan=True)
        gaps: list[tuple[int, int]] = []
        copies: list[tuple[_Prefetch, int, int]] = []
        pos = offset
        with self._lock:
            while pos < end:  # prefetched parts are copied, the gaps between them fetched
                entry, next_start = self._covering(name, pos, end)
                if entry is not None:
                    stop = min(end, entry.offset + entry.length)
                    copies.append((entry, pos, stop))
                else:
                    stop = next_start
                    gaps.append((pos, stop))
                pos = stop
        futures = [f for a, b in gaps
                   for f in self._submit(name, a, view[a - offset : b - offset])]
        if not scan:
            self._read_ahead(name, offset, len(view))  # queued behind this read's own GETs
        _wait_all(futures)
        for entry, a, b in copies:
            if entry.done.wait(_PREFETCH_WAIT_S) and entry.error is None:
                view[a - offset : b - offset] = memoryview(entry.buf)[a - entry.offset :
                                                                      b - entry.offset]
            else:  # fetch it again; reports the error if it persists
                _wait_all(self._submit(name, a, view[a - offset : b - offset]))
            if b == entry.offset + entry.length:
                self._discard(name, entry)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        from sealed.store import _check_range

        _check_range(offset, length)
        buf = bytearray(length)
        self.readinto(name, offset, buf)
        return bytes(buf)

    # ------------------------------------------------------------------ prefetch

    def will_need(self, name: str, offset: int, length: int) -> _Pending | None:
        """Start fetching ``[offset, offset + length)`` in pieces of 8 MiB (at most
        ``prefetch`` pieces; parts already being fetched are not fetched again). The result's
        ``wait(timeout)`` returns True once every piece is here (None: nothing to fetch)."""
        from sealed.store import _check_range

        _check_range(offset, length)
        validate_object_name(name)
        if length == 0 or self._prefetch_depth == 0:
            return None
        end = offset + length
        pieces: list[_Prefetch] = []
        at = offset
        while at < end:
            with self._lock:
                entry, next_start = self._covering(name, at, end)
            if entry is None:
                if len(pieces) >= self._prefetch_depth:
                    break
                stop = min(next_start, at + READ_AHEAD_PIECE)
                entry = self._start_prefetch(name, at, stop - at)
            pieces.append(entry)
            at = entry.offset + entry.length
        return _Pending(pieces)

    def _covering(self, name: str, pos: int, end: int) -> tuple[_Prefetch | None, int]:
        """The prefetch holding byte ``pos``, else None and where the next one in
        ``(pos, end)`` starts (``end`` if none). Called with the lock held."""
        next_start = end
        for (n, _), entry in self._ahead.items():
            if n != name:
                continue
            if entry.offset <= pos < entry.offset + entry.length:
                return entry, end
            if pos < entry.offset < next_start:
                next_start = entry.offset
        return None, next_start

    def _discard(self, name: str, entry: _Prefetch) -> None:
        with self._lock:
            if self._ahead.get((name, entry.offset)) is entry:
                del self._ahead[(name, entry.offset)]

    def _start_prefetch(self, name: str, offset: int, length: int) -> _Prefetch:
        entry = _Prefetch(offset, length)
        with self._lock:
            while len(self._ahead) >= 2 * self._prefetch_depth:
                self._ahead.popitem(last=False)  # the oldest is dropped (a read refetches it)
            self._ahead[(name, offset)] = entry
        self._pool.submit(self._run_prefetch, name, entry)
        return entry

    def _run_prefetch(self, name: str, entry: _Prefetch) -> None:
        try:
            self._get_into(name, entry.offset, memoryview(entry.buf))
        except BaseException as exc:  # reported by the read that wanted it (it refetches)
            entry.error = exc
        finally:
            entry.done.set()

    def _read_ahead(self, name: str, offset: int, length: int, *,
                    start_of_scan: bool = False) -> None:
        """After a sequential read (or at the start of a scan), keep the next ``prefetch``
        pieces coming: pieces of 8 MiB or the read's length if larger, from where the
        prefetched range ends (from ``offset`` itself at the start of a scan)."""
        with self._lock:
            sequential = start_of_scan or self._last_end.get(name) == offset
            self._last_end[name] = offset + length
            size = self._sizes.get(name)
            if not sequential or size is None or self._prefetch_depth == 0:
                return
            piece = max(length, READ_AHEAD_PIECE)
            if start_of_scan:
                window = min(size, max(offset + length,
                                       offset + self._prefetch_depth * READ_AHEAD_PIECE))
                piece = READ_AHEAD_PIECE
                at = offset
                while True:  # after the pieces a hint (will_need) already fetches
                    entry, _ = self._covering(name, at, window)
                    if entry is None:
                        break
                    at = entry.offset + entry.length
            else:
                at = max(self._ahead_end.get(name, 0), offset + length)
                window = min(size, offset + length + self._prefetch_depth * piece)
            self._ahead_end[name] = max(at, window)
        while at < window:
            n = min(piece, window - at)
            self._start_prefetch(name, at, n)
            at += n

    # ------------------------------------------------------------------ metadata

    def _head(self, name: str) -> int:
        with self._errors("read", name):
            resp = self._client.head_object(Bucket=self.bucket, Key=self._key(name))
        size = int(resp["ContentLength"])
        with self._lock:
            self._sizes[name] = size
        return size

    def size(self, name: str) -> int:
        size = self._head(name)
        with self._lock:
            self._sized.add(name)
        return size

    def exists(self, name: str) -> bool:
        try:
            self._head(name)
        except _Missing:
            return False
        return True

    def delete(self, name: str) -> None:
        with self._errors("delete", name):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(name))
        with self._lock:
            self._sizes.pop(name, None)
            self._last_end.pop(name, None)
            self._ahead_end.pop(name, None)
            self._sized.discard(name)
            for k in [k for k in self._ahead if k[0] == name]:
                del self._ahead[k]

    def list(self, prefix: str = "") -> list[str]:
        from sealed.store import _check_prefix

        _check_prefix(prefix)
        names = []
        token: str | None = None
        with self._errors("list", prefix or "*"):
            while True:
                kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
                if token:
                    kwargs["ContinuationToken"] = token
                resp = self._client.list_objects_v2(**kwargs)
                for item in resp.get("Contents", ()):
                    name = item["Key"][len(self.prefix):]
                    with contextlib.suppress(StoreError):
                        names.append(validate_object_name(name))
                if not resp.get("IsTruncated"):
                    break
                token = resp.get("NextContinuationToken")
        return sorted(names)

    def close(self) -> None:
        """Stop the worker threads and drop prefetched ranges."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._ahead.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


_BODY_ATTEMPTS = 3  # transfers of one range cut off mid-body before the read fails
_PREFETCH_WAIT_S = 300.0  # a prefetch slower than this is abandoned and the range refetched


class _Multipart:
    """One multipart upload: parts sent on the store's pool, at most ``workers`` in flight."""

    def __init__(self, store: S3Store, name: str, key: str) -> None:
        self._store = store
        self._name = name
        self._key = key
        self._parts: list[Future[dict[str, Any]]] = []
        self._room = threading.Semaphore(store._workers)
        with store._errors("write", name):
            resp = store._client.create_multipart_upload(Bucket=store.bucket, Key=key)
        self._upload_id = resp["UploadId"]

    def send(self, part: bytearray) -> None:
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise StoreError(f"object {self._name} needs more than {MAX_PARTS} parts")
        for done in self._parts:
            if done.done() and done.exception() is not None:
                done.result()  # the first failed part ends the upload now
        self._room.acquire()
        self._parts.append(self._store._pool.submit(self._upload, number, part))

    def _upload(self, number: int, part: bytearray) -> dict[str, Any]:
        try:
            with self._store._errors("write", self._name):
                resp = self._store._client.upload_part(
                    Bucket=self._store.bucket, Key=self._key, UploadId=self._upload_id,
                    PartNumber=number, Body=part)
            return {"PartNumber": number, "ETag": resp["ETag"]}
        finally:
            self._room.release()

    def complete(self) -> None:
        parts = _wait_all(self._parts)
        with self._store._errors("write", self._name):
            self._store._client.complete_multipart_upload(
                Bucket=self._store.bucket, Key=self._key, UploadId=self._upload_id,
                MultipartUpload={"Parts": parts}, IfNoneMatch="*")

    def abort(self) -> None:
        for f in self._parts:
            f.cancel()
        for f in self._parts:
            with contextlib.suppress(BaseException):
                f.result()
        with contextlib.suppress(Exception):
            self._store._client.abort_multipart_upload(
                Bucket=self._store.bucket, Key=self._key, UploadId=self._upload_id)


def _wait_all(futures: list[Future[Any]]) -> list[Any]:
    """Results of every future, in order; the first failure is raised after all finished."""
    results = []
    error: BaseException | None = None
    for f in futures:
        try:
            results.append(f.result())
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error
    return results


def _total_size(content_range: str | None) -> int | None:
    m = _CONTENT_RANGE.fullmatch(content_range or "")
    return int(m.group(3)) if m else None


def _describe(exc: Exception) -> str:
    from botocore.exceptions import (
        EndpointConnectionError,
        NoCredentialsError,
        SSLError,
    )

    if isinstance(exc, SSLError):
        return ("TLS handshake with the S3 endpoint failed (certificate not trusted? set "
                "AWS_CA_BUNDLE or ca_bundle in the profile)")
    if isinstance(exc, EndpointConnectionError):
        return "cannot connect to the S3 endpoint"
    if isinstance(exc, NoCredentialsError):
        return ("no S3 credentials found (AWS_PROFILE, AWS_SHARED_CREDENTIALS_FILE or "
                "~/.aws/credentials, or the AWS_ACCESS_KEY_ID variables)")
    return type(exc).__name__


def _make_client(*, profile: str | None, endpoint_url: str | None, ca_bundle: str | None,
                 region: str | None, pool: int) -> Any:
    try:
        import botocore.session
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError
    except ImportError:  # pragma: no cover - botocore is a dependency
        raise StoreError("s3:// stores need botocore (pip install botocore)") from None
    _check_endpoint(endpoint_url)
    try:
        session = botocore.session.Session(profile=profile)
        config = Config(max_pool_connections=pool, retries={"mode": "standard"},
                        s3={"addressing_style": "path"} if _custom_endpoint(
                            session, endpoint_url) else None,
                        connect_timeout=10, read_timeout=60)
        return session.create_client("s3", region_name=region or session.get_config_variable(
            "region") or "us-east-1", endpoint_url=endpoint_url, verify=ca_bundle,
            config=config)
    except BotoCoreError as exc:
        raise StoreError(f"cannot configure the S3 client: {_describe(exc)}") from None


def _custom_endpoint(session: Any, endpoint_url: str | None) -> bool:
    """Whether an endpoint other than AWS's is configured (path-style addressing there)."""
    if endpoint_url:
        return True
    import os

    return bool(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or _profile_endpoint(session))


def _profile_endpoint(session: Any) -> bool:
    with contextlib.suppress(Exception):
        scoped = session.get_scoped_config()
        return bool(scoped.get("endpoint_url") or (scoped.get("s3") or {}).get("endpoint_url"))
    return False
