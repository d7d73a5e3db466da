"""A process that uses Pkcs11Hsm (SoftHSM loaded in it) never holds a share in the clear.

The child process imports a share and seals it 100 times to a node key; the test then reads
the child's whole memory through /proc/PID/mem (root) and looks for the share's bytes. A
canary the child deliberately keeps proves that the scan does see the child's heap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from kms_broker import sealing
from sealed.secrets import SecretBuffer
from tests.kms_broker.hsm_fixtures import (  # noqa: F401 - registers the fixtures
    SoftHsmToken,
    softhsm_config_fixture,
    softhsm_token_fixture,
)

CHILD = textwrap.dedent(
    """
    import json, sys
    from kms_broker.hsm.interface import ShareBinding
    from kms_broker.hsm.pkcs11_hsm import Pkcs11Hsm
    binding = ShareBinding(tenant_id="tenant-a", dataset_id="ds", key_version=1, share_index=0)
    req = json.loads(sys.stdin.readline())
    canary = bytes.fromhex(req["canary"])  # kept alive on purpose: the scan must find it
    hsm = Pkcs11Hsm(req["module"], req["label"], req["pin"])
    hsm.create_tenant_kek("tenant-a", 1)
    pub = hsm.create_import_key("imp-1")
    print(json.dumps({"import_pub": pub.hex()}), flush=True)
    req = json.loads(sys.stdin.readline())
    wrapped = hsm.import_share("imp-1", bytes.fromhex(req["sealed"]),
                               bytes.fromhex(req["import_transcript"]), binding, 1)
    hsm.destroy_import_key("imp-1")
    blobs = [hsm.seal_share(wrapped, binding, 1, bytes.fromhex(req["node_pub"]),
                            bytes.fromhex(req["release_transcript"])) for _ in range(100)]
    print(json.dumps({"blob": blobs[-1].hex(), "canary_len": len(canary)}), flush=True)
    sys.stdin.readline()  # stay alive while the parent reads our memory
    """
)


def _memory_contains(pid: int, needles: dict[str, bytes]) -> dict[str, bool]:
    found = dict.fromkeys(needles, False)
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            parts = line.split()
            if "r" not in parts[1] or (len(parts) > 5 and parts[5] in ("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, ValueError):
                continue
            for name, needle in needles.items():
                if not found[name] and needle in chunk:
                    found[name] = True
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="reading another process's memory needs root")
def test_share_never_in_clear_in_the_hsm_user_process(softhsm_token: SoftHsmToken) -> None:
    canary = os.urandom(32)
    share = SecretBuffer.random(32)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env=softhsm_token.env(), text=True,
    )
    try:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(json.dumps({
            "module": softhsm_token.module_path, "label": softhsm_token.label,
            "pin": softhsm_token.user_pin, "canary": canary.hex(),
        }) + "\n")
        child.stdin.flush()
        import_pub = bytes.fromhex(json.loads(child.stdout.readline())["import_pub"])
        import_transcript = sealing.import_transcript(
            import_id="imp-1", tenant_id="tenant-a", dataset_id="ds", key_version=1,
            share_index=0, broker_id="b", import_public_key=import_pub,
        )
        node_key, node_pub = sealing.generate_node_key()
        release_transcript = sealing.release_transcript(
            session_id=b"s", nonce=os.urandom(32), tenant_id="tenant-a", dataset_id="ds",
            key_version=1, broker_id="b", node_public_key=node_pub,
        )
        child.stdin.write(json.dumps({
            "sealed": sealing.seal_share_to(import_pub, share, import_transcript).hex(),
            "import_transcript": import_transcript.hex(),
            "node_pub": node_pub.hex(),
            "release_transcript": release_transcript.hex(),
        }) + "\n")
        child.stdin.flush()
        reply = json.loads(child.stdout.readline())
        # the releases were real: the node opens the last one to our share
        blob = bytes.fromhex(reply["blob"])
        assert sealing.open_sealed_share(node_key, blob, release_transcript).equals(share)

        with share.view() as s:
            found = _memory_contains(child.pid, {"canary": canary, "share": bytes(s)})
        assert found["canary"], "the scan did not see the child's heap"
        assert not found["share"], "the share was found in clear in the HSM user's memory"
    finally:
        if child.stdin:
            child.stdin.close()
        child.wait()  # it exits on end of input
