"""The :class:`~kms_broker.hsm.interface.Hsm` on a PKCS#11 token (python-pkcs11; SoftHSM2).

Custody. A share exists in this process only as an HSM object handle: it is unwrapped by the
token into a session object (CKA_SENSITIVE=true, CKA_EXTRACTABLE=true so that the token can
wrap it again, every usage flag false) and wrapped again inside the token. No attribute value
of a secret is ever read, nothing is decrypted here.

Sealing inside the token (``seal_share``; ``import_share`` is the same with the import key as
the local private key and the tenant's ephemeral key as the peer)::

    W      = C_DeriveKey(KEK tenant/<id>/kek/v<n>, CKM_AES_ECB_ENCRYPT_DATA{SHA-256(binding)})
    share  = C_UnwrapKey(W, CKM_AES_KEY_WRAP_PAD, wrapped_share)       W destroyed at once
    eph    = C_GenerateKeyPair(CKM_EC_KEY_PAIR_GEN, P-256)              session objects
    Z      = C_DeriveKey(eph.private, CKM_ECDH1_DERIVE{CKD_NULL, node_public_key})  AES-256
    K      = C_DeriveKey(Z, CKM_AES_ECB_ENCRYPT_DATA{SHA-256(transcript)})          AES-256
    sealed = C_WrapKey(K, CKM_AES_KEY_WRAP_PAD, share)
    blob   = BE16 65 || eph.public (SEC1) || sealed        then every session object destroyed

SoftHSM 2.6.1 implements CKM_AES_KEY_WRAP_PAD as RFC 5649 (what ``cryptography`` calls
``aes_key_wrap_with_padding``) and takes the ECDH value as the 32-byte x coordinate. It reports
an RFC 5649 integrity failure as CKR_GENERAL_ERROR (mapped to ``UnwrapFailed`` for the unwrap
call only), leaves CKA_VALUE_LEN at 0 on unwrapped keys (so the share length is checked by the
node, which accepts exactly 32 bytes) and has no CKM_ECDSA_SHA256 (``sign`` hashes the public
data with SHA-256 and signs the digest with CKM_ECDSA; the signature is returned DER-encoded).

Object templates: KEKs are token objects, private, sensitive, never extractable, not
modifiable, usable only to derive binding keys ``W`` (which can only wrap and unwrap), with
CKA_ID ``tenant/<id>`` (found all at once by crypto-shredding). A KEK whose CKA_DERIVE is false
was made before bound wrapping (legacy, see ``kms_broker.hsm.interface``): it is only ever used
to unwrap during a rotation. The audit anchor is a private, modifiable token data object
``ctrain/audit-anchor``. Import and signing private keys are token objects, sensitive, not
extractable, usable only to derive (import) or sign. Everything made during one call (share,
ephemeral key pair, Z, K) is a session object destroyed before the call returns.

Concurrency. python-pkcs11 initialises the module with ``C_Initialize(NULL)``, which tells
SoftHSM that the application is single-threaded, so SoftHSM turns its own mutexes off. Every
call into one module is therefore serialised by a process-wide lock (``serialize=True``, the
default). Sessions are pooled (logged in once, reused) so no call pays for open/login; with a
thread-safe module ``serialize=False`` lets the pool run calls in parallel.

Failure and recovery. PKCS#11 errors map to: token, library, session or login trouble ->
:class:`HsmUnavailable`; a missing key -> :class:`KeyNotFound`; a wrapped or sealed blob that
does not authenticate -> :class:`UnwrapFailed`. Messages name the operation and the PKCS#11
error class only. When a key is not found the token marker object (``ctrain/token-marker``) is
looked up too: if that is gone as well the token's objects have become unreadable (for
example its directory was moved away), which is an outage, not a missing key. On an outage
every pooled session is dropped and the module is finalised and initialised again, so the
next call starts afresh and succeeds as soon as the token is back: no restart, no new
``Pkcs11Hsm``. Session-level errors (invalid handle, logged out by another user of the
module) are retried once on fresh sessions.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pkcs11
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import KDF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import encode_named_curve_parameters

from kms_broker import sealing
from kms_broker.hsm import labels
from kms_broker.hsm.interface import (
    HsmError,
    HsmUnavailable,
    KeyNotFound,
    LegacyWrapping,
    ShareBinding,
    UnwrapFailed,
)
from sealed.secrets import SecretBuffer

__all__ = ["Pkcs11Hsm"]

T = TypeVar("T")
MAX_SIGN_INPUT = 1 << 20
_P256 = encode_named_curve_parameters("secp256r1")

# Unwrap failures: SoftHSM reports an RFC 5649 integrity failure as CKR_GENERAL_ERROR.
_UNWRAP_ERRORS = (
    p11e.GeneralError,
    p11e.WrappedKeyInvalid,
    p11e.WrappedKeyLenRange,
    p11e.EncryptedDataInvalid,
    p11e.DataInvalid,
    p11e.DataLenRange,
    p11e.FunctionFailed,
)
# Errors that concern our sessions or cached handles, not the token: retried once on fresh
# sessions with an empty handle cache (a key destroyed by another user shows up here).
_SESSION_ERRORS = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.UserNotLoggedIn,
    p11e.KeyHandleInvalid,
    p11e.ObjectHandleInvalid,
    p11e.WrappingKeyHandleInvalid,
    p11e.UnwrappingKeyHandleInvalid,
    p11e.OperationActive,
)

_NO_USAGE = {
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
# A share inside the token: readable by nobody, usable for nothing but being wrapped again.
_SHARE_TEMPLATE = {
    **_NO_USAGE,
    Attribute.TOKEN: False,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: True,
}
_PRIVATE_NO_USAGE = {
    Attribute.DECRYPT: False,
    Attribute.SIGN: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
_PUBLIC_NO_USAGE = {
    Attribute.ENCRYPT: False,
    Attribute.VERIFY: False,
    Attribute.WRAP: False,
    Attribute.DERIVE: False,
}
_SESSION_SECRET = {Attribute.TOKEN: False, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False}


# operations that create (and destroy) session objects, and how many before the library is
# finalised and initialised again to free them (Pkcs11Hsm._count_session_objects)
_SESSION_OBJECT_OPS = frozenset({"seal_share", "import_share", "rewrap_share"})
RECYCLE_AFTER = 2_000


def _check_binding(binding: ShareBinding) -> ShareBinding:
    if not isinstance(binding, ShareBinding):
        raise TypeError("binding must be a ShareBinding")
    return binding


class _TokenLost(Exception):
    """The token's objects cannot be read any more (internal; becomes HsmUnavailable)."""


class _Module:
    """One loaded PKCS#11 library in this process, shared by every Pkcs11Hsm using it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.epoch = 0  # bumped whenever the library is (re)initialised: old sessions are void
        self.lib: Any = None
        self.session_object_ops = 0  # since the last (re)initialisation, see RECYCLE_AFTER

    def ensure(self) -> Any:
        with self.lock:
            if self.lib is None:
                self.lib = pkcs11.lib(self.path)
                self.epoch += 1
            elif not self.lib.initialized:
                self.lib.initialize()
                self.epoch += 1
            return self.lib

    def reinitialize(self) -> None:
        with self.lock:
            self.epoch += 1
            if self.lib is not None and self.lib.initialized:
                with contextlib.suppress(p11e.PKCS11Error):
                    self.lib.finalize()
            if self.lib is not None:
                self.lib.initialize()


_MODULES: dict[str, _Module] = {}
_MODULES_LOCK = threading.Lock()


def _module_for(path: str) -> _Module:
    with _MODULES_LOCK:
        module = _MODULES.get(path)
        if module is None:
            module = _MODULES[path] = _Module(path)
        return module


@dataclass(eq=False)
class _Pooled:
    session: Any
    epoch: int
    cache_gen: int
    keys: dict[tuple[str, int], Any] = field(default_factory=dict)


def _ec_point(der_or_raw: bytes) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING around the SEC1 point (some tokens give it raw)."""
    data = bytes(der_or_raw)
    if len(data) == 67 and data[0] == 0x04 and data[1] == 65:
        data = data[2:]
    if len(data) != sealing.EC_PUBLIC_KEY_SIZE or data[0] != 0x04:
        raise HsmError("token returned an unexpected EC point encoding")
    return data


class Pkcs11Hsm:
    """Broker keys on the token ``token_label`` of the PKCS#11 module ``module_path``.

    ``user_pin`` is copied into a :class:`SecretBuffer`; python-pkcs11 needs it as ``str`` for
    each C_Login, so a short-lived ``str`` exists during a login (a limit of the binding).
    ``connect=True`` logs in at once so a wrong label or PIN fails at construction with
    :class:`HsmUnavailable`.
    """

    def __init__(
        self,
        module_path: str,
        token_label: str,
        user_pin: SecretBuffer | str,
        pool_size: int = 4,
        *,
        serialize: bool = True,
        connect: bool = True,
    ) -> None:
        if not isinstance(module_path, str) or not module_path:
            raise ValueError("module_path must name a PKCS#11 library")
        if not isinstance(token_label, str) or not 1 <= len(token_label.encode()) <= 32:
            raise ValueError("token_label must be 1-32 bytes")
        if (
            isinstance(pool_size, bool)
            or not isinstance(pool_size, int)
            or not 1 <= pool_size <= 64
        ):
            raise ValueError("pool_size must be 1-64")
        if isinstance(user_pin, SecretBuffer):
            self._pin = user_pin.copy()
        elif isinstance(user_pin, str) and user_pin:
            self._pin = SecretBuffer.from_bytes(user_pin.encode())
        else:
            raise TypeError("user_pin must be a SecretBuffer or a non-empty str")
        self._module = _module_for(module_path)
        self._label = token_label
        self._pool_size = pool_size
        self._serialize = serialize
        self._cond = threading.Condition()
        self._idle: list[_Pooled] = []
        self._open = 0
        self._cache_gen = 0
        self._login_epoch = -1
        self._closed = False
        if connect:
            self.health()

    def __repr__(self) -> str:
        return f"<Pkcs11Hsm token={self._label!r} module={self._module.path!r}>"

    # --- session pool --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _serial(self) -> Iterator[None]:
        if self._serialize:
            with self._module.lock:
                yield
        else:
            yield

    def _borrow(self) -> _Pooled:
        with self._cond:
            while True:
                if self._closed:
                    raise HsmUnavailable("HSM backend is closed")
                epoch = self._module.epoch
                stale = [p for p in self._idle if p.epoch != epoch]
                if stale:
                    self._idle = [p for p in self._idle if p.epoch == epoch]
                    self._open -= len(stale)
                if self._idle:
                    pooled = self._idle.pop()
                    if pooled.cache_gen != self._cache_gen:
                        pooled.keys.clear()
                        pooled.cache_gen = self._cache_gen
                    return pooled
                if self._open < self._pool_size:
                    self._open += 1
                    break
                self._cond.wait()
        try:
            return self._open_session()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    def _give_back(self, pooled: _Pooled) -> None:
        with self._cond:
            if pooled.epoch == self._module.epoch and not self._closed:
                self._idle.append(pooled)
            else:
                self._open -= 1
            self._cond.notify()

    def _discard(self, pooled: _Pooled) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify()

    def _open_session(self) -> _Pooled:
        with self._module.lock:
            try:
                lib = self._module.ensure()
                try:
                    token = lib.get_token(token_label=self._label)
                except p11e.NoSuchToken:
                    # A token initialised by another process after C_Initialize is only seen
                    # after a rescan; a token that is really absent stays absent.
                    self._module.reinitialize()
                    token = lib.get_token(token_label=self._label)
                epoch = self._module.epoch
                if self._login_epoch != epoch:
                    session = self._login(token)
                    self._login_epoch = epoch
                    self._ensure_marker(session)
                else:
                    session = token.open(rw=True)
            except p11e.NoSuchToken:
                raise HsmUnavailable(f"no PKCS#11 token labelled {self._label!r}") from None
            except (
                p11e.PinIncorrect,
                p11e.PinLocked,
                p11e.PinExpired,
                p11e.PinInvalid,
                p11e.PinLenRange,
                p11e.UserPinNotInitialized,
            ) as exc:
                raise HsmUnavailable(f"HSM login refused: {type(exc).__name__}") from None
            except p11e.PKCS11Error as exc:
                # The library's view of the token may be stale (SoftHSM keeps failing a token
                # whose files vanished even after they return): start the module afresh.
                raise self._outage(f"opening a session: {type(exc).__name__}") from None
            return _Pooled(session=session, epoch=epoch, cache_gen=self._cache_gen)

    def _login(self, token: Any) -> Any:
        with self._pin.view() as pin_view:
            pin = bytes(pin_view).decode()
        try:
            return token.open(rw=True, user_pin=pin)
        except p11e.UserAlreadyLoggedIn:
            # another user of this module in this process holds the login; it is shared
            return token.open(rw=True)
        finally:
            del pin

    def _ensure_marker(self, session: Any) -> None:
        found = list(
            session.get_objects(
                {Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: labels.MARKER_LABEL}
            )
        )
        if not found:
            session.create_object(
                {
                    Attribute.CLASS: ObjectClass.DATA,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.LABEL: labels.MARKER_LABEL,
                    Attribute.APPLICATION: "ctrain",
                    Attribute.VALUE: b"ctrain token marker v1",
                }
            )

    def _outage(self, reason: str) -> HsmUnavailable:
        """Drop every session and rescan the module so the next call starts afresh."""
        with self._module.lock, contextlib.suppress(p11e.PKCS11Error):
            self._module.reinitialize()
        return HsmUnavailable(f"HSM unavailable: {reason}")

    def _run(self, name: str, op: Callable[[_Pooled], T]) -> T:
        for attempt in (1, 2):
            with self._serial():
                pooled = self._borrow()
                healthy = True
                try:
                    result = op(pooled)
                except _TokenLost:
                    healthy = False
                    raise self._outage(f"{name}: token objects unreadable") from None
                except _SESSION_ERRORS as exc:
                    healthy = False
                    with self._cond:  # void this instance's sessions, keep others' alone
                        idle, self._idle = self._idle, []
                        self._open -= len(idle)
                        self._login_epoch = -1
                    for stale in (pooled, *idle):
                        with contextlib.suppress(p11e.PKCS11Error):
                            stale.session.close()
                    if attempt == 2:
                        raise HsmUnavailable(
                            f"HSM unavailable: {name}: {type(exc).__name__}"
                        ) from None
                except p11e.PKCS11Error as exc:
                    healthy = False
                    raise self._outage(f"{name}: {type(exc).__name__}") from None
                finally:
                    if healthy:
                        self._give_back(pooled)
                    else:
                        self._discard(pooled)
                if healthy:  # else a stale session: the loop tries once more
                    self._count_session_objects(name)
                    return result
        raise AssertionError("unreachable")

    def _count_session_objects(self, name: str) -> None:
        """Recycle the library after ``RECYCLE_AFTER`` operations that create session objects.

        SoftHSM 2.6.1 never frees a destroyed session object (SoftHSMv2 issue #562: the
        attributes go, the object stays in the session object store until C_Finalize), about
        1 KiB per release; a broker that seals for days would grow without bound. Only when
        operations are serialised (the default): then no other operation of this process is
        in flight, and the epoch bump makes every pooled session reopen and log in again."""
        if not self._serialize or name not in _SESSION_OBJECT_OPS:
            return
        module = self._module
        module.session_object_ops += 1
        if module.session_object_ops >= RECYCLE_AFTER:
            module.session_object_ops = 0
            with contextlib.suppress(p11e.PKCS11Error):
                module.reinitialize()

    # --- object lookup -------------------------------------------------------------------------

    def _find(
        self, pooled: _Pooled, label: str, object_class: ObjectClass, *, cached: bool = True
    ) -> Any | None:
        """Find a key by label; ``cached=False`` asks the token (for existence questions)."""
        cache_key = (label, int(object_class))
        obj = pooled.keys.get(cache_key) if cached else None
        if obj is not None:
            return obj
        found = list(
            pooled.session.get_objects({Attribute.CLASS: object_class, Attribute.LABEL: label})
        )
        if not found:
            return None
        pooled.keys[cache_key] = found[0]
        return found[0]

    def _require(self, pooled: _Pooled, label: str, object_class: ObjectClass) -> Any:
        obj = self._find(pooled, label, object_class)
        if obj is None:
            self._check_marker(pooled)
            raise KeyNotFound(f"no key {label}")
        return obj

    def _check_marker(self, pooled: _Pooled) -> None:
        found = list(
            pooled.session.get_objects(
                {Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: labels.MARKER_LABEL}
            )
        )
        if not found:
            raise _TokenLost()

    def _forget_keys(self) -> None:
        with self._cond:
            self._cache_gen += 1

    # --- signing -------------------------------------------------------------------------------

    def _signing_pair(self, pooled: _Pooled) -> tuple[Any, Any]:
        private = self._find(pooled, labels.SIGNING_LABEL, ObjectClass.PRIVATE_KEY)
        public = self._find(pooled, labels.SIGNING_LABEL, ObjectClass.PUBLIC_KEY)
        if private is None or public is None:
            self._check_marker(pooled)
            if private is not None or public is not None:
                raise HsmError("broker signing key pair is incomplete on the token")
            params = pooled.session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: _P256}, local=True
            )
            public, private = params.generate_keypair(
                label=labels.SIGNING_LABEL,
                store=True,
                public_template={**_PUBLIC_NO_USAGE, Attribute.VERIFY: True},
                private_template={
                    **_PRIVATE_NO_USAGE,
                    Attribute.SIGN: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.PRIVATE: True,
                },
            )
            pooled.keys[(labels.SIGNING_LABEL, int(ObjectClass.PRIVATE_KEY))] = private
            pooled.keys[(labels.SIGNING_LABEL, int(ObjectClass.PUBLIC_KEY))] = public
        return private, public

    def signing_public_key(self) -> bytes:
        return self._run(
            "signing_public_key", lambda p: _ec_point(self._signing_pair(p)[1][Attribute.EC_POINT])
        )

    def sign(self, data: bytes) -> bytes:
        if not isinstance(data, bytes | bytearray):
            raise TypeError("data must be bytes")
        if len(data) > MAX_SIGN_INPUT:
            raise ValueError(f"data to sign must be at most {MAX_SIGN_INPUT} bytes")
        payload = bytes(data)

        def op(pooled: _Pooled) -> bytes:
            private, _ = self._signing_pair(pooled)
            # SoftHSM 2.6 has no CKM_ECDSA_SHA256: hash here (public data), sign the digest
            raw = private.sign(hashlib.sha256(payload).digest(), mechanism=Mechanism.ECDSA)
            return raw

        raw = self._run("sign", op)
        if len(raw) != 64:
            raise HsmError("token returned an unexpected ECDSA signature length")
        r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
        return encode_dss_signature(r, s)

    # --- tenant KEKs ---------------------------------------------------------------------------

    def create_tenant_kek(self, tenant_id: str, version: int) -> None:
        """Create ``tenant/<id>/kek/v<n>``; a no-op when it already exists."""
        label = labels.kek_label(tenant_id, version)
        kek_id = labels.kek_id(tenant_id)

        def op(pooled: _Pooled) -> None:
            if self._find(pooled, label, ObjectClass.SECRET_KEY, cached=False) is not None:
                return
            key = pooled.session.generate_key(
                KeyType.AES,
                256,
                id=kek_id,
                label=label,
                store=True,
                template={
                    **_NO_USAGE,
                    Attribute.DERIVE: True,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.MODIFIABLE: False,
                },
            )
            pooled.keys[(label, int(ObjectClass.SECRET_KEY))] = key

        self._run("create_tenant_kek", op)

    def has_tenant_kek(self, tenant_id: str, version: int) -> bool:
        label = labels.kek_label(tenant_id, version)

        def op(pooled: _Pooled) -> bool:
            if self._find(pooled, label, ObjectClass.SECRET_KEY, cached=False) is not None:
                return True
            self._check_marker(pooled)
            return False

        return self._run("has_tenant_kek", op)

    def destroy_tenant_keks(self, tenant_id: str) -> int:
        """Crypto-shred: destroy every KEK version of the tenant; returns how many."""
        kek_id = labels.kek_id(tenant_id)
        prefix = labels.kek_prefix(tenant_id)

        def op(pooled: _Pooled) -> int:
            self._check_marker(pooled)
            found = list(
                pooled.session.get_objects(
                    {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: kek_id}
                )
            )
            count = 0
            for key in found:
                if str(key.label).startswith(prefix):
                    key.destroy()
                    count += 1
            return count

        try:
            return self._run("destroy_tenant_keks", op)
        finally:
            self._forget_keys()

    def kek_attributes(self, tenant_id: str, version: int) -> dict[str, bool]:
        """Public attributes of a KEK (for audits and tests): extractable, sensitive, ...

        Reads only boolean policy attributes, never CKA_VALUE.
        """
        label = labels.kek_label(tenant_id, version)
        names = {
            "extractable": Attribute.EXTRACTABLE,
            "sensitive": Attribute.SENSITIVE,
            "always_sensitive": Attribute.ALWAYS_SENSITIVE,
            "never_extractable": Attribute.NEVER_EXTRACTABLE,
            "token": Attribute.TOKEN,
            "private": Attribute.PRIVATE,
            "wrap": Attribute.WRAP,
            "unwrap": Attribute.UNWRAP,
            "derive": Attribute.DERIVE,
            "encrypt": Attribute.ENCRYPT,
            "decrypt": Attribute.DECRYPT,
        }

        def op(pooled: _Pooled) -> dict[str, bool]:
            key = self._require(pooled, label, ObjectClass.SECRET_KEY)
            values = key.get_attributes(list(names.values()))
            return {name: bool(values[attr]) for name, attr in names.items()}

        return self._run("kek_attributes", op)

    # --- import keys ---------------------------------------------------------------------------

    def create_import_key(self, import_id: str) -> bytes:
        """Create (or return the existing) import key pair ``import/<id>``; SEC1 public key."""
        label = labels.import_label(import_id)

        def op(pooled: _Pooled) -> bytes:
            public = self._find(pooled, label, ObjectClass.PUBLIC_KEY)
            if public is None:
                params = pooled.session.create_domain_parameters(
                    KeyType.EC, {Attribute.EC_PARAMS: _P256}, local=True
                )
                public, private = params.generate_keypair(
                    label=label,
                    store=True,
                    public_template=_PUBLIC_NO_USAGE,
                    private_template={
                        **_PRIVATE_NO_USAGE,
                        Attribute.DERIVE: True,
                        Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: False,
                        Attribute.PRIVATE: True,
                    },
                )
                pooled.keys[(label, int(ObjectClass.PRIVATE_KEY))] = private
            return _ec_point(public[Attribute.EC_POINT])

        return self._run("create_import_key", op)

    def destroy_import_key(self, import_id: str) -> None:
        label = labels.import_label(import_id)

        def op(pooled: _Pooled) -> None:
            found = [
                obj
                for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY)
                for obj in pooled.session.get_objects(
                    {Attribute.CLASS: cls, Attribute.LABEL: label}
                )
            ]
            if not found:
                self._check_marker(pooled)
                raise KeyNotFound(f"no import key {label}")
            for obj in found:
                obj.destroy()

        try:
            self._run("destroy_import_key", op)
        finally:
            self._forget_keys()

    # --- share custody -------------------------------------------------------------------------

    @staticmethod
    def _transcript_key(private: Any, peer_public: bytes, digest: bytes) -> Any:
        """K = AES-ECB(ECDH(private, peer), digest), a session key that can only wrap/unwrap."""
        z = private.derive_key(
            KeyType.AES,
            256,
            mechanism=Mechanism.ECDH1_DERIVE,
            mechanism_param=(KDF.NULL, None, peer_public),
            template={**_NO_USAGE, **_SESSION_SECRET, Attribute.DERIVE: True},
        )
        try:
            return z.derive_key(
                KeyType.AES,
                256,
                mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
                mechanism_param=digest,
                template={
                    **_NO_USAGE,
                    **_SESSION_SECRET,
                    Attribute.WRAP: True,
                    Attribute.UNWRAP: True,
                },
            )
        finally:
            z.destroy()

    @staticmethod
    def _is_legacy(kek: Any) -> bool:
        """A KEK from before bound wrapping: it may wrap/unwrap but not derive."""
        return not bool(kek[Attribute.DERIVE])

    @staticmethod
    def _binding_key(kek: Any, binding: ShareBinding) -> Any:
        """W = AES-ECB(KEK, SHA-256(binding)): a session key that can only wrap/unwrap."""
        return kek.derive_key(
            KeyType.AES,
            256,
            mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
            mechanism_param=binding.digest(),
            template={**_NO_USAGE, **_SESSION_SECRET, Attribute.WRAP: True, Attribute.UNWRAP: True},
        )

    def _unwrap_bound(self, pooled: _Pooled, kek: Any, binding: ShareBinding,
                      wrapped: bytes, *, legacy_ok: bool = False) -> Any:
        """The share inside ``wrapped`` as a session object, unwrapped under W(KEK, binding)
        (or, with ``legacy_ok``, under a legacy KEK itself)."""
        if self._is_legacy(kek):
            if not legacy_ok:
                raise LegacyWrapping(
                    "share is wrapped under a KEK from before bound wrapping; rotate the "
                    "tenant KEK to re-wrap it"
                )
            return self._unwrap_share(pooled, kek, wrapped)
        w = self._binding_key(kek, binding)
        try:
            return self._unwrap_share(pooled, w, wrapped)
        finally:
            w.destroy()

    def _wrap_bound(self, kek: Any, binding: ShareBinding, share: Any) -> bytes:
        if self._is_legacy(kek):
            raise LegacyWrapping("a KEK from before bound wrapping cannot wrap new shares")
        w = self._binding_key(kek, binding)
        try:
            return bytes(w.wrap_key(share, mechanism=Mechanism.AES_KEY_WRAP_PAD))
        finally:
            w.destroy()

    def _unwrap_share(self, pooled: _Pooled, unwrapping_key: Any, wrapped: bytes) -> Any:
        try:
            share = unwrapping_key.unwrap_key(
                ObjectClass.SECRET_KEY,
                KeyType.GENERIC_SECRET,
                wrapped,
                mechanism=Mechanism.AES_KEY_WRAP_PAD,
                store=False,
                template=_SHARE_TEMPLATE,
            )
        except _UNWRAP_ERRORS:
            # CKR_GENERAL_ERROR is also what a vanished token gives: tell the two apart
            self._check_marker(pooled)
            raise UnwrapFailed("share did not authenticate") from None
        # SoftHSM leaves CKA_VALUE_LEN at 0 on unwrapped keys, so the share length cannot be
        # checked here; a 40-byte KWP blob holds 25-32 bytes and a short share (which only a
        # tenant could import, harming itself) is refused by the node: open_sealed_share
        # accepts exactly SHARE_SIZE bytes.
        return share

    def import_share(
        self,
        import_id: str,
        sealed_share: bytes,
        transcript: bytes,
        binding: ShareBinding,
        kek_version: int,
    ) -> bytes:
        import_label = labels.import_label(import_id)
        kek_label = labels.kek_label(_check_binding(binding).tenant_id, kek_version)
        ephemeral, sealed = sealing.parse_sealed_blob(sealed_share)
        digest = sealing.transcript_digest(transcript)

        def op(pooled: _Pooled) -> bytes:
            private = self._require(pooled, import_label, ObjectClass.PRIVATE_KEY)
            kek = self._require(pooled, kek_label, ObjectClass.SECRET_KEY)
            k = self._transcript_key(private, ephemeral, digest)
            try:
                share = self._unwrap_share(pooled, k, sealed)
            finally:
                k.destroy()
            try:
                return self._wrap_bound(kek, binding, share)
            finally:
                share.destroy()

        return self._run("import_share", op)

    def rewrap_share(
        self, wrapped_share: bytes, binding: ShareBinding, from_version: int, to_version: int
    ) -> bytes:
        """Unwrap under the old KEK (bound, or a legacy KEK itself) and wrap bound under the
        new one: KEK rotation, and the migration of legacy shares."""
        wrapped = labels.check_wrapped_share(wrapped_share)
        old_label = labels.kek_label(_check_binding(binding).tenant_id, from_version)
        new_label = labels.kek_label(binding.tenant_id, to_version)

        def op(pooled: _Pooled) -> bytes:
            old = self._require(pooled, old_label, ObjectClass.SECRET_KEY)
            new = self._require(pooled, new_label, ObjectClass.SECRET_KEY)
            share = self._unwrap_bound(pooled, old, binding, wrapped, legacy_ok=True)
            try:
                return self._wrap_bound(new, binding, share)
            finally:
                share.destroy()

        return self._run("rewrap_share", op)

    def seal_share(
        self,
        wrapped_share: bytes,
        binding: ShareBinding,
        kek_version: int,
        node_public_key: bytes,
        transcript: bytes,
    ) -> bytes:
        wrapped = labels.check_wrapped_share(wrapped_share)
        kek_label = labels.kek_label(_check_binding(binding).tenant_id, kek_version)
        sealing.decode_public_key(node_public_key)  # on-curve check before the token sees it
        node_public = bytes(node_public_key)
        digest = sealing.transcript_digest(transcript)

        def op(pooled: _Pooled) -> bytes:
            kek = self._require(pooled, kek_label, ObjectClass.SECRET_KEY)
            share = self._unwrap_bound(pooled, kek, binding, wrapped)
            doomed = [share]
            try:
                params = pooled.session.create_domain_parameters(
                    KeyType.EC, {Attribute.EC_PARAMS: _P256}, local=True
                )
                eph_public, eph_private = params.generate_keypair(
                    store=False,
                    public_template=_PUBLIC_NO_USAGE,
                    private_template={
                        **_PRIVATE_NO_USAGE,
                        **_SESSION_SECRET,
                        Attribute.DERIVE: True,
                    },
                )
                doomed += [eph_private, eph_public]
                k = self._transcript_key(eph_private, node_public, digest)
                doomed.append(k)
                sealed = bytes(k.wrap_key(share, mechanism=Mechanism.AES_KEY_WRAP_PAD))
                return sealing.encode_sealed_blob(_ec_point(eph_public[Attribute.EC_POINT]), sealed)
            finally:
                for obj in reversed(doomed):
                    with contextlib.suppress(p11e.PKCS11Error):
                        obj.destroy()

        return self._run("seal_share", op)

    # --- audit anchor --------------------------------------------------------------------------

    @staticmethod
    def _anchor_objects(pooled: _Pooled) -> list[tuple[int, bytes, Any]]:
        """Every anchor object on the token as (seq, hash, object), latest first.

        SoftHSM keeps CKA_VALUE of a data object read-only, so an anchor moves forward by
        creating the new object before destroying the old one: a crash in between leaves two,
        and the later one counts (the anchor never moves back, not even then)."""
        out = []
        for obj in pooled.session.get_objects(
            {Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: labels.ANCHOR_LABEL}
        ):
            try:
                seq, digest = labels.decode_anchor(bytes(obj[Attribute.VALUE]))
            except ValueError:
                raise HsmError("the audit anchor object on the token is malformed") from None
            out.append((seq, digest, obj))
        return sorted(out, key=lambda item: item[0], reverse=True)

    def audit_anchor(self) -> tuple[int, bytes] | None:
        def op(pooled: _Pooled) -> tuple[int, bytes] | None:
            found = self._anchor_objects(pooled)
            if not found:
                self._check_marker(pooled)
                return None
            return found[0][0], found[0][1]

        return self._run("audit_anchor", op)

    def set_audit_anchor(self, seq: int, record_hash: bytes) -> None:
        """Store (seq, hash) unless the token already holds a later anchor (never moves back)."""
        value = labels.encode_anchor(seq, record_hash)

        def op(pooled: _Pooled) -> None:
            found = self._anchor_objects(pooled)
            if not found:
                self._check_marker(pooled)
            elif found[0][0] >= seq:
                return
            pooled.session.create_object({
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.LABEL: labels.ANCHOR_LABEL,
                Attribute.APPLICATION: "ctrain",
                Attribute.VALUE: value,
            })
            for _, _, old in found:
                old.destroy()

        self._run("set_audit_anchor", op)

    # --- lifecycle -----------------------------------------------------------------------------

    def health(self) -> None:
        """Raise :class:`HsmUnavailable` unless the token answers and its objects are readable."""
        self._run("health", self._check_marker)

    def close(self) -> None:
        """Close this backend's sessions (idempotent). Later calls raise HsmUnavailable."""
        with self._serial(), self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            for pooled in idle:
                if pooled.epoch == self._module.epoch:
                    with contextlib.suppress(p11e.PKCS11Error):
                        pooled.session.close()
            self._cond.notify_all()
        self._pin.zeroize()
