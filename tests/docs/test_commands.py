"""The documented commands work: every ``bash`` block of docs/walkthrough.md and of README's
"Using it", in order, in one shell, against the deployment the walkthrough builds (two
``kms-broker serve`` on SoftHSM2 tokens, a swtpm node enrolled by ``kms-broker node enrol``,
``trainer --attest`` from a measured environment, a revocation that ends a running job).

The same run is then scanned: no secret (HSM PINs, the tenant's signing key, TLS private
keys, plaintext of the corpus) in any log line or printed output, every broker log line is
structured JSON, and the trainer logged its attestation and release per broker.

Ports come from compose/ports.py (reserved, so parallel tests do not collide); the blocks
read them from the variables the walkthrough's first block defaults.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from compose.ports import free_port_pairs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
WALKTHROUGH = REPO / "docs" / "walkthrough.md"
README = REPO / "README.md"
FENCE = re.compile(r"^```bash\n(.*?)^```$", re.S | re.M)
CANARIES = [  # one sentence of each sample corpus file (tests/compose/test_deployment.py)
    b"The lighthouse keeper wrote the weather in a small book",
    b"In the spring the orchard was white with blossom",
    b"Every tool in the workshop had its outline painted",
]


def bash_blocks(text: str) -> list[str]:
    return [m.group(1) for m in FENCE.finditer(text)]


def readme_using_it() -> str:
    text = README.read_text()
    start = text.index("## Using it")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_the_documents_have_command_blocks() -> None:
    assert len(bash_blocks(WALKTHROUGH.read_text())) >= 10
    assert len(bash_blocks(readme_using_it())) >= 3
    # the README section names no placeholder a reader would have to fill in
    for block in bash_blocks(readme_using_it()):
        assert "..." not in block and "HOST:PORT" not in block, block


@dataclass
class Session:
    home: Path
    returncode: int
    output: str
    blocks: list[tuple[str, str]]

    def failed_block(self) -> str:
        markers = re.findall(r"^::block (\S+)::$", self.output, re.M)
        if not markers:
            return "(before the first block)"
        name = markers[-1]
        text = dict(self.blocks)[name]
        return f"{name}:\n{text}"


def _environment(home: Path) -> dict[str, str]:
    from trainer.guard import refused_variables

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRAINER_", "KMS_BROKER_")) and k != "SOFTHSM2_CONF"}
    for name in refused_variables(env):  # `trainer --attest` refuses PYTHONPATH, LD_*, ...
        del env[name]
    provider, tenant, tpm = free_port_pairs(3)
    env.update({
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        "REPO": str(REPO), "CT_HOME": str(home),
        "PROVIDER": f"127.0.0.1:{provider}", "TENANT_BROKER": f"127.0.0.1:{tenant}",
        "TPM_PORT": str(tpm), "KMS_BROKER_PROGRESS": "plain",
    })
    return env


def _stop_everything(home: Path) -> None:
    for pid_file in [*home.glob("*/broker.pid"), home / "tpm-a.pid"]:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    base = tmp_path_factory.mktemp("docs")
    home = base / "ct"
    walkthrough = bash_blocks(WALKTHROUGH.read_text())
    blocks = [(f"walkthrough.md:{i}", b) for i, b in enumerate(walkthrough, 1)]
    blocks += [(f"README.md:{i}", b) for i, b in enumerate(bash_blocks(readme_using_it()), 1)]
    script = ["set -euo pipefail"]
    for name, text in blocks:
        script += [f"echo '::block {name}::'", text]
    script += ["echo '::all blocks ran::'"]
    (base / "session.sh").write_text("\n".join(script) + "\n")
    out = base / "session.out"
    try:
        with out.open("wb") as sink:
            proc = subprocess.run(["bash", str(base / "session.sh")], cwd=base,
                                  env=_environment(home), stdout=sink,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  check=False)
        yield Session(home, proc.returncode, out.read_text(errors="replace"), blocks)
    finally:
        _stop_everything(home)


@pytest.mark.timeout(3600)  # the whole deployment and two training runs on a busy machine
def test_every_documented_command_runs(session: Session) -> None:
    assert session.returncode == 0 and "::all blocks ran::" in session.output, (
        f"exit {session.returncode} in block {session.failed_block()}\n--- output tail:\n"
        f"{session.output[-6000:]}")


def test_the_walkthrough_trained_and_the_revocation_ended_the_job(session: Session) -> None:
    assert session.returncode == 0
    trained = (session.home / "train-1.log").read_text()
    assert "shred report (normal exit)" in trained and "done: 10 steps" in trained
    revoked = (session.home / "train-2.log").read_text()
    assert "trainer exited with status 3" in session.output
    assert "key revoked" in revoked and "shred report (revoked" in revoked


def test_trainer_logs_attestation_per_broker(session: Session) -> None:
    assert session.returncode == 0
    log = (session.home / "train-1.log").read_text()
    for variable in ("PROVIDER", "TENANT_BROKER"):
        address = _environment_value(session, variable)
        lines = [ln for ln in log.splitlines()
                 if "attested to broker" in ln and address in ln]
        assert len(lines) == 1, (variable, log[-3000:])
    assert re.search(r"INFO trainer\.shred: shred report \(normal exit\)", log), log[-2000:]


def test_broker_logs_are_structured_lines(session: Session) -> None:
    assert session.returncode == 0
    for broker in ("provider", "tenant"):
        lines = (session.home / broker / "broker.log").read_text().splitlines()
        records = [json.loads(ln) for ln in lines if ln.startswith("{")]
        plain = [ln for ln in lines if ln and not ln.startswith("{")]
        assert len(plain) == 1 and "listening on" in plain[0], plain
        requests = [r for r in records if r["logger"] == "kms_broker.request"]
        # the trainer's key client releases inside its Attest calls (AttestRequest.release)
        released = [r for r in requests if r["method"].endswith("/Attest")
                    and r["identity"] == "node:node-a" and r["decision"] == "allowed"]
        assert len(released) >= 2, requests[-5:]  # job-1 and job-2
        revokes = [r for r in requests if r["method"].endswith("/RevokeGrant")]
        assert revokes and revokes[0]["identity"] == "tenant:acme"
        assert all(isinstance(r["latency_ms"], float) for r in requests)


def test_no_secret_in_any_log_line_of_the_run(session: Session) -> None:
    """Everything the run printed or logged: the session's output, both brokers' logs and
    both trainers' logs, against every secret of the deployment the test can read."""
    home = session.home
    logs = {"session output": session.output}
    for path in [*home.glob("*/broker.log"), *home.glob("train-*.log"),
                 *home.glob("tpm-a/*.log")]:
        logs[str(path.relative_to(home))] = path.read_text(errors="replace")
    secrets: dict[str, bytes] = {}
    for broker in ("provider", "tenant"):
        secrets[f"{broker} HSM PIN"] = (home / broker / "hsm" / "user.pin").read_bytes().strip()
    secrets["tenant signing key"] = (home / "tenant.key").read_bytes()
    for key in (home / "pki").rglob("*.key"):
        secrets[f"TLS key {key.name}"] = key.read_bytes()
    for i, canary in enumerate(CANARIES):
        secrets[f"corpus plaintext {i}"] = canary
    assert len(logs) >= 5
    for name, value in secrets.items():
        forms = _forms(value)
        for where, text in logs.items():
            for form in forms:
                assert form not in text, f"{name} appears in {where}"


def _forms(value: bytes) -> set[str]:
    """The value as it could show up in text: itself, hex, base64, and each PEM body line."""
    forms = {value.hex(), base64.b64encode(value).decode()}
    text = value.decode("ascii", errors="ignore")
    if "-----BEGIN" in text:
        forms |= {ln for ln in text.splitlines() if ln and not ln.startswith("-----")}
    elif text.isprintable():
        forms.add(text)
    return {f for f in forms if len(f) >= 12}


def _environment_value(session: Session, name: str) -> str:
    found = re.search(rf"^{name}=(\S+)$", session.output, re.M)
    if found:
        return found.group(1)
    text = (session.home / "provider" / "broker.yaml").read_text() if name == "PROVIDER" \
        else (session.home / "tenant" / "broker.yaml").read_text()
    return re.search(r"^listen: (\S+)$", text, re.M).group(1)
