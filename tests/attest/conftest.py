"""Shared attestation fixtures: a private EK manufacturer CA and swtpm instances.

``swtpm`` is module-scoped (key generation is slow-ish): one TPM with its own state directory
and an EK certificate signed by ``ek_ca``. ``swtpm_factory`` starts more (another node's TPM,
or a TPM certified by another CA); every instance is stopped when its scope ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from attest.swtpm import LocalEkCa, Swtpm, manufacture


@pytest.fixture(scope="session")
def ek_ca(tmp_path_factory: pytest.TempPathFactory) -> LocalEkCa:
    """The trusted test manufacturer CA (its root is what the broker is configured with)."""
    ca = LocalEkCa.create(tmp_path_factory.mktemp("ek-ca"))
    manufacture(tmp_path_factory.mktemp("ek-ca-warmup"), ca)  # makes root + issuer now
    return ca


@pytest.fixture(scope="session")
def untrusted_ek_ca(tmp_path_factory: pytest.TempPathFactory) -> LocalEkCa:
    """A second, untrusted CA with the same names as the trusted one."""
    ca = LocalEkCa.create(tmp_path_factory.mktemp("rogue-ca"))
    manufacture(tmp_path_factory.mktemp("rogue-ca-warmup"), ca)
    return ca


@pytest.fixture(scope="module")
def swtpm_factory(
    tmp_path_factory: pytest.TempPathFactory, ek_ca: LocalEkCa
) -> Iterator[Callable[..., Swtpm]]:
    started: list[Swtpm] = []

    def start(ca: LocalEkCa | None = None, *, pcr_banks: str = "sha256") -> Swtpm:
        state = manufacture(tmp_path_factory.mktemp("swtpm"), ca or ek_ca, pcr_banks=pcr_banks)
        tpm = Swtpm(Path(state)).start()
        started.append(tpm)
        return tpm

    yield start
    for tpm in started:
        tpm.stop()


@pytest.fixture(scope="module")
def swtpm(swtpm_factory: Callable[..., Swtpm]) -> Swtpm:
    """One running swtpm with an EK certificate from ``ek_ca``."""
    return swtpm_factory()


def hardened_root(root: Path) -> Path:
    """A fake host root whose files read as a hardened node (init_on_free, KSM off, no swap,
    no core dumps), for the facts collector's ``root`` argument."""
    for rel, text in {
        "proc/cmdline": "quiet init_on_free=1\n",
        "sys/kernel/mm/ksm/run": "0\n",
        "proc/swaps": "Filename Type Size Used Priority\n",
        "proc/self/limits": "Max core file size        0                    0  bytes\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root
