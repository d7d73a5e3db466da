"""``kms-broker dataset upload --store`` with unusable S3 addresses: one clear line, exit 1,
before any broker is contacted (the upload itself is in tests/trainer/test_s3_training.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.kms_broker.conftest import REPO


@pytest.mark.parametrize("store,message", [
    ("s3://UPPER/x", "invalid bucket name"),
    ("s3://bucket/../x", "invalid s3 prefix"),
    ("ftp://host/x", "unsupported store address"),
])
def test_bad_store_addresses_fail_with_one_line(tmp_path, store: str, message: str) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_bytes(b"x")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.run(
        [sys.executable, "-m", "kms_broker.cli", "dataset", "upload", str(tmp_path / "data"),
         "--store", store, "--dataset", "ds1", "--tenant", "acme", "--broker", "127.0.0.1:1",
         "--ca", str(tmp_path / "ca.pem"), "--cert", str(tmp_path / "c.pem"),
         "--key", str(tmp_path / "c.key"), "--tenant-key", str(tmp_path / "t.key")],
        cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 1, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_plain_http_endpoint_off_this_machine_is_refused(tmp_path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_bytes(b"x")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL="http://192.0.2.1:9000", AWS_ACCESS_KEY_ID="AKIAX",
               AWS_SECRET_ACCESS_KEY="x", AWS_REGION="us-east-1")
    proc = subprocess.run(
        [sys.executable, "-m", "kms_broker.cli", "dataset", "upload", str(tmp_path / "data"),
         "--store", "s3://bucket/x", "--dataset", "ds1", "--tenant", "acme",
         "--broker", "127.0.0.1:1", "--ca", str(tmp_path / "ca.pem"),
         "--cert", str(tmp_path / "c.pem"), "--key", str(tmp_path / "c.key"),
         "--tenant-key", str(tmp_path / "t.key")],
        cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and "must be https://" in proc.stderr, proc.stderr
