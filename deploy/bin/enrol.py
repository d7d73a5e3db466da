"""Operator one-shot (service ``enrol``): enrol every node's TPM at every broker.

For each ``--node ID=TCTI``: read the attestation key's public area and the EK certificate
from the node's TPM (``attest.tpm2.node.TpmNode``), keep them under
``/var/lib/operator/<id>.ak`` and ``.ek.der``, and run ``kms-broker node enrol`` with the
operator certificate at every broker, scoped to the tenant. Container paths are ``--root`` +
the path, as in bootstrap.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", default="", help="prefix of every container path (CT_ROOT)")
    parser.add_argument("--node", action="append", required=True, metavar="ID=TCTI")
    parser.add_argument("--broker", action="append", required=True, metavar="HOST:PORT")
    parser.add_argument("--tenant", default="acme", help="tenant the nodes are enrolled for")
    parser.add_argument("--operator", default="ops", help="operator id (certificate)")
    args = parser.parse_args(argv)

    from attest.tpm2.node import TpmNode

    home = Path(f"{args.root.rstrip('/')}/var/lib/operator")
    tls = ["--ca", str(home / "ca.pem"), "--cert", str(home / f"operator-{args.operator}.pem"),
           "--key", str(home / f"operator-{args.operator}.key")]
    for item in args.node:
        node, sep, tcti = item.partition("=")
        if not sep:
            parser.error(f"--node takes ID=TCTI, got {item!r}")
        with TpmNode(tcti) as tpm:
            ak, ek_cert = tpm.ak_public(), tpm.ek_certificate()
        (home / f"{node}.ak").write_bytes(ak)
        (home / f"{node}.ek.der").write_bytes(ek_cert)
        argv_enrol = ["kms-broker", "node", "enrol", node, "--ak", str(home / f"{node}.ak"),
                      "--ek-cert", str(home / f"{node}.ek.der"), "--tenant-scope", args.tenant,
                      *tls]
        for broker in args.broker:
            argv_enrol += ["--broker", broker]
        result = subprocess.run(argv_enrol, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            print(f"enrol: {node}: {result.stderr.strip()}", file=sys.stderr)
            return 1
        print(f"enrol: {result.stdout.strip()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
