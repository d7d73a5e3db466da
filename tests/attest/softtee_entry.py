"""TEST ONLY entry point: ``run_job`` with :class:`AttestedKeySource` whose evidence is
``composite`` evidence from the software TEE (tests/attest/softtee.py) made inside this
process over each broker's fresh challenge.

    python tests/attest/softtee_entry.py --job JOB.yaml --tdx DIR --gpu DIR [--gpu DIR]
        [--rtmr3 HEX] [--debug-td] [--out-of-date-tcb] [--gpu-cc-off] [--drop-gpu]
        [--foreign-gpu-nonce]

Everything else is the production path (one-time node keys, Challenge/Attest/Release over
mTLS to every broker, shares sealed in SoftHSM, DEK derived in memory, training, shredding);
the flags make the node misbehave in one way each.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tests.attest.softtee import (
    OUT_OF_DATE_TEE_TCB_SVN,
    UP_TO_DATE_TEE_TCB_SVN,
    SoftGpu,
    SoftTdx,
    composite_evidence,
)
from trainer.attested import AttestedKeySource
from trainer.cli import setup_logging
from trainer.config import JobConfig
from trainer.keysource import AttestationDenied, KeySourceUnavailable
from trainer.shred import EXIT_ATTESTATION_DENIED, EXIT_FAILURE, EXIT_OK
from trainer.train import run_job


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--job", required=True)
    p.add_argument("--tdx", required=True, type=Path)
    p.add_argument("--gpu", action="append", required=True, type=Path)
    p.add_argument("--rtmr3", default="00" * 48)
    p.add_argument("--debug-td", action="store_true")
    p.add_argument("--out-of-date-tcb", action="store_true")
    p.add_argument("--gpu-cc-off", action="store_true", help="the last GPU is not in CC mode")
    p.add_argument("--drop-gpu", action="store_true", help="send no report for the last GPU")
    p.add_argument("--foreign-gpu-nonce", action="store_true",
                   help="the last GPU's report answers another session's challenge")
    args = p.parse_args()
    setup_logging("INFO")
    config = JobConfig.from_yaml(args.job)
    tdx = SoftTdx.load(args.tdx)
    gpus = [SoftGpu.load(d) for d in args.gpu]
    if args.drop_gpu:
        gpus = gpus[:-1]
    modes = ["on"] * len(gpus)
    if args.gpu_cc_off:
        modes[-1] = "off"

    def evidence_for(binding: bytes) -> tuple[str, bytes]:
        nonces = [binding] * len(gpus)
        if args.foreign_gpu_nonce:
            nonces[-1] = os.urandom(32)
        return "composite", composite_evidence(
            tdx, gpus, binding, debug=args.debug_td, rtmr3=bytes.fromhex(args.rtmr3),
            tee_tcb_svn=OUT_OF_DATE_TEE_TCB_SVN if args.out_of_date_tcb
            else UP_TO_DATE_TEE_TCB_SVN, gpu_cc_modes=modes, gpu_nonces=nonces)

    source = AttestedKeySource(config, evidence_for=evidence_for)
    try:
        result = run_job(config, source, require_hardening=True)
    except AttestationDenied as exc:
        reasons = "".join(f"\n  - {r}" for r in exc.reasons)
        print(f"trainer: attestation denied: {exc}{reasons}", file=sys.stderr)
        return EXIT_ATTESTATION_DENIED
    except KeySourceUnavailable as exc:
        print(f"trainer: cannot obtain the dataset key: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"RESULT steps_done={result.steps_done}", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
