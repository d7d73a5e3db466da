"""TEST ONLY entry point: ``run_job`` with :class:`AttestedKeySource` against a real broker,
using the broker tests' ``test-json`` evidence kind in place of a TPM quote.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        tests/trainer/attested_entry.py --job JOB.yaml [--ksm-on]

Everything else is the production path: one-time node keys, Challenge/Attest/Release over
mTLS, shares sealed inside SoftHSM, DEK derived in memory, lease renewal, revocation push.
"""

from __future__ import annotations

import argparse
import sys

from trainer import signals

signals.start()  # as the real entry point does, before torch and gRPC start threads

from tests.kms_broker.verifiers import make_evidence  # noqa: E402
from trainer.attested import AttestedKeySource  # noqa: E402
from trainer.cli import denial_lines, setup_logging  # noqa: E402
from trainer.config import JobConfig  # noqa: E402
from trainer.dataset_check import EXIT_DATASET, DatasetMissing  # noqa: E402
from trainer.keysource import AttestationDenied, KeySourceUnavailable  # noqa: E402
from trainer.shred import EXIT_ATTESTATION_DENIED, EXIT_FAILURE, EXIT_OK  # noqa: E402
from trainer.train import run_job  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--job", required=True)
    p.add_argument("--ksm-on", action="store_true", help="claim KSM is on (policy denies)")
    args = p.parse_args()
    setup_logging("INFO")
    config = JobConfig.from_yaml(args.job)
    claims = {"node.ksm.enabled": args.ksm_on, "node.swap.enabled": False}
    source = AttestedKeySource(config, evidence_for=lambda rd: make_evidence(rd, claims))
    try:
        result = run_job(config, source, require_hardening=True)
    except AttestationDenied as exc:
        print("\n".join(denial_lines(exc, exc.reasons)), file=sys.stderr)
        return EXIT_ATTESTATION_DENIED
    except KeySourceUnavailable as exc:
        print(f"trainer: cannot obtain the dataset key: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except DatasetMissing as exc:
        print(f"trainer: dataset not found, no key requested: {exc}", file=sys.stderr)
        return EXIT_DATASET
    if result.rank == 0:
        print(f"RESULT steps_done={result.steps_done} start_step={result.start_step}", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
