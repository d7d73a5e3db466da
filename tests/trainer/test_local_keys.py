"""trainer.local_keys on real processes and sockets: local rank 0 hands the DEK to a sibling
process, forwards lease updates and revocation, refuses a process that is not a sibling, and
tells its peers why it has no key; a peer whose rank 0 dies without goodbye learns it."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.local_keys import HolderFailed, LocalKeyHolder, channel_name, receive_key

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 120

HOLDER = r"""
import json, sys
from sealed.secrets import SecretBuffer
from trainer.local_keys import LocalKeyHolder
cfg = json.loads(sys.argv[1])
holder = LocalKeyHolder(bytes.fromhex(cfg["name"]), peers=cfg["peers"], wait_s=60)
print("listening", flush=True)
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "key":
        holder.publish_key(SecretBuffer.from_bytes(bytes.fromhex(arg)), lease_expiry=1234.5,
                           key_version=3, manifest="m-abc")
    elif cmd == "deny":
        holder.publish_error("d", "release denied by b1", ("ksm-off: KSM is on", "r2: why"))
    elif cmd == "deny-long":  # 6,000 bytes of 3-byte characters: the 4,096-byte cut falls
        holder.publish_error("d", "\u20ac" * 2000, ("r\u00e9ason " * 1000,) * 40)  # inside one
    elif cmd == "lease":
        holder.lease(float(arg), "UNAVAILABLE: b1 down" if float(arg) > 5000 else "")
    elif cmd == "revoke":
        holder.revoke(arg)
    elif cmd == "bye":
        holder.close()
    elif cmd == "die":
        import os
        os._exit(9)
    print("done", flush=True)
"""

PEER = r"""
import json, sys
from trainer.local_keys import HolderFailed, PeerWatcher, receive_key
cfg = json.loads(sys.argv[1])
try:
    got = receive_key(bytes.fromhex(cfg["name"]), local_rank=cfg["rank"], wait_s=60)
except HolderFailed as exc:
    print(json.dumps({"failed": exc.kind, "message": str(exc), "reasons": exc.reasons}),
          flush=True)
    sys.exit(0)
with got.dek.view() as v:
    dek = bytes(v).hex()  # TEST ONLY: the test compares the key it handed over
print(json.dumps({"dek": dek, "expiry": got.lease_expiry, "kv": got.key_version,
                  "manifest": got.manifest}), flush=True)
say = lambda *a: print(json.dumps(a), flush=True)
w = PeerWatcher(got.channel, on_lease=lambda e, p: say("lease", e, p),
                on_revoked=lambda r: say("revoked", r), on_gone=lambda r: say("gone", r))
w._thread.join(60)
say("end")
"""


RAW = r"""
import json, socket, struct, sys
cfg = json.loads(sys.argv[1])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(bytes.fromhex(cfg["name"]))
got = b""
try:  # no check of its own; rank 0 may have closed before the hello arrives
    s.sendall(struct.pack(">cI", b"H", 4) + struct.pack(">I", 1))
    s.settimeout(60)
    while chunk := s.recv(4096):
        got += chunk
except (BrokenPipeError, ConnectionResetError):
    pass
print(json.dumps({"received": len(got)}), flush=True)
"""


class _Py:
    def __init__(self, code: str, cfg: dict, *, via_shell: bool = False) -> None:
        argv = [sys.executable, "-c", code, json.dumps(cfg)]
        if via_shell:  # a grandchild of the test: not a sibling of the holder
            argv = ["/bin/sh", "-c", 'exec "$0" "$@" & wait', *argv]
        self.proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"exited {self.proc.wait(WAIT_S)}: {self.proc.stderr.read()[-2000:]}"
        return line.strip()

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT_S)


@pytest.fixture
def name() -> bytes:
    return b"\0ctrain-local-keys-test-" + secrets.token_hex(8).encode()


@pytest.fixture
def procs():
    started: list[_Py] = []
    yield started
    for p in started:
        p.stop()


def _holder(name: bytes, procs: list[_Py]) -> _Py:
    """Local rank 0 for one peer, listening."""
    holder = _Py(HOLDER, {"name": name.hex(), "peers": 1})
    procs.append(holder)
    assert holder.line() == "listening"
    return holder


def _peer(name: bytes, procs: list[_Py], *, via_shell: bool = False) -> _Py:
    """Local rank 1 asking for the key (a sibling of the holder unless ``via_shell``)."""
    peer = _Py(PEER, {"name": name.hex(), "rank": 1}, via_shell=via_shell)
    procs.append(peer)
    return peer


def test_the_key_lease_updates_and_revocation_reach_a_sibling(name, procs):
    holder = _holder(name, procs)
    peer = _peer(name, procs)  # waits for the key on the channel
    dek = secrets.token_bytes(32)
    holder.send(f"key {dek.hex()}")
    got = json.loads(peer.line())
    assert got == {"dek": dek.hex(), "expiry": 1234.5, "kv": 3, "manifest": "m-abc"}
    holder.send("lease 4000.25")
    assert json.loads(peer.line()) == ["lease", 4000.25, ""]
    holder.send("lease 9000")
    assert json.loads(peer.line()) == ["lease", 9000, "UNAVAILABLE: b1 down"]
    holder.send("revoke broker b1 revoked the lease: grant revoked")
    assert json.loads(peer.line()) == ["revoked", "broker b1 revoked the lease: grant revoked"]
    assert json.loads(peer.line()) == ["end"]


def test_a_peer_that_connects_before_rank_0_listens_waits_for_it(name, procs):
    peer = _peer(name, procs)
    holder = _holder(name, procs)
    dek = secrets.token_bytes(32)
    holder.send(f"key {dek.hex()}")
    assert json.loads(peer.line())["dek"] == dek.hex()
    holder.send("bye")
    assert json.loads(peer.line()) == ["end"]  # goodbye: neither revoked nor gone


def test_rank_0_dying_without_goodbye_ends_the_peer_lease(name, procs):
    holder = _holder(name, procs)
    peer = _peer(name, procs)
    holder.send(f"key {secrets.token_bytes(32).hex()}")
    peer.line()
    holder.send("die")
    event, reason = json.loads(peer.line())
    assert event == "gone" and "local rank 0, which holds this node's leases, is gone" in reason


def test_a_denial_reaches_the_peer_with_its_reasons(name, procs):
    holder = _holder(name, procs)
    peer = _peer(name, procs)
    holder.send("deny")
    assert json.loads(peer.line()) == {"failed": "d", "message": "release denied by b1",
                                       "reasons": ["ksm-off: KSM is on", "r2: why"]}


def test_a_long_non_ascii_denial_reaches_the_peer_cut_at_a_character(name, procs):
    holder = _holder(name, procs)
    peer = _peer(name, procs)
    holder.send("deny-long")
    got = json.loads(peer.line())
    assert got["failed"] == "d"  # not "x", "its error did not decode"
    assert got["message"] == "\u20ac" * (4096 // 3)
    # 40 such reasons do not fit one 64 KiB frame: as many whole (cut) reasons as fit arrive
    assert 10 < len(got["reasons"]) < 40
    for reason in got["reasons"]:
        assert ("r\u00e9ason " * 1000).startswith(reason) and 4090 < len(reason.encode()) <= 4096


def test_a_process_that_is_not_a_sibling_gets_nothing(name, procs):
    holder = _holder(name, procs)
    holder.send(f"key {secrets.token_bytes(32).hex()}")
    assert holder.line() == "done"
    stranger = _peer(name, procs, via_shell=True)
    got = json.loads(stranger.line())
    assert "dek" not in got and got["failed"] == "x"
    assert "not a sibling rank under this torchrun agent" in got["message"]
    # one that skips its own check and asks: rank 0 checks it and closes, sending nothing
    raw = _Py(RAW, {"name": name.hex()}, via_shell=True)
    procs.append(raw)
    assert json.loads(raw.line()) == {"received": 0}
    # the real peer still gets its key afterwards: the strangers took no place
    peer = _peer(name, procs)
    assert "dek" in json.loads(peer.line())


def test_the_holder_refuses_this_process_and_a_second_holder(name):
    holder = LocalKeyHolder(name, peers=1, wait_s=5)
    try:
        with pytest.raises(RuntimeError, match="another holder"):
            LocalKeyHolder(name, peers=1)
        # this process is the holder's own: not a sibling of itself
        with pytest.raises(HolderFailed, match="not a sibling"):
            receive_key(name, local_rank=1, wait_s=5)
    finally:
        holder.close()
    assert channel_name("job-a") != channel_name("job-b")
    assert channel_name("job-a").startswith(b"\0") and os.getppid() > 1


def test_the_key_frame_rank_0_keeps_for_its_peers_is_handed_to_the_shredder() -> None:
    """Until every peer has it, local rank 0 keeps the key frame; ``held`` hands it to the
    shredder (trainer.train registers it with the DEK), so a signal in that window zeroes it
    too, and a frame shredded before a peer comes is never sent."""
    from sealed.secrets import SecretBuffer

    name = channel_name(f"held-{secrets.token_hex(4)}")
    holder = LocalKeyHolder(name, peers=1, wait_s=60)
    try:
        assert holder.held == ()  # nothing published yet
        dek = secrets.token_bytes(32)
        holder.publish_key(SecretBuffer.from_bytes(dek), lease_expiry=None, key_version=1,
                           manifest="m")
        (frame,) = holder.held
        with frame.view() as v:
            assert dek in bytes(v)  # TEST ONLY: the frame carries the key
        frame.zeroize()  # what the shredder does
        assert holder.held == ()
    finally:
        holder.close(linger_s=0)
