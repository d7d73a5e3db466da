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
    "signature-value-not-ascii",   # base64's ValueError on non-ASCII text (1M campaign)
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


# --- YAML documents: found by the 1M/30-min campaign (session 5) ----------------------------
# PyYAML turns a plain scalar of digits into int(), which raises a bare ValueError past
# Python's 4300-digit limit; keys of mixed types (true:, '0':) broke sorting unknown keys.

def test_policy_with_unknown_keys_of_mixed_types_is_a_policy_error() -> None:
    from attest.policy import Policy, PolicyError

    text = _input("policy_yaml", "unknown-keys-of-mixed-types").decode()
    with pytest.raises(PolicyError, match=r"unknown field\(s\) \['0', 'True'\]"):
        Policy.from_yaml(text)


def test_job_file_with_an_integer_past_4300_digits_is_a_config_error(tmp_path: Path) -> None:
    from trainer.config import ConfigError, JobConfig

    path = tmp_path / "job.yaml"
    path.write_bytes(_input("job_yaml", "integer-past-4300-digits"))
    with pytest.raises(ConfigError, match=r"not valid YAML.*4300"):
        JobConfig.from_yaml(path)


_HUGE = "9" * 5000


def test_every_yaml_loader_refuses_an_integer_past_4300_digits_by_its_own_error(
        tmp_path: Path) -> None:
    """The same input through the other YAML loaders (not yet fuzzed to this depth): each
    answers with its own error type, naming the file, never a bare ValueError."""
    from attest.policy import Policy, PolicyError
    from compose.errors import ComposeFileError
    from compose.spec import load_project
    from kms_broker.clientconfig import ClientConfigError, _load_profile
    from kms_broker.config import ConfigError as BrokerConfigError
    from kms_broker.config import load_config

    with pytest.raises(PolicyError, match="not valid YAML"):
        Policy.from_yaml(f"name: p\nversion: {_HUGE}\nrules: []\n")
    broker = tmp_path / "broker.yaml"
    broker.write_text(f"broker_id: {_HUGE}\n")
    with pytest.raises(BrokerConfigError, match="not valid YAML"):
        load_config(broker)
    compose = tmp_path / "docker-compose.yml"
    compose.write_text(f"services:\n  a:\n    image: {_HUGE}\n")
    with pytest.raises(ComposeFileError, match="invalid YAML"):
        load_project(compose, variables={})
    profile = tmp_path / "profiles.yaml"
    profile.write_text(f"default:\n  timeout: {_HUGE}\n")
    with pytest.raises(ClientConfigError, match=r"profiles\.yaml"):
        _load_profile(profile, "default", True)


def test_broker_config_with_unknown_keys_of_mixed_types_is_a_config_error(
        tmp_path: Path) -> None:
    from kms_broker.config import ConfigError, load_config

    path = tmp_path / "broker.yaml"
    path.write_text("true: 1\n'0': 2\n")
    with pytest.raises(ConfigError, match=r"unknown config keys: \['0', 'True'\]"):
        load_config(path)
