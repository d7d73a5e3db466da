"""The code identity guard in a measured environment, without brokers (the real-path cases
are tests/compose/test_code_identity.py): what it refuses, that refused code never runs, and
that the digest it attests is the one `attest code-digest` computes offline."""

from __future__ import annotations

import hashlib
import importlib.util
import marshal
import subprocess
import sys
from pathlib import Path

import pytest

from compose.image import build_image_environment
from tests.trainer.conftest import REPO, attest_env

GUARDED = """
import sys, json
from trainer import guard
guard.install()
{body}
"""


def python(env: Path, code: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(env / "bin" / "python"), "-I", "-B", "-c", code], cwd="/",
                          env=attest_env(**extra), capture_output=True, text=True)


@pytest.fixture
def fresh_env(tmp_path: Path) -> Path:
    return build_image_environment(tmp_path / "env")


def _site(env: Path) -> Path:
    (site,) = (env / "lib").glob("python3*/site-packages")
    return site


def test_the_attested_digest_is_the_offline_digest(measured_env: Path):
    out = python(measured_env, GUARDED.format(body="print(guard.code_claims()['code_digest'])"))
    assert out.returncode == 0, out.stderr
    offline = subprocess.run([sys.executable, "-m", "attest.cli", "code-digest",
                              str(measured_env)], capture_output=True, text=True, cwd=REPO)
    manifest = (measured_env / "ct-code-manifest").read_bytes()
    assert out.stdout.strip() == offline.stdout.strip() == hashlib.sha256(manifest).hexdigest()


@pytest.mark.parametrize(("name", "value"), [
    ("LD_AUDIT", "/nonexistent"), ("LD_LIBRARY_PATH", "/nonexistent"),
    ("PYTHONHOME", sys.base_prefix), ("GCONV_PATH", "/nonexistent"),
])
def test_loader_and_interpreter_variables_are_refused_by_name(measured_env: Path, name: str,
                                                              value: str):
    out = subprocess.run([str(measured_env / "bin" / "trainer"), "--attest", "--job", "/none"],
                         env=attest_env(**{name: value}), capture_output=True,
                         text=True, cwd="/")
    assert out.returncode == 5, out.stderr
    assert f"code identity refused: environment variable {name} is set" in out.stderr


def test_the_console_script_reexecutes_isolated_and_reaches_the_cli(measured_env: Path):
    out = subprocess.run([str(measured_env / "bin" / "trainer"), "--attest", "--job",
                          "/nonexistent.yaml"], env=attest_env(), capture_output=True,
                         text=True, cwd="/")
    assert out.returncode == 2, out.stderr  # past the guard: the job file is missing
    assert "invalid job file" in out.stderr


def test_an_environment_without_a_manifest_is_refused(fresh_env: Path):
    (fresh_env / "ct-code-manifest").unlink()
    out = python(fresh_env, GUARDED.format(body=""))
    assert out.returncode != 0
    assert "no code manifest at" in out.stderr and "attest code-digest --write" in out.stderr


def test_replaced_bytecode_never_runs_and_the_refusal_sticks(fresh_env: Path, tmp_path: Path):
    source = _site(fresh_env) / "trainer" / "job_identity.py"
    pyc = Path(importlib.util.cache_from_source(str(source)))
    ran = tmp_path / "ran"
    evil = compile(f"open({str(ran)!r}, 'w').close()\n", str(source), "exec")
    pyc.write_bytes(pyc.read_bytes()[:16] + marshal.dumps(evil))
    body = """
try:
    import trainer.job_identity  # a library that swallows the refusal
except Exception as exc:
    print("swallowed:", exc)
try:
    guard.code_claims()
except guard.CodeIdentityRefused as exc:
    print("claims refused:", exc)
"""
    out = python(fresh_env, GUARDED.format(body=body))
    assert out.returncode == 0, out.stderr
    assert f"swallowed: bytecode of trainer.job_identity: {pyc} differs" in out.stdout
    assert "claims refused: bytecode of trainer.job_identity" in out.stdout
    assert not ran.exists()


def test_an_unmeasured_module_is_refused_before_it_runs(fresh_env: Path, tmp_path: Path):
    ran = tmp_path / "ran"
    planted = _site(fresh_env) / "planted.py"
    planted.write_text(f"open({str(ran)!r}, 'w').close()\n")
    out = python(fresh_env, GUARDED.format(body="import planted"))
    assert out.returncode != 0
    assert f"module planted: {planted} is not in the measured code set" in out.stderr
    assert not ran.exists()


def test_an_added_pth_file_is_refused_at_install(fresh_env: Path):
    pth = _site(fresh_env) / "added.pth"
    pth.write_text("# nothing but a comment\n")
    out = python(fresh_env, GUARDED.format(body=""))
    assert out.returncode != 0
    assert f".pth file {pth} is not in the measured code set" in out.stderr


def test_without_isolation_install_refuses(measured_env: Path):
    out = subprocess.run([str(measured_env / "bin" / "python"), "-c",
                          "from trainer import guard; guard.install()"],
                         env=attest_env(), capture_output=True, text=True, cwd="/")
    assert out.returncode != 0
    assert "the interpreter is not isolated" in out.stderr


def test_a_measured_module_without_bytecode_is_compiled_from_its_checked_source(
    fresh_env: Path
):
    from attest.code_digest import MANIFEST_NAME, environment_manifest

    source = _site(fresh_env) / "trainer" / "job_identity.py"
    pyc = Path(importlib.util.cache_from_source(str(source)))
    pyc.unlink()
    (fresh_env / MANIFEST_NAME).write_bytes(environment_manifest(str(fresh_env)))
    out = python(fresh_env, GUARDED.format(
        body="import trainer.job_identity as j; print(j.DOMAIN); guard.code_claims()"))
    assert out.returncode == 0, out.stderr
    assert "ct-job-identity/v1" in out.stdout
    assert not pyc.exists()  # nothing written
