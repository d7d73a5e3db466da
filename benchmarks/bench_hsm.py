"""HSM sealing: our Pkcs11Hsm against the bare PKCS#11 calls and a software peer.

Side by side, one SoftHSM2 token, the same share and node key:

- ``ours``: ``Pkcs11Hsm.seal_share`` (validation, session pool, key cache, error mapping);
- ``raw``: the same PKCS#11 operations through python-pkcs11 with no wrapper (the floor);
- ``software``: ``kms_broker.sealing.seal_share_to`` with ``cryptography`` (no HSM at all);
- ``open``: ``open_sealed_share`` on the node side.

:func:`raw_seal_rate` is what the broker benchmark compares release throughput against.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from kms_broker import sealing
from kms_broker.hsm import labels, softhsm
from kms_broker.hsm.interface import Hsm, ShareBinding
from sealed.secrets import SecretBuffer

__all__ = ["main", "raw_seal_rate"]

BENCH_TENANT = "bench-raw-seal"
BENCH_BINDING = ShareBinding(tenant_id=BENCH_TENANT, dataset_id="ds", key_version=1, share_index=0)


def _prepare(hsm: Hsm) -> tuple[bytes, bytes, bytes]:
    """(wrapped share, node public key, transcript) for a throwaway tenant."""
    hsm.create_tenant_kek(BENCH_TENANT, 1)
    import_id = f"bench-{secrets.token_hex(4)}"
    pub = hsm.create_import_key(import_id)
    transcript = sealing.import_transcript(
        import_id=import_id,
        tenant_id=BENCH_TENANT,
        dataset_id="ds",
        key_version=1,
        share_index=0,
        broker_id="bench",
        import_public_key=pub,
    )
    with SecretBuffer.random(32) as share:
        sealed = sealing.seal_share_to(pub, share, transcript)
    wrapped = hsm.import_share(import_id, sealed, transcript, BENCH_BINDING, 1)
    hsm.destroy_import_key(import_id)
    _, node_pub = sealing.generate_node_key()
    release = sealing.release_transcript(
        session_id=b"bench",
        nonce=os.urandom(32),
        tenant_id=BENCH_TENANT,
        dataset_id="ds",
        key_version=1,
        broker_id="bench",
        node_public_key=node_pub,
    )
    return wrapped, node_pub, release


def raw_seal_rate(hsm: Hsm, seconds: float) -> float:
    """Sealing operations per second of ``hsm.seal_share`` on one thread for ``seconds``."""
    wrapped, node_pub, transcript = _prepare(hsm)
    hsm.seal_share(wrapped, BENCH_BINDING, 1, node_pub, transcript)  # warm the caches
    count, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        hsm.seal_share(wrapped, BENCH_BINDING, 1, node_pub, transcript)
        count += 1
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def _time(fn: Callable[[], object], n: int) -> list[float]:
    fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _raw_pkcs11_sealer(
    token: Any, wrapped: bytes, node_pub: bytes, transcript: bytes
) -> Callable[[], bytes]:
    """The sealing as bare python-pkcs11 calls on one session: the floor for our wrapper.

    The same PKCS#11 operations, mechanisms and templates as ``Pkcs11Hsm.seal_share``
    (its ``_unwrap_bound`` and ``_transcript_key``): derive the binding key
    W = AES-ECB(KEK, SHA-256(binding)), unwrap the share under W, destroy W, generate an
    ephemeral P-256 keypair, derive Z by ECDH with the node key, derive
    K = AES-ECB(Z, SHA-256(transcript)), destroy Z, wrap the share under K, destroy the rest.
    No validation, session pool, key cache, retry or error mapping.
    """
    import pkcs11
    from pkcs11 import KDF, Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11.util.ec import encode_named_curve_parameters

    no_usage = {
        Attribute.ENCRYPT: False,
        Attribute.DECRYPT: False,
        Attribute.SIGN: False,
        Attribute.VERIFY: False,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }
    session_secret = {
        Attribute.TOKEN: False,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
    }
    wrap_only = {**no_usage, **session_secret, Attribute.WRAP: True, Attribute.UNWRAP: True}
    share_template = {
        **no_usage,
        Attribute.TOKEN: False,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: True,
    }
    public_template = {
        Attribute.ENCRYPT: False,
        Attribute.VERIFY: False,
        Attribute.WRAP: False,
        Attribute.DERIVE: False,
    }
    private_template = {
        Attribute.DECRYPT: False,
        Attribute.SIGN: False,
        Attribute.UNWRAP: False,
        **session_secret,
        Attribute.DERIVE: True,
    }

    lib = pkcs11.lib(softhsm.find_module())
    session = lib.get_token(token_label=token).open(rw=True)
    # no login here: the Pkcs11Hsm of this process already logged the module in
    kek = session.get_key(
        label=labels.kek_label(BENCH_TENANT, 1), object_class=ObjectClass.SECRET_KEY
    )
    p256 = encode_named_curve_parameters("secp256r1")
    binding_digest = BENCH_BINDING.digest()
    digest = hashlib.sha256(transcript).digest()

    def seal() -> bytes:
        w = kek.derive_key(
            KeyType.AES,
            256,
            mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
            mechanism_param=binding_digest,
            template=wrap_only,
        )
        share = w.unwrap_key(
            ObjectClass.SECRET_KEY,
            KeyType.GENERIC_SECRET,
            wrapped,
            mechanism=Mechanism.AES_KEY_WRAP_PAD,
            store=False,
            template=share_template,
        )
        w.destroy()
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: p256}, local=True
        )
        pub, priv = params.generate_keypair(
            store=False, public_template=public_template, private_template=private_template
        )
        z = priv.derive_key(
            KeyType.AES,
            256,
            mechanism=Mechanism.ECDH1_DERIVE,
            mechanism_param=(KDF.NULL, None, node_pub),
            template={**no_usage, **session_secret, Attribute.DERIVE: True},
        )
        k = z.derive_key(
            KeyType.AES,
            256,
            mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
            mechanism_param=digest,
            template=wrap_only,
        )
        z.destroy()
        sealed = bytes(k.wrap_key(share, mechanism=Mechanism.AES_KEY_WRAP_PAD))
        point = bytes(pub[Attribute.EC_POINT])
        for obj in (k, priv, pub, share):
            obj.destroy()
        if len(point) == 67 and point[:2] == b"\x04\x41":  # DER OCTET STRING around the point
            point = point[2:]
        return sealing.encode_sealed_blob(point, sealed)

    return seal


def main(quick: bool) -> None:
    from kms_broker.hsm.pkcs11_hsm import Pkcs11Hsm

    n = 200 if quick else 2000
    seconds = 1.0 if quick else 5.0
    with tempfile.TemporaryDirectory(prefix="bench-hsm-") as state:
        label, pin = "bench", secrets.token_hex(8)
        config = softhsm.init_token(state, label, secrets.token_hex(8), pin)
        softhsm.use_config(config)
        hsm = Pkcs11Hsm(softhsm.find_module(), label, pin)
        try:
            wrapped, node_pub, transcript = _prepare(hsm)
            node_key, _ = sealing.generate_node_key()
            node_pub = sealing.public_key_bytes(node_key)
            ours = _time(lambda: hsm.seal_share(wrapped, BENCH_BINDING, 1, node_pub, transcript), n)
            raw_seal = _raw_pkcs11_sealer(label, wrapped, node_pub, transcript)
            raw = _time(raw_seal, n)
            share = SecretBuffer.random(32)
            software = _time(lambda: sealing.seal_share_to(node_pub, share, transcript), n)
            blob = hsm.seal_share(wrapped, BENCH_BINDING, 1, node_pub, transcript)
            # the floor must do the real work: its blob opens on the node to the same share
            with (
                sealing.open_sealed_share(node_key, blob, transcript) as want,
                sealing.open_sealed_share(node_key, raw_seal(), transcript) as got,
            ):
                if not got.equals(want):
                    raise AssertionError("raw PKCS#11 sealing opened to a different share")
            opened = _time(lambda: sealing.open_sealed_share(node_key, blob, transcript), n)
            rate = raw_seal_rate(hsm, seconds)
        finally:
            hsm.close()

    def row(name: str, samples: list[float]) -> float:
        p50 = statistics.median(samples)
        p99 = sorted(samples)[int(len(samples) * 0.99) - 1]
        print(f"{name:<34} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms")
        return p50

    print(f"SoftHSM {len(ours)} sealings per variant, one thread")
    ours_p50 = row("ours   Pkcs11Hsm.seal_share", ours)
    raw_p50 = row("raw    python-pkcs11 calls", raw)
    sw_p50 = row("peer   cryptography seal_share_to", software)
    row("node   open_sealed_share", opened)
    print(f"ours / raw PKCS#11       {ours_p50 / raw_p50:5.2f}x")
    print(f"ours / software sealing  {ours_p50 / sw_p50:5.2f}x  (the price of HSM custody)")
    print(f"raw_seal_rate            {rate:7.0f} seals/s over {seconds:g} s")
    _goal("hsm_seal_ms", ours_p50, "<=", 2.0, " ms")
    _goal("hsm_wrapper_overhead", ours_p50 / raw_p50, "<=", 1.5, "x")
    _goal("hsm_seal_rate", rate, ">=", 500, " ops/s")


def _goal(name: str, value: float, op: str, target: float, unit: str = "") -> None:
    met = value <= target if op == "<=" else value >= target
    print(
        f"goal {name}: {value:.3g}{unit} (target {op} {target:g}{unit}) "
        f"{'met' if met else 'missed'}"
    )


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
