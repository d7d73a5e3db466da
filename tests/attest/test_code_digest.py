"""Code identity: the manifest covers every executable file of an environment; any changed,
added or removed byte gives another digest; the format is canonical; hashing is never cached
across an edit."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from attest.code_digest import (
    MANIFEST_HEADER,
    CodeSetError,
    ManifestIndex,
    code_digest,
    environment_manifest,
    hash_file,
    index_manifest,
    line_matches,
    parse_manifest,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tmp_path: Path) -> Path:
    """A small virtual environment over a small base installation, both on disk."""
    base = tmp_path / "base"
    (base / "bin").mkdir(parents=True)
    (base / "bin" / "python3.11").write_bytes(b"\x7fELF interpreter")
    std = base / "lib" / "python3.11"
    (std / "lib-dynload").mkdir(parents=True)
    (std / "os.py").write_text("sep = '/'\n")
    (std / "__pycache__").mkdir()
    (std / "__pycache__" / "os.cpython-311.pyc").write_bytes(b"bytecode of os")
    (std / "lib-dynload" / "_ssl.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF ssl")
    (std / "site-packages").mkdir()
    (std / "site-packages" / "ignored.py").write_text("# not imported by a venv\n")
    (base / "lib" / "libpython3.11.so.1.0").write_bytes(b"\x7fELF libpython")
    (base / "lib" / "libpython3.11.so").symlink_to("libpython3.11.so.1.0")

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python3").symlink_to(base / "bin" / "python3.11")
    (venv / "pyvenv.cfg").write_text(f"home = {base / 'bin'}\ninclude-system-site-packages = "
                                     "false\n")
    site = venv / "lib" / "python3.11" / "site-packages"
    (site / "numpy" / "__pycache__").mkdir(parents=True)
    (site / "numpy" / "__init__.py").write_text("version = '2'\n")
    (site / "numpy" / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"np bytecode")
    (site / "numpy" / "_core.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF numpy")
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "dep.py").write_text("X = 1\n")
    (site / "deps.pth").write_text(f"# a comment\n{extra}\nimport os\n")
    project = tmp_path / "checkout" / "trainer"
    project.mkdir(parents=True)
    (project / "__init__.py").write_text("X = 1\n")
    (site / "__editable___proj_0_1_finder.py").write_text(
        f"MAPPING: dict[str, str] = {{'trainer': '{project}'}}\n")
    return venv


def digest(env: Path) -> str:
    return hashlib.sha256(environment_manifest(str(env))).hexdigest()


def paths(env: Path) -> set[str]:
    return set(parse_manifest(environment_manifest(str(env))))


def test_manifest_lists_every_executable_part_of_the_environment(env: Path, tmp_path: Path):
    base = tmp_path / "base"
    site = env / "lib/python3.11/site-packages"
    listed = paths(env)
    for path in (
        base / "bin/python3.11",  # the interpreter, link followed
        base / "lib/libpython3.11.so.1.0", base / "lib/libpython3.11.so",
        base / "lib/python3.11/os.py", base / "lib/python3.11/__pycache__/os.cpython-311.pyc",
        base / "lib/python3.11/lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so",
        env / "pyvenv.cfg", site / "numpy/__init__.py",
        site / "numpy/__pycache__/__init__.cpython-311.pyc",
        site / "numpy/_core.cpython-311-x86_64-linux-gnu.so", site / "deps.pth",
        tmp_path / "extra/dep.py",  # a directory a .pth adds
        tmp_path / "checkout/trainer/__init__.py",  # an editable install's package
    ):
        assert str(path) in listed, path
    # a virtual environment does not import the base installation's site-packages
    assert str(base / "lib/python3.11/site-packages/ignored.py") not in listed


def test_manifest_is_canonical_and_documented(env: Path):
    data = environment_manifest(str(env))
    assert data.startswith(MANIFEST_HEADER)
    lines = data[len(MANIFEST_HEADER):].splitlines()
    keys = [line.rsplit(b"\t", 1)[1] for line in lines]
    assert keys == sorted(keys)
    link = next(line for line in lines if line.startswith(b"L\t"))
    assert link.endswith(b"/lib/libpython3.11.so") and b"\tlibpython3.11.so.1.0\t" in link
    f = next(line for line in lines if line.endswith(b"/numpy/__init__.py"))
    _, sha, size, _ = f.split(b"\t")
    assert sha.decode() == hashlib.sha256(b"version = '2'\n").hexdigest()
    assert int(size) == len("version = '2'\n")
    assert parse_manifest(data)  # round trip
    assert digest(env) == digest(env)


@pytest.mark.parametrize("rel", [
    "base/bin/python3.11", "base/lib/libpython3.11.so.1.0", "base/lib/python3.11/os.py",
    "base/lib/python3.11/__pycache__/os.cpython-311.pyc",
    "base/lib/python3.11/lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so",
    "venv/pyvenv.cfg", "venv/lib/python3.11/site-packages/numpy/__init__.py",
    "venv/lib/python3.11/site-packages/numpy/__pycache__/__init__.cpython-311.pyc",
    "venv/lib/python3.11/site-packages/numpy/_core.cpython-311-x86_64-linux-gnu.so",
    "extra/dep.py", "checkout/trainer/__init__.py",
])
def test_one_byte_changed_anywhere_changes_the_digest(env: Path, tmp_path: Path, rel: str):
    before = digest(env)
    path = tmp_path / rel
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert digest(env) != before


@pytest.mark.parametrize("rel", [
    "venv/lib/python3.11/site-packages/numpy/__pycache__/planted.cpython-311.pyc",
    "venv/lib/python3.11/site-packages/evil.pth",
    "venv/lib/python3.11/site-packages/sitecustomize.py",
    "base/lib/python3.11/sitecustomize.py",
])
def test_an_added_file_changes_the_digest(env: Path, tmp_path: Path, rel: str):
    before = digest(env)
    (tmp_path / rel).write_bytes(b"import os\n")
    assert digest(env) != before


def test_a_relinked_or_removed_file_changes_the_digest(env: Path, tmp_path: Path):
    before = digest(env)
    (tmp_path / "base/lib/libpython3.11.so").unlink()
    (tmp_path / "base/lib/libpython3.11.so").symlink_to("elsewhere.so")
    relinked = digest(env)
    assert relinked != before
    (tmp_path / "extra/dep.py").unlink()
    assert digest(env) not in (before, relinked)


def test_an_image_directory_is_measured_at_its_run_time_paths(tmp_path: Path):
    image = tmp_path / "image"
    (image / "usr/local/bin").mkdir(parents=True)
    (image / "usr/local/bin/python3.11").write_bytes(b"\x7fELF")
    (image / "usr/local/bin/python3").symlink_to("/usr/local/bin/python3.11")  # absolute
    std = image / "usr/local/lib/python3.11"
    (std / "site-packages/trainer").mkdir(parents=True)
    (std / "os.py").write_text("")
    (std / "site-packages/trainer/__init__.py").write_text("")
    listed = set(parse_manifest(environment_manifest("/usr/local", root=image)))
    assert listed == {"/usr/local/bin/python3.11", "/usr/local/lib/python3.11/os.py",
                      "/usr/local/lib/python3.11/site-packages/trainer/__init__.py"}


@pytest.mark.parametrize("bad", [
    b"not a manifest\n",
    MANIFEST_HEADER + b"F\t" + b"a" * 64 + b"\t1\t/b\nF\t" + b"a" * 64 + b"\t1\t/a\n",  # order
    MANIFEST_HEADER + b"F\t" + b"a" * 63 + b"\t1\t/a\n",  # short hash
    MANIFEST_HEADER + b"F\t" + b"A" * 64 + b"\t1\t/a\n",  # not lowercase: not canonical
    MANIFEST_HEADER + b"F\t" + b"a" * 64 + b"\t01\t/a\n",  # not canonical
    MANIFEST_HEADER + b"F\t" + b"a" * 64 + b"\t1\t/a",  # no final newline
    MANIFEST_HEADER + b"X\t/a\n",
])
def test_a_manifest_that_is_not_canonical_is_refused(bad: bytes):
    with pytest.raises(CodeSetError):
        parse_manifest(bad)


def test_the_in_process_hash_memo_never_stands_for_edited_bytes(tmp_path: Path):
    path = tmp_path / "mod.py"
    path.write_bytes(b"A = 1\n")
    first, _ = hash_file(path)
    st = path.stat()
    path.write_bytes(b"A = 2\n")  # same size; put the mtime back as an attacker would
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    second, _ = hash_file(path)
    assert second == hashlib.sha256(b"A = 2\n").hexdigest() != first


def test_this_environment_is_measured_with_its_dependencies():
    result = code_digest()
    assert len(result.digest) == 64
    assert result.claims()["code_digest"] == result.digest
    listed = paths(Path(sys.prefix))
    assert any(p.endswith("/torch/lib/libtorch_cpu.so") for p in listed)
    assert any(p.endswith("/numpy/__init__.py") for p in listed)
    assert str(REPO / "trainer" / "guard.py") in listed  # the editable checkout


def test_attest_code_digest_computes_the_stored_digest_offline(env: Path):
    """The tenant's side: `attest code-digest ENV` (and --write), without running anything
    from ENV; two environments that differ in one byte of a dependency differ."""
    def cli(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "attest.cli", "code-digest", *args],
                             capture_output=True, text=True, cwd=REPO, check=True)
        return out.stdout.strip()

    printed = cli(str(env), "--write")
    assert printed == digest(env)
    assert hashlib.sha256((env / "ct-code-manifest").read_bytes()).hexdigest() == printed
    assert cli(str(env)) == printed  # the stored manifest is not part of the set
    numpy = env / "lib/python3.11/site-packages/numpy/__init__.py"
    numpy.write_text(numpy.read_text().replace("'2'", "'3'"))
    assert cli(str(env)) != printed


@pytest.mark.parametrize("small_block", [0, 200, 1 << 20])
def test_the_run_time_index_finds_every_line_and_nothing_else(env: Path, small_block: int,
                                                               monkeypatch: pytest.MonkeyPatch):
    """trainer.guard looks lines up through the index: a directory's block of lines is found
    by binary search and, when small, made a table (small_block 0: never a table; 1 MiB:
    always), in any order of look-ups."""
    monkeypatch.setattr(ManifestIndex, "SMALL_BLOCK", small_block)
    manifest = environment_manifest(str(env))
    lines = manifest[len(MANIFEST_HEADER):].split(b"\n")[:-1]
    paths = [line.rpartition(b"\t")[2].decode() for line in lines]
    assert len(paths) > 5
    for order in (paths, paths[::-1], random.Random(7).sample(paths, len(paths))):
        index = index_manifest(manifest)
        assert all(index.get(path) == lines[paths.index(path)] for path in order)
        assert all(path in index for path in order)
    directories = {os.path.dirname(path) for path in paths}
    missing = ["/", "relative", paths[0][:-1], paths[0] + "x", paths[-1] + "x", "\uffff",
               *(d + suffix for d in directories for suffix in ("", "-", "0", "/", "/zz", "/!"))]
    for order in (missing, missing[::-1]):
        index = index_manifest(manifest)
        for path in order:
            assert path not in paths
            assert index.get(path) is None and path not in index, path
        assert all(index.get(path) == line for path, line in zip(paths, lines, strict=True))
    with pytest.raises(CodeSetError):
        index_manifest(b"not a manifest\n")


def test_a_line_matches_only_the_bytes_it_lists(env: Path):
    manifest = environment_manifest(str(env))
    index = index_manifest(manifest)
    os_py = next(p for p in parse_manifest(manifest).values() if p.path.endswith("/os.py"))
    line = index.get(os_py.path)
    assert line is not None
    digest = hashlib.sha256(Path(os_py.path).read_bytes()).hexdigest()
    size = Path(os_py.path).stat().st_size
    assert line_matches(line, digest, size)
    assert not line_matches(line, digest, size + 1)
    assert not line_matches(line, digest, size * 10)  # not a prefix of the size
    assert not line_matches(line, hashlib.sha256(b"other").hexdigest(), size)
    link = next(p for p in parse_manifest(manifest).values() if p.kind == "L")
    assert not line_matches(index.get(link.path) or b"", digest, size)
