"""A real S3-compatible server for tests and benchmarks: moto's server mode as a subprocess.

``S3Server`` starts ``python -m moto.server`` on a reserved loopback port
(compose/ports.py), over HTTPS with a certificate from a test CA when ``tls=True``, writes
an AWS config file and a credentials file (mode 0600) naming the endpoint, the CA bundle
and random credentials, and creates a bucket. ``env`` is what a client process needs: only
the standard variables ``AWS_CONFIG_FILE``, ``AWS_SHARED_CREDENTIALS_FILE`` and
``AWS_PROFILE`` (no credential in the environment), and ``AWS_CA_BUNDLE`` with TLS (it
outranks the profile's ``ca_bundle``, and some machines set it to the system bundle).
``raw`` is a plain botocore client for what a test does behind the store's back (scan,
tamper, delete).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from compose.ports import free_port, release

START_WAIT_S = 120  # a hang guard on a busy machine, not a timing check
PROFILE = "ct-test"


class S3Server:
    def __init__(self, root: Path, *, tls: bool = False, bucket: str = "ct-data") -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.bucket = bucket
        self.tls = tls
        args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.ca_path: Path | None = None
        if tls:
            from tests.kms_broker.pki import DevPki

            pki = DevPki(root / "pki")
            cert, key = pki.issue("s3", "server", server=True)
            self.ca_path = pki.ca_path
            args += ["-c", str(cert), "-k", str(key)]
        self.endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._log = open(root / "moto.log", "ab")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.config_file = root / "aws-config"
        self.credentials_file = root / "aws-credentials"
        self._write_profile()
        try:
            self._wait_ready()
            self.raw = self.client()
            self.raw.create_bucket(Bucket=bucket)
        except BaseException:
            self.stop()
            raise

    def _write_profile(self) -> None:
        lines = [f"[profile {PROFILE}]", "region = us-east-1",
                 f"endpoint_url = {self.endpoint}"]
        if self.ca_path is not None:
            lines.append(f"ca_bundle = {self.ca_path}")
        self.config_file.write_text("\n".join(lines) + "\n")
        fd = os.open(self.credentials_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"[{PROFILE}]\naws_access_key_id = AKIA{secrets.token_hex(8).upper()}\n"
                    f"aws_secret_access_key = {secrets.token_urlsafe(30)}\n")

    @property
    def env(self) -> dict[str, str]:
        env = {"AWS_CONFIG_FILE": str(self.config_file),
               "AWS_SHARED_CREDENTIALS_FILE": str(self.credentials_file),
               "AWS_PROFILE": PROFILE}
        if self.ca_path is not None:
            # the variable outranks the profile's ca_bundle, and a machine may set it already
            env["AWS_CA_BUNDLE"] = str(self.ca_path)
        return env

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def client(self) -> Any:
        import botocore.session
        from botocore.config import Config

        session = botocore.session.Session()
        session.set_config_variable("config_file", str(self.config_file))
        session.set_config_variable("credentials_file", str(self.credentials_file))
        session.set_config_variable("profile", PROFILE)
        return session.create_client("s3", verify=str(self.ca_path) if self.ca_path else None,
                                     config=Config(s3={"addressing_style": "path"}))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_WAIT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited {self.proc.returncode}: "
                                   f"{(self.root / 'moto.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto server not listening after {START_WAIT_S} s") from None
                time.sleep(0.05)

    def store(self, prefix: str = "", **kwargs: Any):
        """An S3Store configured only from this server's profile files."""
        from sealed.s3store import S3Store

        return S3Store(self.bucket, prefix, client=self.client(), **kwargs)

    def objects(self) -> dict[str, bytes]:
        """Every object in the bucket, key -> body (behind the store's back)."""
        out = {}
        for page in self.raw.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for item in page.get("Contents", ()):
                out[item["Key"]] = self.raw.get_object(Bucket=self.bucket,
                                                       Key=item["Key"])["Body"].read()
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        release(self.port)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One plain-HTTP moto server on loopback for the session (tests use their own prefix)."""
    server = S3Server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One moto server over HTTPS (a certificate from a test CA) for the session."""
    server = S3Server(tmp_path_factory.mktemp("s3tls"), tls=True)
    yield server
    server.stop()
