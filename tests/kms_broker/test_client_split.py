"""Client and server split: the process that holds a key loads none of the broker's server code.

Each check runs in a fresh interpreter and lists which server-side modules the import loaded:
the broker server and servicers, the broker domain, the CEL engines, Prometheus, PKCS#11.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.kms_broker.conftest import REPO

SERVER_SIDE = ("kms_broker.server", "kms_broker.servicers", "kms_broker.app",
               "kms_broker.interceptors", "kms_broker.domain", "kms_broker.audit",
               "kms_broker.metrics", "kms_broker.hsm", "kms_broker.state", "attest.policy",
               "cel", "celpy", "prometheus_client", "pkcs11")


def _loaded_server_modules(code: str) -> list[str]:
    probe = (f"{code}\nimport json, sys\n"
             f"print(json.dumps(sorted(m for m in sys.modules if any("
             f"m == p or m.startswith(p + '.') for p in {SERVER_SIDE!r}))))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["kms_broker.client", "kms_broker.rpc", "kms_broker.tenant",
                                    "kms_broker.node_enrol", "kms_broker.protocol"])
def test_client_modules_import_without_the_server(module: str) -> None:
    assert _loaded_server_modules(f"import {module}") == []


def test_key_client_use_loads_no_server_code() -> None:
    """Building a key client and its channels (what fetch_dek runs) stays client-side too."""
    code = """
from kms_broker.client import KeyClient
from kms_broker.rpc import BrokerEndpoint
from tests.kms_broker.pki import DevPki
import tempfile, pathlib
pki = DevPki(pathlib.Path(tempfile.mkdtemp()))
pki.issue("node", "n1")
endpoint = BrokerEndpoint.from_files("127.0.0.1:1", ca=pki.ca_path,
                                     cert=pki.root / "node-n1.pem", key=pki.root / "node-n1.key")
KeyClient([endpoint], node_id="n1", job_id="j", evidence_for=lambda rd: ("x", b"")).close()
"""
    assert _loaded_server_modules(code) == []


def test_trainer_attest_key_path_imports_only_the_client() -> None:
    """``trainer --attest``'s key path: the attested key source and what acquire() imports."""
    code = ("import trainer.cli, trainer.attested, trainer.keysource, trainer.quote_batch\n"
            "import kms_broker.client, kms_broker.rpc")
    assert _loaded_server_modules(code) == []


@pytest.mark.integration
def test_a_process_that_fetched_a_key_holds_no_server_code(broker_factory, tmp_path) -> None:
    """A real fetch_dek against a broker (so every lazy import on the path has run), then the
    process's modules are checked."""
    from tests.kms_broker.conftest import make_world

    world = make_world(broker_factory("split"), tmp_path)
    pki = world.broker.pki
    code = f"""
from kms_broker.client import KeyClient
from kms_broker.rpc import BrokerEndpoint
from tests.kms_broker.verifiers import make_evidence
endpoint = BrokerEndpoint.from_files({world.broker.address!r}, ca={str(pki.ca_path)!r},
                                     cert={str(pki.root / "node-n1.pem")!r},
                                     key={str(pki.root / "node-n1.key")!r},
                                     server_name="localhost")
with KeyClient([endpoint], node_id="n1", job_id={world.job_id!r},
               evidence_for=make_evidence) as client:
    client.fetch_dek(tenant_id="acme", dataset_id={world.dataset_id!r},
                     key_version=1).dek.zeroize()
"""
    assert _loaded_server_modules(code) == []
