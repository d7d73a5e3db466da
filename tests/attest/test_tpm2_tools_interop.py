"""Interop with tpm2-tools (a producer no one here wrote), on a real swtpm.

* quotes made by ``tpm2_quote`` (ECDSA and RSA AKs made by ``tpm2_createak``) verify with our
  verifier, including the full tpm2 evidence path (event log extended by ``tpm2_pcrextend``),
  for a quote of the SHA-256 bank and for a multi-bank quote (SHA-256 + SHA-384);
* a credential made by our pure-Python MakeCredential is activated by
  ``tpm2_activatecredential`` with the EK and AK tpm2-tools created.

Without a resource manager transient objects outlive each tool, so every step flushes them.
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from attest.eventlog import EventLog
from attest.interface import VerificationContext, expected_report_data
from attest.swtpm import Swtpm
from attest.tpm2 import Tpm2Evidence, Tpm2Verifier
from attest.tpm2.credential import make_credential
from attest.tpm2.marshal import ALG_SHA256, ALG_SHA384, parse_public
from attest.tpm2.quote import check_quote
from attest.tpm2.tpm2tools import parse_tpm2tools_pcrs

pytestmark = pytest.mark.integration

QUOTED = "sha256:0,1,2,3,4,5,6,7,23"


class Tools:
    def __init__(self, tpm: Swtpm, workdir: Path) -> None:
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TPM2TOOLS_TCTI": tpm.tcti}
        self.dir = workdir

    def __call__(self, *args: str) -> str:
        proc = subprocess.run(
            list(args), cwd=self.dir, env=self.env, capture_output=True, text=True, check=False
        )
        subprocess.run(
            ["tpm2_flushcontext", "-t"], cwd=self.dir, env=self.env, capture_output=True
        )
        assert proc.returncode == 0, f"{args[0]} failed: {proc.stderr}"
        return proc.stdout


@pytest.fixture(scope="module")
def tools(swtpm_factory: Callable[..., Swtpm], tmp_path_factory) -> Tools:
    # SHA-256 and SHA-384 banks, so a quote may select both
    t = Tools(swtpm_factory(pcr_banks="sha256,sha384"), tmp_path_factory.mktemp("tpm2-tools"))
    t("tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
    t("tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "ecc", "-g", "sha256", "-s",
      "ecdsa", "-u", "ak.pem", "-f", "pem", "-n", "ak.name")
    t("tpm2_flushcontext", "-s")
    return t


def clock_byte(attest: bytes) -> int:
    signer_len = struct.unpack_from(">H", attest, 6)[0]
    extra_len = struct.unpack_from(">H", attest, 8 + signer_len)[0]
    return 8 + signer_len + 2 + extra_len + 7


def tpm2_quote(tools: Tools, ak_ctx: str, nonce: bytes) -> tuple[bytes, bytes, bytes]:
    tools("tpm2_quote", "-c", ak_ctx, "-l", QUOTED, "-q", nonce.hex(), "-m", "msg", "-s", "sig",
          "-o", "pcrs", "-g", "sha256")
    return tuple((tools.dir / n).read_bytes() for n in ("msg", "sig", "pcrs"))  # type: ignore[return-value]


def test_tpm2_quote_with_ecdsa_ak_verifies_end_to_end(tools):
    claims = {"ksm_enabled": False, "code_digest": "ab" * 32}
    log = EventLog.from_claims(claims)
    tools("tpm2_pcrreset", "23")
    for event in log.events:
        tools("tpm2_pcrextend", f"23:sha256={event.digest.hex()}")
    nonce = os.urandom(32)
    rd = expected_report_data(nonce, "s1", b"node-key")
    msg, sig, pcr_file = tpm2_quote(tools, "ak.ctx", rd)
    pcrs = parse_tpm2tools_pcrs(pcr_file)[ALG_SHA256]
    evidence = Tpm2Evidence(msg, sig, pcrs, log.to_bytes()).to_bytes()
    ctx = VerificationContext(
        expected_report_data=rd,
        node={"ak_public": (tools.dir / "ak.pem").read_text()},
        reference={"boot_pcrs": {i: "00" * 32 for i in range(8)}},
    )

    result = Tpm2Verifier().verify(evidence, ctx)

    assert result.ok, result.failures
    assert dict(result.claims) == claims


def test_multi_bank_tpm2_quote_verifies_end_to_end(tools):
    """``tpm2_quote -l sha256:...+sha384:0,1``: the evidence carries both banks' values and
    verifies; without the SHA-384 values, or with one changed, the PCR digest check fails."""
    claims = {"ksm_enabled": False, "code_digest": "cd" * 32}
    log = EventLog.from_claims(claims)
    tools("tpm2_pcrreset", "23")
    for event in log.events:
        tools("tpm2_pcrextend", f"23:sha256={event.digest.hex()}")
    rd = expected_report_data(os.urandom(32), "s2", b"node-key")
    tools("tpm2_quote", "-c", "ak.ctx", "-l", f"{QUOTED}+sha384:0,1", "-q", rd.hex(),
          "-m", "msg", "-s", "sig", "-o", "pcrs", "-g", "sha256")
    msg, sig, pcr_file = ((tools.dir / n).read_bytes() for n in ("msg", "sig", "pcrs"))
    banks = parse_tpm2tools_pcrs(pcr_file)
    assert set(banks) == {ALG_SHA256, ALG_SHA384} and len(banks[ALG_SHA384][0]) == 48
    ctx = VerificationContext(
        expected_report_data=rd,
        node={"ak_public": (tools.dir / "ak.pem").read_text()},
        reference={"boot_pcrs": {i: "00" * 32 for i in range(8)}},
    )
    evidence = Tpm2Evidence(msg, sig, banks[ALG_SHA256], log.to_bytes(),
                            other_banks={ALG_SHA384: banks[ALG_SHA384]})
    wire = evidence.to_bytes()
    assert wire.startswith(b"CTTPM2\x00\x02")

    result = Tpm2Verifier().verify(wire, ctx)

    assert result.ok, result.failures
    assert dict(result.claims) == claims
    sha256_only = Tpm2Evidence(msg, sig, banks[ALG_SHA256], log.to_bytes()).to_bytes()
    assert "tpm2.pcr_digest" in {f.id for f in Tpm2Verifier().verify(sha256_only, ctx).failures}
    changed = dict(banks[ALG_SHA384])
    changed[1] = bytes(a ^ 0xFF for a in changed[1])
    forged = Tpm2Evidence(msg, sig, banks[ALG_SHA256], log.to_bytes(),
                          other_banks={ALG_SHA384: changed}).to_bytes()
    failed = Tpm2Verifier().verify(forged, ctx)
    assert "tpm2.pcr_digest" in {f.id for f in failed.failures} and not failed.claims


def test_tpm2_quote_refused_for_another_nonce(tools):
    msg, sig, pcr_file = tpm2_quote(tools, "ak.ctx", b"\x01" * 32)
    ak = load_pem_public_key((tools.dir / "ak.pem").read_bytes())
    result = check_quote(msg, sig, ak, expected_extra_data=b"\x02" * 32,  # type: ignore[arg-type]
                         pcr_values=parse_tpm2tools_pcrs(pcr_file))
    assert {f.id for f in result.failures} == {"tpm2.nonce"}


def test_tpm2_quote_with_rsa_ak_verifies(tools):
    tools("tpm2_createak", "-C", "ek.ctx", "-c", "rsa_ak.ctx", "-G", "rsa", "-g", "sha256", "-s",
          "rsassa", "-u", "rsa_ak.pem", "-f", "pem")
    tools("tpm2_flushcontext", "-s")
    msg, sig, pcr_file = tpm2_quote(tools, "rsa_ak.ctx", b"n" * 20)
    ak = load_pem_public_key((tools.dir / "rsa_ak.pem").read_bytes())

    result = check_quote(msg, sig, ak, expected_extra_data=b"n" * 20,  # type: ignore[arg-type]
                         pcr_values=parse_tpm2tools_pcrs(pcr_file))

    assert result.failures == ()
    tampered = bytearray(msg)
    tampered[clock_byte(msg)] ^= 1
    bad = check_quote(bytes(tampered), sig, ak, expected_extra_data=b"n" * 20,  # type: ignore[arg-type]
                      pcr_values=parse_tpm2tools_pcrs(pcr_file))
    assert {f.id for f in bad.failures} == {"tpm2.signature"}


def test_our_make_credential_is_activated_by_tpm2_activatecredential(tools):
    tools("tpm2_readpublic", "-c", "ek.ctx", "-o", "ek.tpm2b")
    tools("tpm2_readpublic", "-c", "ak.ctx", "-o", "ak.tpm2b")
    ek = parse_public((tools.dir / "ek.tpm2b").read_bytes())
    ak = parse_public((tools.dir / "ak.tpm2b").read_bytes())
    assert ak.name == (tools.dir / "ak.name").read_bytes()
    secret = os.urandom(32)
    made = make_credential(ek, ak.name, secret)
    blob = struct.pack(">II", 0xBADCC0DE, 1)
    blob += struct.pack(">H", len(made.credential_blob)) + made.credential_blob
    blob += struct.pack(">H", len(made.encrypted_secret)) + made.encrypted_secret
    (tools.dir / "cred.in").write_bytes(blob)
    tools("tpm2_startauthsession", "--policy-session", "-S", "session.ctx")
    tools("tpm2_policysecret", "-S", "session.ctx", "-c", "e")
    tools("tpm2_activatecredential", "-c", "ak.ctx", "-C", "ek.ctx", "-i", "cred.in",
          "-o", "secret.out", "-P", "session:session.ctx")
    tools("tpm2_flushcontext", "session.ctx")

    assert (tools.dir / "secret.out").read_bytes() == secret
