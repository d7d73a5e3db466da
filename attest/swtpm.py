"""swtpm harness: one software TPM per node, with its own state directory and EK certificate.

Used by the tests and by the embedded default deployment. :class:`LocalEkCa` is a private
"manufacturer" CA (``swtpm_localca`` creates a root CA and an issuing CA on first use, in a
directory of ours, never the system's /var/lib/swtpm-localca); :func:`manufacture` runs
``swtpm_setup`` to create the TPM state with an RSA-2048 EK whose certificate that CA signs,
stored in NV 0x01C00002 like a real TPM's; :class:`Swtpm` runs ``swtpm socket --tpm2`` on
127.0.0.1 (command port P, control port P+1, the layout the swtpm TCTI expects) and stops it
with terminate + wait, so no process is left behind::

    ca = LocalEkCa.create(tmp / "ca")
    manufacture(tmp / "node1", ca)
    with Swtpm(tmp / "node1") as tpm:
        TpmNode(tpm.tcti) ...
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from compose.ports import free_port_pairs, release

__all__ = ["LocalEkCa", "Swtpm", "SwtpmError", "manufacture"]

_START_DEADLINE_S = 10.0


class SwtpmError(RuntimeError):
    """swtpm or swtpm_setup failed; the message carries its stderr tail."""


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise SwtpmError(f"{tool} not found; install the swtpm and swtpm-tools packages")
    return path


@dataclass(frozen=True, slots=True)
class LocalEkCa:
    """A test EK manufacturer CA in ``directory`` (created by swtpm_localca on first use)."""

    directory: Path

    @classmethod
    def create(cls, directory: Path) -> LocalEkCa:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        (directory / "localca.conf").write_text(
            f"statedir = {directory}\n"
            f"signingkey = {directory}/signkey.pem\n"
            f"issuercert = {directory}/issuercert.pem\n"
            f"certserial = {directory}/certserial\n"
        )
        (directory / "localca.options").write_text(
            "--platform-manufacturer confidential-training\n"
            "--platform-version 2.1\n"
            "--platform-model swtpm\n"
        )
        (directory / "swtpm_setup.conf").write_text(
            f"create_certs_tool = {_require('swtpm_localca')}\n"
            f"create_certs_tool_config = {directory}/localca.conf\n"
            f"create_certs_tool_options = {directory}/localca.options\n"
            "active_pcr_banks = sha256\n"
        )
        return cls(directory)

    @property
    def setup_config(self) -> Path:
        return self.directory / "swtpm_setup.conf"

    @property
    def root_cert_pem(self) -> bytes:
        """The root CA certificate (exists after the first :func:`manufacture`)."""
        return (self.directory / "swtpm-localca-rootca-cert.pem").read_bytes()

    @property
    def issuer_cert_pem(self) -> bytes:
        """The issuing (intermediate) CA certificate that signs EK certificates."""
        return (self.directory / "issuercert.pem").read_bytes()


def manufacture(state_dir: Path, ca: LocalEkCa, *, pcr_banks: str = "sha256") -> Path:
    """Create a fresh TPM state in ``state_dir`` with an RSA-2048 EK certified by ``ca`` and
    the PCR banks ``pcr_banks`` active (comma-separated, e.g. "sha256,sha384")."""
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    proc = subprocess.run(
        [
            _require("swtpm_setup"),
            "--tpm2",
            "--tpmstate",
            str(state_dir),
            "--create-ek-cert",
            "--config",
            str(ca.setup_config),
            "--overwrite",
            "--pcr-banks",
            pcr_banks,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SwtpmError(f"swtpm_setup failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return state_dir


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


class Swtpm:
    """A running ``swtpm socket --tpm2`` over a state directory; a context manager."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> Swtpm:
        if self._proc is not None:
            raise SwtpmError("swtpm already started")
        binary = _require("swtpm")
        last_error = ""
        for _ in range(5):
            # a reserved pair outside the kernel's ephemeral range (compose/ports.py): no
            # other process on the machine is handed it while this one holds it
            port = free_port_pairs(1)[0]
            log = self.state_dir / "swtpm.log"
            proc = subprocess.Popen(
                [
                    binary,
                    "socket",
                    "--tpm2",
                    "--tpmstate",
                    f"dir={self.state_dir}",
                    "--server",
                    f"type=tcp,port={port},bindaddr=127.0.0.1",
                    "--ctrl",
                    f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                    "--flags",
                    "not-need-init,startup-clear",
                    "--log",
                    f"file={log},level=0",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            if self._wait_listening(proc, port):
                self._proc = proc
                self.port = port
                return self
            last_error = self._reap(proc)
            release(port)
            release(port + 1)
        raise SwtpmError(f"swtpm did not start: {last_error[-2000:]}")

    @staticmethod
    def _wait_listening(proc: subprocess.Popen[bytes], port: int) -> bool:
        deadline = time.monotonic() + _START_DEADLINE_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            if all(_accepts(port + i) for i in (1, 0)):
                return True
            time.sleep(0.02)
        return False

    @staticmethod
    def _reap(proc: subprocess.Popen[bytes]) -> str:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        return err

    def stop(self) -> None:
        """Terminate and wait; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._reap(proc)
            release(self.port)
            release(self.port + 1)

    def __enter__(self) -> Swtpm:
        return self.start() if self._proc is None else self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
