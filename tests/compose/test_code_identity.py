"""Issue 10 items 1 and 2 through docker-compose.yml: only measured code runs in the process
that receives the key, and the job is measured too.

One deployment serves the module (two brokers on SoftHSM, swtpm nodes, the tenant's policy
pinning the code digest that ``attest code-digest`` computed offline over the image, and the
job's model). The image is the measured environment of compose/image.py with numpy copied
into it, so that a dependency's files lie in the image as they do in a real one. Each case
is what an attacker who can write files on an enrolled node (but cannot change the policy)
does to that image or to the trainer's environment, undone afterwards; each run goes through
``deploy/bin/node.py`` -> ``trainer --attest`` as docker-compose.yml starts it. A refused run
exits 5 naming what it refused, and neither broker has any record of the node since the run
started: no challenge, attestation or release was asked for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import marshal
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from attest.code_digest import CACHE_NAME, MANIFEST_NAME, environment_manifest
from attest.digest_cache import RACY_NS
from sealed.manifest import MANIFEST_PREFIX
from tests.compose.test_deployment import _deployment
from tests.compose.test_scenarios import Deployment, enrolled_deployment
from tests.trainer.conftest import child_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXIT_CODE_IDENTITY = 5  # trainer/guard.py
EXIT_ATTESTATION_DENIED = 4


def _site(image: Path) -> Path:
    (site,) = (image / "lib").glob("python3*/site-packages")
    return site


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    base = tmp_path_factory.mktemp("code-identity")
    harness, variables = _deployment(base, TRAIN_STEPS="5", LEASE_TTL_MS="30000")
    image = base / "image"
    # numpy (and the libraries it bundles) installed into the image itself, then the image
    # measured again, as `attest code-digest --write` ends an image build
    numpy = Path(importlib.util.find_spec("numpy").origin).parent  # type: ignore[arg-type]
    for name in ("numpy", "numpy.libs"):
        if (numpy.parent / name).is_dir():
            shutil.copytree(numpy.parent / name, _site(image) / name, symlinks=True)
    (image / MANIFEST_NAME).write_bytes(environment_manifest(str(image)))
    with enrolled_deployment(harness, variables, base) as deployment:
        yield deployment


@pytest.fixture
def image(deployment: Deployment) -> Path:
    return deployment.base / "image"


@contextlib.contextmanager
def tampered(path: Path, data: bytes) -> Iterator[Path]:
    """``path`` holds ``data`` for the block (created if absent); then it is as before."""
    original = path.read_bytes() if path.exists() else None
    path.write_bytes(data)
    try:
        yield path
    finally:
        if original is None:
            path.unlink()
        else:
            path.write_bytes(original)


def _node_records(deployment: Deployment, since: int) -> dict[str, list[dict]]:
    return {broker: [r for r in deployment.audit_since(broker, since)
                     if r["actor"] == "node:node-a"] for broker in ("provider", "tenant")}


def run_node(deployment: Deployment, *, env: dict[str, str] | None = None,
             argv: list[str] | None = None) -> tuple[int, str]:
    tpm = deployment.variables["TPM_A_PORT"]
    argv = argv or deployment.node_argv("node-a", "node-a", tpm)
    result = deployment.harness.run("node-a", argv, env=env)
    return result.returncode, (result.stdout + result.stderr).decode(errors="replace")


def assert_refused(deployment: Deployment, naming: str, *, env: dict[str, str] | None = None,
                   argv: list[str] | None = None) -> str:
    """The node's trainer exits 5 naming ``naming``, before asking any broker anything."""
    since = int(time.time() * 1000)
    code, output = run_node(deployment, env=env, argv=argv)
    assert code == EXIT_CODE_IDENTITY, output[-3000:]
    assert "trainer: code identity refused:" in output, output[-3000:]
    assert naming in output, output[-3000:]
    assert "step 1/" not in output and "Traceback" not in output
    assert _node_records(deployment, since) == {"provider": [], "tenant": []}
    deployment.assert_clean("node-a")
    return output


def _job(deployment: Deployment, name: str, **changes: object) -> Path:
    """node-a's job file as node.py renders it, with ``changes``."""
    home = deployment.harness.host_path("node-a", "/var/lib/node-a")
    job = yaml.safe_load((home / "job.yaml").read_text())
    job.update(changes)
    path = home / name
    path.write_text(yaml.safe_dump(job))
    return path


def _trainer_argv(job: Path) -> list[str]:
    return ["python", "-I", "-B", "-m", "trainer", "--attest", "--job", str(job),
            "--node-id", "node-a"]


def job_digest(job: Path, manifest: str) -> str:
    """`trainer job-digest` as the tenant runs it offline, supplying the key version and
    manifest the job file leaves to the brokers."""
    out = subprocess.run([sys.executable, "-m", "trainer", "job-digest", "--job", str(job),
                          "--manifest", manifest, "--key-version", "1", "--format", "json"],
                         capture_output=True, text=True, env=child_env())
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["job_digest"]  # type: ignore[no-any-return]


def test_the_approved_environment_attests_and_trains(deployment: Deployment):
    """... and the job digest each broker audits for the node's attestation is the one
    `trainer job-digest` prints for the node's job file (which names no manifest or key
    version: the node learns them from the brokers); one field changed, another digest."""
    since = int(time.time() * 1000)
    code, output = run_node(deployment)
    assert code == 0, output[-3000:]
    assert "step 5/5" in output and "shred report (normal exit)" in output
    store = deployment.harness.volume_path("store")
    (manifest,) = [p.relative_to(store).as_posix() for p in store.rglob("*")
                   if p.relative_to(store).as_posix().startswith(MANIFEST_PREFIX)]
    job = deployment.harness.host_path("node-a", "/var/lib/node-a/job.yaml")
    assert "manifest" not in yaml.safe_load(job.read_text())["dataset"]
    expected = job_digest(job, manifest)
    for broker, records in _node_records(deployment, since).items():
        assert any(r["event"] == "release" and r["outcome"] == "allowed" for r in records), (
            broker, records)
        audited = {m for r in records if r["event"] == "attest" and r["outcome"] == "allowed"
                   for m in re.findall(r"job\.digest ([0-9a-f]{64})", r["reason"])}
        assert audited == {expected}, (broker, records)
    assert job_digest(_job(deployment, "job-more-steps.yaml", steps=6), manifest) != expected
    deployment.assert_clean("node-a")


def test_planted_bytecode_is_refused(deployment: Deployment, image: Path):
    """A .pyc beside the untouched source, with the header Python checks (source mtime and
    size) kept, holding other code: never executed, refused by name."""
    source = _site(image) / "trainer" / "cli.py"
    pyc = Path(importlib.util.cache_from_source(str(source)))
    header = pyc.read_bytes()[:16]
    ran = deployment.base / "planted-pyc-ran"
    evil = compile(source.read_text() + f"\nopen({str(ran)!r}, 'w').close()\n", str(source),
                   "exec")
    with tampered(pyc, header + marshal.dumps(evil)):
        assert_refused(deployment, f"bytecode of trainer.cli: {pyc} differs from the "
                                   "measured code set")
    assert not ran.exists()


def test_sitecustomize_on_pythonpath_is_refused_and_never_runs_in_the_trainer(
    deployment: Deployment
):
    hooks = deployment.base / "hooks"
    hooks.mkdir(exist_ok=True)
    log = deployment.base / "sitecustomize-ran"
    (hooks / "sitecustomize.py").write_text(
        f"import sys\nwith open({str(log)!r}, 'a') as f:\n    f.write(repr(sys.argv) + '\\n')\n")
    assert_refused(deployment, "environment variable PYTHONPATH is set",
                   env={"PYTHONPATH": str(hooks)})
    # node.py (a plain python) ran it; the trainer, isolated from its first instruction, not
    ran = log.read_text().splitlines() if log.exists() else []
    assert ran and all("node.py" in line for line in ran), ran


def test_a_pth_file_added_to_site_packages_is_refused(deployment: Deployment, image: Path):
    pth = _site(image) / "zz-hook.pth"
    with tampered(pth, b"import os\n"):
        assert_refused(deployment, f".pth file {pth} is not in the measured code set")


def test_one_byte_changed_in_a_dependency_is_refused(deployment: Deployment, image: Path):
    target = _site(image) / "numpy" / "version.py"
    data = bytearray(target.read_bytes())
    data[-1:] = b" " if data.endswith(b"\n") else b"\n"  # one byte, still valid Python
    with tampered(target, bytes(data)):
        assert_refused(deployment, f"module numpy.version: {target} differs from the "
                                   "measured code set")


def test_a_replaced_extension_module_is_refused(deployment: Deployment, image: Path):
    (target,) = (_site(image) / "numpy" / "_core").glob("_multiarray_umath.*.so")
    with tampered(target, target.read_bytes() + b"\0"):  # still a loadable ELF file
        assert_refused(deployment, f"module numpy._core._multiarray_umath: {target} differs "
                                   "from the measured code set")


def test_a_cached_digest_never_stands_for_a_changed_library(deployment: Deployment,
                                                           image: Path):
    """The trainer keeps the digests it hashed beside the manifest (attest/digest_cache.py),
    so the next start reads no library it already checked. An extension module changed in
    place after a run, its size and mtime kept, is still refused: its ctime changed."""
    cache = image / CACHE_NAME
    (target,) = (_site(image) / "numpy" / "_core").glob("_multiarray_umath.*.so")
    st = target.stat()
    key = f"{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} ".encode()
    if not cache.exists() or key not in cache.read_bytes():
        # a run that trains, after the earlier tests' tampering (undone) changed the ctime;
        # a file changed less than RACY_NS before it is hashed is not cached
        time.sleep(RACY_NS / 1e9 + 0.1)
        code, output = run_node(deployment)
        assert code == 0, output[-3000:]
    assert key in cache.read_bytes()  # the cache holds the module's digest
    original = target.read_bytes()
    changed = bytearray(original)
    changed[len(changed) // 2] ^= 0xFF
    with tampered(target, bytes(changed)):
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size,
                                                                      st.st_mtime_ns)
        assert_refused(deployment, f"module numpy._core._multiarray_umath: {target} "
                                   "differs from the measured code set")


def _cache_key(path: Path) -> bytes:
    st = path.stat()
    return f"{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} ".encode()


def test_a_changed_library_behind_a_cached_extension_module_is_refused(deployment: Deployment,
                                                                       image: Path):
    """With the cache, an extension module the cache knows queues no background scan: the
    check before keys alone reads the mappings. A library numpy's extension module maps,
    changed in place (size and mtime kept) while the module itself is unchanged, is still
    hashed there and refused before any key is asked for."""
    cache = image / CACHE_NAME
    (module,) = (_site(image) / "numpy" / "_core").glob("_multiarray_umath.*.so")
    libs = _site(image) / "numpy.libs"
    assert libs.is_dir(), "this numpy bundles no libraries to change"
    target = min(libs.glob("*.so*"), key=lambda p: p.stat().st_size)  # libquadmath here
    if not cache.exists() or not all(_cache_key(p) in cache.read_bytes()
                                     for p in (module, target)):
        time.sleep(RACY_NS / 1e9 + 0.1)  # see the test above
        code, output = run_node(deployment)
        assert code == 0, output[-3000:]
    assert all(_cache_key(p) in cache.read_bytes() for p in (module, target))
    st = target.stat()
    changed = bytearray(target.read_bytes())
    changed[len(changed) // 2] ^= 0xFF  # in its code, which nothing runs before the check
    with tampered(target, bytes(changed)):
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size,
                                                                      st.st_mtime_ns)
        assert_refused(deployment, f"shared library {os.path.realpath(target)} differs from "
                                   "the measured code set")


def test_ld_preload_is_refused(deployment: Deployment):
    library = next(p for p in ("/usr/lib/x86_64-linux-gnu/libm.so.6", "/lib64/libm.so.6",
                               "/usr/lib/libm.so.6") if os.path.exists(p))
    assert_refused(deployment, "environment variable LD_PRELOAD is set",
                   env={"LD_PRELOAD": library})


def test_an_unmeasured_model_factory_is_refused_before_it_runs(deployment: Deployment,
                                                                image: Path):
    ran = deployment.base / "factory-ran"
    factory = _site(image) / "trainer" / "models_extra.py"
    job = _job(deployment, "job-factory.yaml",
               model={"name": "trainer.models_extra:build", "params": {}})
    code = f"def build(**_):\n    open({str(ran)!r}, 'w').close()\n".encode()
    with tampered(factory, code):
        assert_refused(deployment, f"module trainer.models_extra: {factory} is not in the "
                                   "measured code set", argv=_trainer_argv(job))
    assert not ran.exists()


def test_a_job_the_policy_does_not_allow_is_denied_naming_the_rule(deployment: Deployment):
    """Job identity: the tenant's policy pins the model (tenant_setup.py --job-model); a job
    file naming another (measured) model is denied by the brokers, naming the rule."""
    job = _job(deployment, "job-other-model.yaml",
               model={"name": "classifier", "params": {"features": 16, "classes": 4}})
    since = int(time.time() * 1000)
    code, output = run_node(deployment, argv=_trainer_argv(job))
    assert code == EXIT_ATTESTATION_DENIED, output[-3000:]
    assert "job-model-allowed: the job must train a model the tenant approved" in output
    assert "trainer-code-allowed:" not in output and "step 1/" not in output
    records = _node_records(deployment, since)["provider"]  # the first broker asked
    assert any(r["outcome"] == "denied" and "job-model-allowed" in r["reason"]
               for r in records), records
    assert not any(r["event"] == "release" and r["outcome"] == "allowed" for r in records)
    deployment.assert_clean("node-a")


def test_no_run_wrote_into_the_measured_image(deployment: Deployment, image: Path):
    """Every run above (refused or not) left the image as the tenant measured it: the
    trainer writes no bytecode (-B) and every tampering was undone."""
    assert environment_manifest(str(image)) == (image / MANIFEST_NAME).read_bytes()
