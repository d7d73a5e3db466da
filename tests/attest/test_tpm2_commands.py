"""The hand-marshalled TPM commands (attest.tpm2.commands) against a real swtpm, side by side
with what ESAPI does, and their handling of refused or broken responses."""

from __future__ import annotations

import struct

import pytest
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
from tpm2_pytss.types import (
    TPM2B_DATA,
    TPM2B_PUBLIC,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMT_HA,
    TPMT_SIG_SCHEME,
    TPMU_HA,
)

from attest.eventlog import APP_PCR, Event, EventLog
from attest.swtpm import Swtpm
from attest.tpm2 import commands
from attest.tpm2.marshal import parse_attest, parse_public, parse_signature
from attest.tpm2.node import _AK_ATTRIBUTES, QUOTED_PCRS, TpmError, TpmNode
from attest.tpm2.quote import pcr_digest


@pytest.fixture
def node(swtpm: Swtpm):
    with TpmNode(swtpm.tcti) as tpm:
        yield tpm


def _log(n: int = 20) -> EventLog:
    return EventLog.from_claims({f"claim.{i}": i for i in range(n)})


def _esapi_read(node: TpmNode, pcr: int) -> bytes:
    _, _, values = node._ectx.pcr_read(TPML_PCR_SELECTION.parse(f"sha256:{pcr}"))
    return bytes(values[0])


def test_measure_gives_the_pcr_the_log_replays_to_and_what_esapi_extends(node):
    log = _log()
    node.measure(log)
    raw = _esapi_read(node, APP_PCR)
    assert raw == log.replay()
    # the same events through ESAPI's own PCR_Reset and PCR_Extend
    handle = getattr(ESYS_TR, f"PCR{APP_PCR}")
    node._ectx.pcr_reset(handle)
    for event in log.events:
        ha = TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=event.digest))
        node._ectx.pcr_extend(handle, TPML_DIGEST_VALUES([ha]))
    assert _esapi_read(node, APP_PCR) == raw
    node.measure(EventLog((Event.claim("other", 1),)))  # the reset is part of measure
    assert _esapi_read(node, APP_PCR) != raw


def test_pcr_read_matches_esapi_across_the_eight_pcr_chunks(node):
    node.measure(_log(3))
    values = commands.pcr_read(node._ectx.tcti, QUOTED_PCRS)
    assert sorted(values) == sorted(QUOTED_PCRS)
    for pcr in QUOTED_PCRS:
        assert values[pcr] == _esapi_read(node, pcr)


def test_quote_is_what_esapi_quotes_over_the_same_pcrs(node):
    node.measure(_log(2))
    attest, signature = node.quote(b"n" * 32)
    parsed = parse_attest(attest)
    assert parsed.extra_data == b"n" * 32
    assert parsed.pcr_select.indices(0x000B) == QUOTED_PCRS
    banks = {0x000B: commands.pcr_read(node._ectx.tcti, QUOTED_PCRS)}
    sig = parse_signature(signature)
    assert pcr_digest(sig.hash_alg, parsed.pcr_select, banks) == parsed.pcr_digest
    # ESAPI's quote of the same PCRs signs the same digest with the same scheme
    selection = TPML_PCR_SELECTION.parse("sha256:" + ",".join(map(str, QUOTED_PCRS)))
    esapi_attest, esapi_sig = node._ectx.quote(
        node._ectx.tr_from_tpmpublic(node._load_ak()), selection, TPM2B_DATA(b"n" * 32),
        TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
    assert parse_attest(bytes(esapi_attest)).pcr_digest == parsed.pcr_digest
    assert esapi_sig.marshal()[:4] == signature[:4]  # ECDSA, SHA-256


def test_the_ak_is_the_one_esapi_creates_from_the_same_template(node):
    ak = node.ak_public()
    handle, public, *_ = node._ectx.create_primary(None, TPM2B_PUBLIC.parse(
        "ecc256:ecdsa-sha256:null", objectAttributes=_AK_ATTRIBUTES,
        nameAlg=TPM2_ALG.SHA256), ESYS_TR.ENDORSEMENT)
    node._ectx.flush_context(handle)
    assert public.publicArea.marshal() == ak  # primaries come from the seed: same key
    assert parse_public(ak).type == 0x0023  # TPM_ALG_ECC


def test_close_flushes_the_ak(swtpm: Swtpm):
    with TpmNode(swtpm.tcti) as tpm:
        handle = tpm._load_ak()
    with TpmNode(swtpm.tcti) as tpm, pytest.raises(TpmError, match="TPM2_Quote failed"):
        commands.quote(tpm._ectx.tcti, handle, b"n", QUOTED_PCRS)


def test_a_refused_command_is_a_tpm_error_naming_the_operation(node):
    tcti = node._ectx.tcti
    with pytest.raises(TpmError, match=r"TPM2_PCR_Reset of PCR 0 failed: .*locality"):
        commands.pcr_reset(tcti, 0)  # boot PCRs cannot be reset at locality 0
    with pytest.raises(TpmError, match=r"TPM2_Quote failed: .*handle"):
        commands.quote(tcti, 0x80FFFFFF, b"n", QUOTED_PCRS)  # no such key
    before = _esapi_read(node, 23)
    with pytest.raises(ValueError, match="32 bytes"):
        commands.pcr_extend(tcti, APP_PCR, b"short")
    assert _esapi_read(node, 23) == before  # nothing was sent
    # the connection is still good after a refusal
    node.measure(_log(1))
    assert _esapi_read(node, APP_PCR) == _log(1).replay()


class _Scripted:
    """A TCTI that answers with canned responses (for response handling only)."""

    def __init__(self, *responses: bytes) -> None:
        self.responses = list(responses)
        self.sent: list[bytes] = []

    def transmit(self, command: bytes) -> None:
        self.sent.append(command)

    def receive(self, size: int = 4096, timeout: int = -1) -> bytes:
        return self.responses.pop(0)


def _response(rc: int, tail: bytes = b"", tag: int = 0x8002) -> bytes:
    return struct.pack(">HII", tag, 10 + len(tail), rc) + tail


def test_retry_codes_resend_the_same_command_a_bounded_number_of_times():
    ok = _response(0, struct.pack(">I", 0) + b"\x00\x00\x01\x00\x00")
    tcti = _Scripted(_response(0x922), _response(0x908), ok)
    commands.pcr_reset(tcti, APP_PCR)
    assert len(tcti.sent) == 3 and len(set(tcti.sent)) == 1
    tcti = _Scripted(*[_response(0x922)] * commands.MAX_SUBMISSIONS)
    with pytest.raises(TpmError, match="TPM2_PCR_Reset of PCR 23 failed"):
        commands.pcr_reset(tcti, APP_PCR)
    assert len(tcti.sent) == commands.MAX_SUBMISSIONS


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (b"\x80\x02\x00", "3-byte response"),
        (struct.pack(">HII", 0x8002, 99, 0), "says 99 bytes, 10 came"),
        (_response(0), "no parameterSize"),
        (_response(0, struct.pack(">I", 50)), "runs past the response"),
    ],
)
def test_a_broken_response_is_a_tpm_error(response, message):
    with pytest.raises(TpmError, match=message):
        commands.pcr_reset(_Scripted(response), APP_PCR)


def test_a_pcr_read_response_that_does_not_match_is_a_tpm_error():
    # PCR 0 selected, but no value returned
    params = (struct.pack(">I", 1) + struct.pack(">IHB", 1, 0x000B, 3) + b"\x01\x00\x00"
              + struct.pack(">I", 0))
    with pytest.raises(TpmError, match="TPM2_PCR_Read failed: the values do not match"):
        commands.pcr_read(_Scripted(_response(0, params, tag=0x8001)), [0])
    with pytest.raises(TpmError, match=r"TPM2_PCR_Read failed: .*truncated"):
        commands.pcr_read(_Scripted(_response(0, params[:6], tag=0x8001)), [0])
