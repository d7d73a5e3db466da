"""Every ``kms-broker`` command line in README.md's "Using it" block parses (the issue's first
copy-paste failed on ``--tls``, ``--expires-in`` and a missing policy): a cheap guard beside
the live documentation test, no broker needed."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from kms_broker.cli import build_parser
from kms_broker.clientconfig import parse_address

README = Path(__file__).resolve().parents[2] / "README.md"


# what docs/walkthrough.md's shell sets these to (the live test, tests/docs, runs them there)
_WALKTHROUGH_VARIABLES = {
    "$BROKERS": "--broker 127.0.0.1:7001 --broker 127.0.0.1:7002",
    "$TENANT": "--tenant acme --ca pki/ca.pem --cert pki/issued/tenant-acme.pem "
               "--key pki/issued/tenant-acme.key",
    "$OPS": "--ca pki/ca.pem --cert pki/issued/operator-ops.pem "
            "--key pki/issued/operator-ops.key",
    "$REPO": ".",
}


def _documented() -> list[list[str]]:
    text = README.read_text().split("## Using it", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README 'Using it' has no bash block"
    commands, current = [], ""
    for raw in block.group(1).splitlines():
        line = raw.split("#", 1)[0].rstrip()
        current += " " + line.rstrip("\\").strip()
        if line.endswith("\\"):
            continue
        if current.strip().startswith("kms-broker") and " | " not in current:
            for name, value in _WALKTHROUGH_VARIABLES.items():
                current = current.replace(name, value)
            commands.append([w for w in shlex.split(current) if w != "..."])
        current = ""
    return commands


def test_readme_commands_parse() -> None:
    commands = _documented()
    names = {" ".join(c[1:3]) for c in commands}
    assert {"tenant init", "dataset upload", "policy put", "grant create",
            "grant revoke"} <= names, names
    for argv in commands:
        args = build_parser().parse_args(argv[1:])  # SystemExit (2) on an unknown flag
        for address in getattr(args, "broker", None) or ():
            parse_address(address.replace("HOST:PORT", "broker.example:7001"))
