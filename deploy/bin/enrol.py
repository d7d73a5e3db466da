"""Operator one-shot (service ``enrol``): enrol every node's TPM at every broker.

For each ``--node ID=TCTI`` it runs ``kms-broker node enrol ID --tcti TCTI --tenant-scope T``
with the operator certificate against every broker: the command reads the EK certificate, EK
and AK from that TPM, each broker checks the EK certificate against its manufacturer CAs
(``ek_roots`` in broker.yaml, the swtpm EK CA that bootstrap.py made) and challenges the TPM
with MakeCredential; the TPM answers with ActivateCredential, which binds the AK to the EK.
Container paths are ``--root`` + the path, as in bootstrap.py.
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

    home = Path(f"{args.root.rstrip('/')}/var/lib/operator")
    tls = ["--ca", str(home / "ca.pem"), "--cert", str(home / f"operator-{args.operator}.pem"),
           "--key", str(home / f"operator-{args.operator}.key")]
    brokers = [arg for b in args.broker for arg in ("--broker", b)]
    for item in args.node:
        node, sep, tcti = item.partition("=")
        if not sep or not node or not tcti:
            parser.error(f"--node takes ID=TCTI, got {item!r}")
        result = subprocess.run(
            ["kms-broker", "node", "enrol", node, "--tcti", tcti, "--tenant-scope", args.tenant,
             *brokers, *tls],
            capture_output=True, text=True, check=False)
        if result.returncode != 0:
            print(f"enrol: {node}: {result.stderr.strip()}", file=sys.stderr)
            return 1
        for line in result.stdout.strip().splitlines():
            print(f"enrol: {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
