"""Broker configuration for the TEE verifiers: file paths in ``reference_values`` turned into
trust stores, collateral and RIMs, loaded once per set of file contents.

``kms-broker`` passes ``reference_values[<kind>]`` (plain YAML) to a verifier as
``VerificationContext.reference``. For ``tdx`` and ``nvidia-gpu`` (and inside ``composite``,
under the kind's name) these keys are read; everything is optional:

.. code-block:: yaml

    tdx:
      roots: [intel-root.pem]          # replaces the bundled Intel SGX Root CA
      collateral: {tcb_info: tcbinfo.json, qe_identity: qe.json, signing_chain: chain.pem,
                   pck_crl: pck.crl, root_crl: root.crl}
    nvidia-gpu:
      device_roots: [device-ca.pem]    # replaces the bundled NVIDIA Device Identity CA
      rim_roots: [rim-root.pem]        # replaces the bundled NVIDIA CoRIM signing root
      driver_rims: [driver.swidtag]
      vbios_rims: [vbios.swidtag]
      rim_validation_time: 2025-01-01T00:00:00Z   # default: when the RIMs are loaded

Production configurations name only collateral and RIMs; the roots default to the real
Intel and NVIDIA ones bundled with the package. Test configurations add test roots (they
live under tests/, never in a production trust store).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

__all__ = ["nvidia_trust", "tdx_trust"]

_CACHE: dict[str, Any] = {}
_LOCK = threading.Lock()
_MAX_CACHE = 16


def _read(path: Any, what: str) -> bytes:
    try:
        return Path(str(path)).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror}") from None


def _paths(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{what} must be a path or a list of paths")


def _cached(key_parts: list[bytes], build: Any) -> Any:
    key = hashlib.sha256(b"\0".join(key_parts)).hexdigest()
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    value = build()
    with _LOCK:
        if len(_CACHE) >= _MAX_CACHE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = value
    return value


def tdx_trust(reference: Mapping[str, Any]) -> tuple[Any, Any]:
    """(IntelTrustStore or None, TdxCollateral or None) from objects or YAML paths."""
    from attest.tdx import IntelTrustStore, TdxCollateral

    store = reference.get("tdx_trust_store")
    collateral = reference.get("tdx_collateral")
    roots = _paths(reference.get("roots"), "tdx roots")
    if store is None and roots:
        pems = [_read(p, "tdx root") for p in roots]
        store = _cached([b"tdx-roots", *pems], lambda: IntelTrustStore(roots=tuple(
            c for pem in pems for c in x509.load_pem_x509_certificates(pem))))
    raw = reference.get("collateral")
    if collateral is None and raw is not None:
        if not isinstance(raw, Mapping):
            raise ValueError("tdx collateral must be a mapping of file paths")
        files = {k: _read(raw[k], f"tdx collateral {k}") if raw.get(k) else None
                 for k in ("tcb_info", "qe_identity", "signing_chain", "pck_crl", "root_crl")}
        if files["tcb_info"] is None or files["signing_chain"] is None:
            raise ValueError("tdx collateral needs tcb_info and signing_chain")
        collateral = _cached(
            [b"tdx-collateral", *(f or b"-" for f in files.values())],
            lambda: TdxCollateral.load(
                tcb_info=files["tcb_info"], qe_identity=files["qe_identity"],
                signing_chain_pem=files["signing_chain"], pck_crl_der=files["pck_crl"],
                root_crl_der=files["root_crl"]))
    return store, collateral


def nvidia_trust(reference: Mapping[str, Any]) -> tuple[Any, Any]:
    """(NvidiaTrustStore or None, RimStore or None) from objects or YAML paths."""
    from attest.nvidia import NvidiaTrustStore, RimStore

    store = reference.get("nvidia_trust_store")
    rims = reference.get("nvidia_rims")
    device = _paths(reference.get("device_roots"), "nvidia-gpu device_roots")
    rim_roots = _paths(reference.get("rim_roots"), "nvidia-gpu rim_roots")
    if store is None and (device or rim_roots):
        bundled = NvidiaTrustStore.bundled()
        dev_pems = [_read(p, "device root") for p in device]
        rim_pems = [_read(p, "RIM root") for p in rim_roots]

        def build_store() -> Any:
            def load(pems: list[bytes], default: Any) -> Any:
                certs = tuple(c for pem in pems for c in x509.load_pem_x509_certificates(pem))
                return certs or default
            return NvidiaTrustStore(device_roots=load(dev_pems, bundled.device_roots),
                                    rim_roots=load(rim_pems, bundled.rim_roots))

        store = _cached([b"nv-roots", *dev_pems, b"|", *rim_pems], build_store)
    driver = _paths(reference.get("driver_rims"), "nvidia-gpu driver_rims")
    vbios = _paths(reference.get("vbios_rims"), "nvidia-gpu vbios_rims")
    if rims is None and (driver or vbios):
        at_raw = reference.get("rim_validation_time")
        if isinstance(at_raw, dt.datetime):
            at = at_raw if at_raw.tzinfo else at_raw.replace(tzinfo=dt.UTC)
        elif at_raw:
            at = dt.datetime.fromisoformat(str(at_raw).replace("Z", "+00:00"))
        else:  # validated now; the cache key holds the day, so RIMs are re-validated daily
            now = dt.datetime.now(dt.UTC)
            at = now.replace(hour=0, minute=0, second=0, microsecond=0)
        roots = (store or NvidiaTrustStore.bundled()).rim_roots
        driver_data = [_read(p, "driver RIM") for p in driver]
        vbios_data = [_read(p, "VBIOS RIM") for p in vbios]
        rims = _cached(
            [b"nv-rims", at.isoformat().encode(), *driver_data, b"|", *vbios_data, b"|",
             *(c.fingerprint(hashes.SHA256()) for c in roots)],
            lambda: RimStore.load(driver=driver_data, vbios=vbios_data, roots=roots, at=at))
    return store, rims
