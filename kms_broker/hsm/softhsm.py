"""SoftHSM2 token setup for development, tests and the embedded default (``kms-broker hsm init``).

Layout under a state directory ``STATE``::

    STATE/softhsm2.conf      directories.tokendir = STATE/tokens, objectstore.backend = file
    STATE/tokens/            one sub-directory per token (SoftHSM's file object store)

SoftHSM reads its configuration from the file named by ``SOFTHSM2_CONF`` when the library is
initialised (C_Initialize). The variable holds a path, never a secret; :func:`use_config` sets it
for this process (and the children it starts).

PINs never travel on a command line or in the environment. :func:`init_token` runs
C_InitToken / C_Login(SO) / C_InitPIN through ``ctypes`` in a short-lived child process
(``python -m kms_broker.hsm.softhsm``) that reads the PINs from its stdin pipe. A child is used
because a PKCS#11 library is initialised once per process: the parent may already hold SoftHSM
with another configuration (python-pkcs11), and a token created by a child is visible to any
process that initialises the library afterwards.

Making the token unavailable for fault tests: :func:`make_token_unavailable` renames the token
directory away and :func:`make_token_available` puts it back. This affects every token of that
configuration. SoftHSM notices on its next access that the token's files are gone (objects
vanish, logins fail with CKR_GENERAL_ERROR, C_Initialize fails), so a running ``Pkcs11Hsm``
raises ``HsmUnavailable``; it reinitialises the module on each failure and works again, the same
object, once the directory is back (see ``kms_broker.hsm.pkcs11_hsm`` on recovery).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sealed.secrets import SecretBuffer

__all__ = [
    "DEFAULT_MODULE",
    "SoftHsmConfig",
    "TokenInitError",
    "find_module",
    "init_token",
    "make_token_available",
    "make_token_unavailable",
    "use_config",
    "write_config",
]

DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
_MODULE_CANDIDATES = (
    DEFAULT_MODULE,
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
MAX_PIN_BYTES = 255  # SoftHSM's own limit
MIN_PIN_BYTES = 4
MAX_LABEL_BYTES = 32  # CK_TOKEN_INFO.label is 32 bytes, blank padded


class TokenInitError(RuntimeError):
    """Token initialisation failed; the message names the PKCS#11 step, never a PIN."""


@dataclass(frozen=True, kw_only=True)
class SoftHsmConfig:
    state_dir: Path
    config_path: Path
    token_dir: Path


def find_module() -> str:
    """The SoftHSM2 PKCS#11 module on this machine."""
    for candidate in _MODULE_CANDIDATES:
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(
        "libsofthsm2.so not found; install the softhsm2 package (apt-get install softhsm2)"
    )


def write_config(state_dir: str | os.PathLike[str]) -> SoftHsmConfig:
    """Create ``STATE/softhsm2.conf`` and ``STATE/tokens`` (mode 0700); idempotent."""
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    tokens = state / "tokens"
    tokens.mkdir(exist_ok=True, mode=0o700)
    conf = state / "softhsm2.conf"
    text = (
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    if not conf.exists() or conf.read_text() != text:
        tmp = conf.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, conf)
    return SoftHsmConfig(state_dir=state, config_path=conf, token_dir=tokens)


def use_config(config: SoftHsmConfig) -> None:
    """Point this process (and its children) at the configuration: set SOFTHSM2_CONF."""
    os.environ["SOFTHSM2_CONF"] = str(config.config_path)


def _pin_bytes(kind: str, pin: SecretBuffer | str) -> bytearray:
    if isinstance(pin, SecretBuffer):
        with pin.view() as v:
            raw = bytearray(v)
    elif isinstance(pin, str):
        raw = bytearray(pin.encode())
    else:
        raise TypeError(f"{kind} PIN must be a SecretBuffer or str")
    if not MIN_PIN_BYTES <= len(raw) <= MAX_PIN_BYTES or b"\n" in raw or b"\x00" in raw:
        n = len(raw)
        raw[:] = bytes(n)
        raise ValueError(
            f"{kind} PIN must be {MIN_PIN_BYTES}-{MAX_PIN_BYTES} bytes without newlines or NULs"
        )
    return raw


def _validate_label(label: str) -> bytes:
    if not isinstance(label, str):
        raise TypeError("token label must be a str")
    raw = label.encode()
    if not 1 <= len(raw) <= MAX_LABEL_BYTES or raw != raw.strip() or not raw.isascii():
        raise ValueError(
            f"token label must be 1-{MAX_LABEL_BYTES} ASCII characters without edge spaces"
        )
    return raw


def init_token(
    state_dir: str | os.PathLike[str],
    label: str,
    so_pin: SecretBuffer | str,
    user_pin: SecretBuffer | str,
    *,
    module_path: str | None = None,
) -> SoftHsmConfig:
    """Write the config under ``state_dir`` and initialise a token ``label`` with both PINs.

    Raises ``ValueError`` for a bad label/PIN, ``FileExistsError`` when a token with that label
    already exists there, :class:`TokenInitError` when SoftHSM refuses.
    """
    raw_label = _validate_label(label)
    config = write_config(state_dir)
    module = module_path or find_module()
    so = _pin_bytes("SO", so_pin)
    user = _pin_bytes("user", user_pin)
    payload = bytearray()
    try:
        payload += so + b"\n" + user + b"\n"
        env = dict(os.environ, SOFTHSM2_CONF=str(config.config_path))
        proc = subprocess.run(
            [sys.executable, "-m", "kms_broker.hsm.softhsm", module, raw_label.decode()],
            input=bytes(payload),
            capture_output=True,
            env=env,
            check=False,
        )
    finally:
        for buf in (so, user, payload):
            buf[:] = bytes(len(buf))
    if proc.returncode == 3:
        raise FileExistsError(f"a token labelled {label!r} already exists in {config.token_dir}")
    if proc.returncode != 0:
        reason = proc.stderr.decode(errors="replace").strip()[-300:]
        raise TokenInitError(f"SoftHSM token initialisation failed: {reason}")
    return config


def make_token_unavailable(config: SoftHsmConfig) -> Path:
    """Fault injection for tests: move the token directory away; returns where it went."""
    hidden = config.token_dir.with_name(config.token_dir.name + ".unavailable")
    os.rename(config.token_dir, hidden)
    return hidden


def make_token_available(config: SoftHsmConfig) -> None:
    """Undo :func:`make_token_unavailable`."""
    hidden = config.token_dir.with_name(config.token_dir.name + ".unavailable")
    os.rename(hidden, config.token_dir)


# --- child process: C_InitToken through ctypes -------------------------------------------------

_CKF_RW_SESSION = 0x2
_CKF_SERIAL_SESSION = 0x4
_CKF_TOKEN_INITIALIZED = 0x400
_CKU_SO = 0
_CK_ULONG = ctypes.c_ulong


class _CkTokenInfo(ctypes.Structure):
    _fields_ = [
        ("label", ctypes.c_char * 32),
        ("manufacturerID", ctypes.c_char * 32),
        ("model", ctypes.c_char * 16),
        ("serialNumber", ctypes.c_char * 16),
        ("flags", _CK_ULONG),
        ("ulMaxSessionCount", _CK_ULONG),
        ("ulSessionCount", _CK_ULONG),
        ("ulMaxRwSessionCount", _CK_ULONG),
        ("ulRwSessionCount", _CK_ULONG),
        ("ulMaxPinLen", _CK_ULONG),
        ("ulMinPinLen", _CK_ULONG),
        ("ulTotalPublicMemory", _CK_ULONG),
        ("ulFreePublicMemory", _CK_ULONG),
        ("ulTotalPrivateMemory", _CK_ULONG),
        ("ulFreePrivateMemory", _CK_ULONG),
        ("hardwareVersion", ctypes.c_ubyte * 2),
        ("firmwareVersion", ctypes.c_ubyte * 2),
        ("utcTime", ctypes.c_char * 16),
    ]


def _child_main(module: str, label: str) -> int:
    lines = sys.stdin.buffer.read().split(b"\n")
    if len(lines) < 2:
        print("expected two PIN lines on stdin", file=sys.stderr)
        return 2
    so_pin, user_pin = bytearray(lines[0]), bytearray(lines[1])
    lib = ctypes.CDLL(module)

    def check(step: str, rv: int) -> None:
        if rv != 0:
            raise TokenInitError(f"{step} returned CKR 0x{rv:x}")

    check("C_Initialize", lib.C_Initialize(None))
    try:
        count = _CK_ULONG(0)
        check("C_GetSlotList", lib.C_GetSlotList(ctypes.c_ubyte(1), None, ctypes.byref(count)))
        slots = (_CK_ULONG * count.value)()
        check("C_GetSlotList", lib.C_GetSlotList(ctypes.c_ubyte(1), slots, ctypes.byref(count)))
        free_slot = None
        padded = label.encode().ljust(32, b" ")
        for slot in slots[: count.value]:
            info = _CkTokenInfo()
            check("C_GetTokenInfo", lib.C_GetTokenInfo(_CK_ULONG(slot), ctypes.byref(info)))
            if info.flags & _CKF_TOKEN_INITIALIZED:
                if bytes(info.label).ljust(32, b" ") == padded:
                    return 3
            elif free_slot is None:
                free_slot = slot
        if free_slot is None:
            raise TokenInitError("no free SoftHSM slot")
        slot_id = _CK_ULONG(free_slot)
        so_buf = (ctypes.c_char * len(so_pin)).from_buffer(so_pin)
        user_buf = (ctypes.c_char * len(user_pin)).from_buffer(user_pin)
        label_buf = ctypes.create_string_buffer(padded, 32)
        check("C_InitToken", lib.C_InitToken(slot_id, so_buf, _CK_ULONG(len(so_pin)), label_buf))
        session = _CK_ULONG(0)
        check(
            "C_OpenSession",
            lib.C_OpenSession(
                slot_id,
                _CK_ULONG(_CKF_SERIAL_SESSION | _CKF_RW_SESSION),
                None,
                None,
                ctypes.byref(session),
            ),
        )
        check(
            "C_Login(SO)", lib.C_Login(session, _CK_ULONG(_CKU_SO), so_buf, _CK_ULONG(len(so_pin)))
        )
        check("C_InitPIN", lib.C_InitPIN(session, user_buf, _CK_ULONG(len(user_pin))))
        check("C_Logout", lib.C_Logout(session))
        check("C_CloseSession", lib.C_CloseSession(session))
        return 0
    except TokenInitError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    finally:
        so_pin[:] = bytes(len(so_pin))
        user_pin[:] = bytes(len(user_pin))
        lib.C_Finalize(None)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(
            "internal helper: python -m kms_broker.hsm.softhsm MODULE LABEL < pins", file=sys.stderr
        )
        sys.exit(2)
    sys.exit(_child_main(sys.argv[1], sys.argv[2]))
