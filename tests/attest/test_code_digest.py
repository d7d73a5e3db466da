"""Code digest: canonical over files + versions; any one-byte change gives another digest."""

from __future__ import annotations

from pathlib import Path

import pytest

from attest.code_digest import PROJECT_PACKAGES, code_digest, installed_package_dirs


@pytest.fixture
def packages(tmp_path: Path) -> dict[str, Path | None]:
    trainer = tmp_path / "trainer"
    (trainer / "sub").mkdir(parents=True)
    (trainer / "__init__.py").write_text("X = 1\n")
    (trainer / "sub" / "model.py").write_text("def f():\n    return 2\n")
    (trainer / "config.yaml").write_text("lr: 0.1\n")
    (trainer / "__pycache__").mkdir()
    (trainer / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"compiled")
    sealed = tmp_path / "sealed"
    sealed.mkdir()
    (sealed / "__init__.py").write_text("")
    return {"sealed": sealed, "trainer": trainer}


def digest(dirs, **kw):
    return code_digest(dirs, python_version="3.11.7", torch_version="2.13.0", **kw).digest


def test_digest_is_stable(packages):
    assert digest(packages) == digest(packages)
    assert code_digest(packages, python_version="3.11.7", torch_version="2.13.0").files == 4


@pytest.mark.parametrize("rel", ["__init__.py", "sub/model.py", "config.yaml"])
def test_one_byte_change_in_any_file_changes_the_digest(packages, rel):
    before = digest(packages)
    path = packages["trainer"] / rel
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    assert digest(packages) != before


def test_added_or_renamed_file_changes_the_digest(packages):
    before = digest(packages)
    (packages["trainer"] / "extra.py").write_text("")
    added = digest(packages)
    assert added != before
    (packages["trainer"] / "extra.py").rename(packages["trainer"] / "extra2.py")
    assert digest(packages) not in (before, added)


def test_bytecode_caches_are_excluded(packages):
    before = digest(packages)
    (packages["trainer"] / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"other")
    (packages["trainer"] / "stale.pyc").write_bytes(b"x")
    assert digest(packages) == before


def test_versions_are_covered(packages):
    base = digest(packages)
    assert code_digest(packages, python_version="3.11.8", torch_version="2.13.0").digest != base
    assert code_digest(packages, python_version="3.11.7", torch_version="2.12.0").digest != base


def test_missing_package_differs_from_empty_and_from_present(packages):
    present = digest(packages)
    missing = digest({**packages, "trainer": None})
    assert missing != present


def test_file_moved_between_packages_changes_the_digest(packages):
    before = digest(packages)
    (packages["trainer"] / "config.yaml").rename(packages["sealed"] / "config.yaml")
    assert digest(packages) != before


def test_installed_project_digest_covers_the_real_packages():
    dirs = installed_package_dirs()
    assert set(dirs) == set(PROJECT_PACKAGES)
    assert dirs["attest"] is not None and (dirs["attest"] / "code_digest.py").is_file()
    result = code_digest()
    assert len(result.digest) == 64
    assert result.files > 0
    assert result.claims()["code_digest"] == result.digest


def test_symlinks_are_hashed_by_target(packages, tmp_path):
    outside = tmp_path / "outside.py"
    outside.write_text("A = 1\n")
    link = packages["trainer"] / "linked.py"
    link.symlink_to(outside)
    first = digest(packages)
    other = tmp_path / "other.py"
    other.write_text("A = 1\n")
    link.unlink()
    link.symlink_to(other)
    assert digest(packages) != first
    (packages["trainer"] / "subdir_link").symlink_to(packages["trainer"] / "sub")
    assert digest(packages) != first  # a link to a directory is hashed, not opened
