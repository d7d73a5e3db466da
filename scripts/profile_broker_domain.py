"""Where a cold one-call release costs the broker CPU below gRPC: the domain, in-process.

A profiling aid (not a benchmark: no goal). ``bench_broker`` measures the whole broker
(``kms-broker serve --workers N``, two mTLS RPCs per cycle); this script measures the same
cycle's domain work alone, so the two together split the cycle into transport and domain.

Setup (the production path, as ``bench_broker`` builds it): a real ``kms-broker serve`` on a
fresh SoftHSM2 token prepares the state over gRPC (a tenant, a dataset, the 16-rule
``policies/production.yaml`` grant, one swtpm node enrolled with MakeCredential /
ActivateCredential), then stops; this process then builds the broker exactly as ``serve``
does (``kms_broker.app.build_server`` over the same config: TimedHsm over Pkcs11Hsm, SQLite
in WAL with FULL sync, the audit log with its checkpointer, the default verifiers) and drives
its ``NodeFlow`` directly.

Per round: N challenges (timed), N TPM quotes from swtpm over their report data (not timed),
N ``attest_release`` calls (timed): CPU of this process per call, against one raw in-process
``Pkcs11Hsm.seal_share`` on a second token (``bench_broker``'s floor). Then, per cycle, the
thread CPU of each step (``--probe``), the broker HSM's own ``seal_share`` in a tight loop,
and the garbage collector's collections.

    .venv/bin/python scripts/profile_broker_domain.py [--cycles 50] [--rounds 3] [--probe]
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_broker as bb

_REPO_CALLS = ("get_node", "pending_sessions", "add_session", "consume_session", "grants_for",
               "release_reads", "grants_with_documents", "take_lease", "mark_session_used")
_FLOW_STEPS = ("challenge", "attest_release", "_attested", "_verified", "_job_policy_rules",
               "_released", "_authorize", "_seal")


def _probe(acc: dict[str, list[float]], owner: Any, name: str, label: str) -> None:
    """Wrap ``owner.name`` so each call adds its thread CPU to ``acc[label]`` (inclusive)."""
    fn: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            slot = acc.setdefault(label, [0.0, 0])
            slot[0] += time.thread_time() - start
            slot[1] += 1

    setattr(owner, name, timed)


def main() -> None:
    from attest.interface import expected_report_data
    from attest.swtpm import LocalEkCa, Swtpm, manufacture
    from attest.tpm2.agent import collect_evidence
    from attest.tpm2.node import TpmNode
    from kms_broker import certs, sealing
    from kms_broker.app import build_server
    from kms_broker.config import load_config
    from kms_broker.domain import node_flow
    from kms_broker.hsm.interface import ShareBinding
    from kms_broker.node_enrol import enrol_node

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=50, help="cycles per round (at most 60)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--probe", action="store_true", help="thread CPU of each step")
    ap.add_argument("--alternate", action="store_true",
                    help="also alternate cycles between two broker instances on one state "
                         "(two SQLite connections, two audit log writers), as two workers")
    args = ap.parse_args()
    n = max(1, min(args.cycles, 60))  # a node may hold 64 pending challenges
    with tempfile.TemporaryDirectory(prefix="profile-broker-domain-") as tmp:
        root = Path(tmp)
        ek_ca = LocalEkCa.create(root / "ek-ca")
        tpm_state = manufacture(root / "tpm0", ek_ca)
        (root / "ek-root.pem").write_bytes(ek_ca.root_cert_pem)
        (root / "ek-issuer.pem").write_bytes(ek_ca.issuer_cert_pem)
        proc, pki, address, softhsm, raw_pin = bb._setup(root / "broker", 1, {
            "reference_values": {"tpm2": {"boot_pcrs": bb.ZERO_BOOT}},
            "ek_roots": [str(root / "ek-root.pem")],
            "ek_intermediates": [str(root / "ek-issuer.pem")],
        })
        tpm = Swtpm(tpm_state).start()
        try:
            claims = bb._claims(root / "host")
            rules = bb._tenant_setup(address, pki, bb._policy(claims), 8)
            certs.issue(pki, pki, role="node", ident="n0")
            with TpmNode(tpm.tcti) as node:
                enrol_node([bb._endpoint(address, pki, "operator", "ops")], node_id="n0",
                           tenant_scope=bb.TENANT, tpm=node)
            proc.terminate()
            proc.wait(timeout=60)
            raw = bb._raw_seal_cpu(softhsm, raw_pin, 100)
            config = load_config(root / "broker" / "broker.yaml")
            servers = [build_server(config) for _ in range(2 if args.alternate else 1)]
            flows = [node_flow.NodeFlow(s.deps) for s in servers]
            flow = flows[0]

            def batch(count: int, using: int = 1) -> tuple[float, float]:
                """``using``: cycle i runs on flow i % using (2: two connections to the
                state and two audit log instances, as two workers have)."""
                start = time.process_time()
                challenges = [flows[i % using].challenge(node_id="n0", job_id=bb.JOB)
                              for i in range(count)]
                challenge_cpu = time.process_time() - start
                evidence = []
                for ch in challenges:
                    _, pub = sealing.generate_node_key()
                    evidence.append((ch, pub, collect_evidence(
                        tpm.tcti, expected_report_data(ch.nonce, ch.session_id, pub), claims)))
                start = time.process_time()
                for i, (ch, pub, payload) in enumerate(evidence):
                    _, released = flows[i % using].attest_release(
                        node_id="n0", session_id=ch.session_id, kind="tpm2", payload=payload,
                        node_public_key=pub, tenant_id=bb.TENANT, dataset_id=bb.DATASET,
                        key_version=1)
                    if not released.sealed_share:
                        raise RuntimeError("the release sealed nothing")
                return challenge_cpu / count, (time.process_time() - start) / count

            batch(5)  # warm: first policy evaluation, first grant verification, key lookups
            acc: dict[str, list[float]] = {}
            if args.probe:
                for name in _REPO_CALLS:
                    _probe(acc, flow.d.repo, name, f"repo.{name}")
                for name in ("write", "wait_durable"):
                    _probe(acc, flow.d.audit, name, f"audit.{name}")
                _probe(acc, flow.d.hsm, "seal_share", "hsm.seal_share")
                _probe(acc, flow.d.verifiers["tpm2"], "verify", "tpm2.verify")
                if args.alternate:  # the second instance's repository and audit log too
                    for name in _REPO_CALLS:
                        _probe(acc, flows[1].d.repo, name, f"repo.{name}")
                    for name in ("write", "wait_durable"):
                        _probe(acc, flows[1].d.audit, name, f"audit.{name}")
                for name in ("evidence_claims", "_claims_json", "release_transcript",
                             "_check_node_key"):
                    _probe(acc, node_flow, name, name)
                for name in _FLOW_STEPS:
                    for each in flows:
                        _probe(acc, each, name, f"flow.{name}")
            per_mode: dict[str, dict[str, list[float]]] = {"one": {}, "two": {}}

            def keep(mode: str) -> None:
                for key, (cpu, calls) in acc.items():
                    slot = per_mode[mode].setdefault(key, [0.0, 0])
                    slot[0] += cpu
                    slot[1] += calls
                acc.clear()
            collections: dict[int, list[float]] = {}
            started = [0.0]

            def on_gc(phase: str, info: dict[str, int]) -> None:
                if phase == "start":
                    started[0] = time.thread_time()
                else:
                    slot = collections.setdefault(info["generation"], [0, 0.0])
                    slot[0] += 1
                    slot[1] += time.thread_time() - started[0]

            print(f"policy production.yaml ({rules} rules), tpm2 evidence from swtpm, "
                  f"{n} cycles x {args.rounds} rounds; raw in-process seal_share "
                  f"{raw * 1e3:.3f} ms CPU")
            results = []
            alternated = []
            gc.callbacks.append(on_gc)
            try:
                for i in range(args.rounds):
                    c, a = batch(n)
                    keep("one")
                    results.append((c, a))
                    print(f"round {i}: Challenge {c * 1e3:.3f} ms, attest_release "
                          f"{a * 1e3:.3f} ms, cycle {(c + a) * 1e3:.3f} ms CPU "
                          f"({(c + a) / raw:.2f}x raw seal)", flush=True)
                    if args.alternate:
                        if i == 0:
                            batch(4, 2)  # warm the second instance
                        acc.clear()
                        c, a = batch(n, 2)
                        keep("two")
                        alternated.append(c + a)
                        print(f"round {i}, two instances alternating: cycle "
                              f"{(c + a) * 1e3:.3f} ms CPU ({(c + a) / raw:.2f}x raw seal)",
                              flush=True)
            finally:
                gc.callbacks.remove(on_gc)
            total = n * args.rounds
            two = per_mode["two"]
            for key, (cpu, calls) in sorted(per_mode["one"].items(), key=lambda kv: -kv[1][0]):
                print(f"  {key:28s} {cpu / total * 1e3:8.3f} ms/cycle  "
                      f"({calls / total:.1f} calls/cycle)"
                      + (f"  two instances: {two[key][0] / total * 1e3:8.3f} ms/cycle"
                         if key in two else ""))
            for generation, (count, cpu) in sorted(collections.items()):
                print(f"  gc generation {generation}: {count / total:.2f} collections/cycle, "
                      f"{cpu / total * 1e3:.3f} ms/cycle (evidence collection included)")
            share = flow.d.repo.get_share(bb.TENANT, bb.DATASET, 1)
            dataset = flow.d.repo.get_dataset(bb.TENANT, bb.DATASET)
            binding = ShareBinding(tenant_id=bb.TENANT, dataset_id=bb.DATASET, key_version=1,
                                   share_index=dataset.share_index)
            _, node_pub = sealing.generate_node_key()
            transcript = sealing.release_transcript(
                session_id="s", nonce=b"n" * 32, tenant_id=bb.TENANT, dataset_id=bb.DATASET,
                key_version=1, broker_id="bench", node_public_key=node_pub)
            loops = []
            for _ in range(3):
                start = time.thread_time()
                for _ in range(100):
                    flow.d.hsm.seal_share(share.wrapped_share, binding, share.kek_version,
                                          node_pub, transcript)
                loops.append((time.thread_time() - start) / 100)
            print(f"the broker's own seal_share in a tight loop: "
                  f"{statistics.median(loops) * 1e3:.3f} ms CPU")
            c = statistics.median(r[0] for r in results)
            a = statistics.median(r[1] for r in results)
            print(f"median: Challenge {c * 1e3:.3f} ms, attest_release {a * 1e3:.3f} ms, "
                  f"cycle {(c + a) * 1e3:.3f} ms CPU = {(c + a) / raw:.2f}x the raw seal "
                  f"({raw * 1e3:.3f} ms)")
            if alternated:
                one = statistics.median(r[0] + r[1] for r in results)
                two = statistics.median(alternated)
                print(f"two instances alternating / one: {two / one:.2f}x "
                      f"({two * 1e3:.3f} / {one * 1e3:.3f} ms)")
            for server in servers:
                for stop in server.on_stop:  # the janitor, the revocation relay, a last seal
                    stop()
        finally:
            tpm.stop()
            if proc.poll() is None:
                proc.terminate()


if __name__ == "__main__":
    main()
