"""What the fuzzers found, one test per finding, each on the input file that showed it
(tests/fuzz/regressions/HARNESS/NAME.bin). Each failed before its fix."""

from __future__ import annotations

from pathlib import Path

import pytest

REGRESSIONS = Path(__file__).resolve().parent / "regressions"


def _input(harness: str, name: str) -> bytes:
    return (REGRESSIONS / harness / f"{name}.bin").read_bytes()


# --- attest/tdx/collateral.py: untrusted PCS JSON met int()/str()/iteration unchecked ------

@pytest.mark.parametrize("name", [
    "tcblevels-not-a-list",        # found by the fuzzer: TypeError iterating a bool
    "version-is-a-list",           # int([3]): TypeError (the known bare int() finding)
    "evaluation-number-infinite",  # int(1e400 -> inf): OverflowError
    "isvprodid-is-a-string",       # int("2") took a string where PCS has a number
    "integer-too-long",            # json's int() past 4300 digits: a bare ValueError
])
def test_malformed_collateral_is_a_collateral_error(name: str) -> None:
    from attest.tdx.collateral import CollateralError, EnclaveIdentity, TcbInfo

    data = _input("tdx_collateral", name)
    parse = EnclaveIdentity.parse if data[0] & 1 else TcbInfo.parse
    with pytest.raises(CollateralError):
        parse(data[1:])


# --- attest/nvidia/rim.py: signxml's schema validation raised lxml's DocumentInvalid --------

@pytest.mark.parametrize("name", [
    "signature-value-not-base64",  # lxml DocumentInvalid from signxml's schema check
    "c14n-fails",                  # lxml C14NError from signxml's canonicalisation
])
def test_rim_whose_signature_xml_breaks_signxml_is_a_rim_error(name: str) -> None:
    from attest.nvidia import NvidiaTrustStore, load_rim
    from attest.nvidia.rim import RimError
    from fuzz.harnesses.tee import RIM_DAY

    data = _input("nvidia_rim", name)
    with pytest.raises(RimError, match="signature structure"):
        load_rim(data, NvidiaTrustStore.bundled().rim_roots, RIM_DAY)


# --- kms_broker/tokens.py: a signed payload whose exp is not a number -----------------------

def test_token_payload_with_a_string_expiry_is_an_invalid_token() -> None:
    """Behind the broker's signature, so only a holder of its key could send it; the verifier
    must still answer with its one error, not a TypeError from comparing ``exp``."""
    from fuzz.harnesses.tokens import _token
    from kms_broker.tokens import InvalidToken

    data = _input("token", "signed-exp-is-a-string")
    assert data[0] % 2 == 1  # the harness signs the payload with the verifier's key
    with pytest.raises(InvalidToken, match="malformed"):
        _token(data)


# --- compose/spec.py: a compose file that is not UTF-8 --------------------------------------

def test_compose_file_that_is_not_utf8_is_a_compose_file_error(tmp_path: Path) -> None:
    from compose.errors import ComposeFileError
    from compose.spec import load_project

    path = tmp_path / "docker-compose.yml"
    path.write_bytes(_input("compose_spec", "not-utf8"))
    with pytest.raises(ComposeFileError, match="not UTF-8"):
        load_project(path, variables={})


@pytest.mark.parametrize("name", [
    "signer-key-invalid",                   # ValueError("Invalid key") out of signxml
    "signer-key-unknown-algorithm",         # UnsupportedAlgorithm (a DSA OID) out of signxml
    "certificate-extensions-undecodable",   # ValueError out of the chain check's extensions
    "certificate-duplicate-extension",      # x509.DuplicateExtension, found after that fix
])
def test_rim_with_an_undecodable_certificate_is_a_rim_error(name: str) -> None:
    """A RIM's KeyInfo certificate whose lazily decoded parts are broken: the RIM cannot be
    read (RimError), as a certificate that is not DER at all, not an exception from the
    middle of verification."""
    from attest.nvidia import NvidiaTrustStore, load_rim
    from attest.nvidia.rim import RimError
    from fuzz.harnesses.tee import RIM_DAY

    with pytest.raises(RimError, match="not valid DER"):
        load_rim(_input("nvidia_rim", name), NvidiaTrustStore.bundled().rim_roots, RIM_DAY)
