"""What the demo prints once training is over: loss curve, releases, storage, timings."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from demo.report import (
    ascii_plot,
    audit_rows,
    human_size,
    parse_losses,
    plaintext_hits,
)
from demo.runner import BROKERS, NODES, REPO, DemoRun
from sealed.manifest import MANIFEST_PREFIX

__all__ = ["summarise"]

CORPUS = REPO / "deploy" / "config" / "corpus"
NODE_EVENTS = ("attest", "release", "renew")
MAX_SCAN = 64 << 20


# offline, on the log the config names (a state directory, or the PostgreSQL database)
_VERIFY_WITH_KEY = (
    'k=$(mktemp) && kms-broker audit public-key --config "$0" > "$k" && '
    'kms-broker audit verify --public-key "$k" --config "$0" --format json; rc=$?; '
    'rm -f "$k"; exit $rc'
)

def _verify_status(stdout: str, stderr: str) -> str:
    """``audit verify --format json``'s verdict as one line (its stderr if it printed none)."""
    try:
        doc = json.loads(stdout)
        return f"{doc['status']}: {doc['detail']}" if "status" in doc else str(doc["error"])
    except (ValueError, KeyError, TypeError):
        return stdout.strip() or stderr.strip()


def _heading(text: str) -> str:
    return f"\n== {text} " + "=" * max(0, 74 - len(text))


def _clock(ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"


def summarise(run: DemoRun, *, keep: bool) -> list[str]:
    h = run.harness
    out: list[str] = []
    say = out.append

    node_a = h.logs("node-a")
    losses = parse_losses(node_a)
    say(_heading("training (rank 0 on node-a, DDP over 2 nodes, gloo, bf16 autocast)"))
    if losses:
        say(ascii_plot(losses))
        first, last = losses[0][1], losses[-1][1]
        say(f"loss {first:.3f} at step {losses[0][0]} -> {last:.3f} at step {losses[-1][0]} "
            f"({(1 - last / first) * 100:.0f}% lower)")
    for node in NODES:
        for line in h.logs(node).splitlines():
            if "checkpoint " in line and "written" in line:
                say(f"{node}: {line[line.index('checkpoint '):]}")
            if "shred report" in line:
                say(f"{node}: {line[line.index('shred report'):]}")

    say(_heading("key releases (from both brokers' hash-chained audit logs)"))
    records = {b: run.audit(b) for b in BROKERS}
    rows = audit_rows(records, NODE_EVENTS)
    say(f"{'time':<12} {'broker':<8} {'event':<8} {'node':<8} {'outcome':<8} subject")
    renewals: dict[tuple[str, str], int] = {}
    for row in rows:
        node = row.actor.removeprefix("node:")
        if row.event == "renew":
            renewals[(row.broker, node)] = renewals.get((row.broker, node), 0) + 1
            continue
        if row.event == "attest" and row.outcome == "allowed" and any(
                r.event == "renew" and r.broker == row.broker and r.actor == row.actor
                and 0 <= r.time_ms - row.time_ms < 1000 for r in rows):
            continue  # the re-attestation that goes with a renewal
        say(f"{_clock(row.time_ms):<12} {row.broker:<8} {row.event:<8} "
            f"{node:<8} {row.outcome:<8} {row.subject}")
    if renewals:
        say("lease renewals (each after a fresh attestation): " + ", ".join(
            f"{node} at {broker} x{n}" for (broker, node), n in sorted(renewals.items())))
    policy = yaml.safe_load(run.read("tenant", "/var/lib/tenant/policy.yaml") or b"{}") or {}
    if policy:
        digests = policy.get("params", {}).get("allowed_code_digests", [])
        say(f"the tenant's release policy {policy.get('name')} (CEL rules checked at every "
            f"attestation): {', '.join(r['name'] for r in policy.get('rules', []))}; "
            f"approved trainer code: {', '.join(d[:16] + '...' for d in digests)}")
    denials = [r for r in audit_rows(records, {e for recs in records.values()
                                                for e in (x.get("event") for x in recs)})
               if r.outcome in ("denied", "error")]
    say(f"denials or errors: {len(denials)}" if denials else "denials or errors: none")
    for row in denials:
        say(f"  {row.broker}: {row.event} {row.actor}: {row.reason}")
    for broker in BROKERS:
        home = f"/var/lib/{broker}-broker"
        config = (str(h.host_path(f"{broker}-broker", f"{home}/broker.yaml")) if run.local
                  else f"{home}/broker.yaml")
        # verify with the broker's audit public key, so authenticity is checked too
        verified = h.exec(f"{broker}-broker", ["sh", "-c", _VERIFY_WITH_KEY, config])
        status = _verify_status(verified.stdout.decode(), verified.stderr.decode())
        where = (" (in PostgreSQL)" if broker == "provider" and run.settings.state == "postgres"
                 else "")
        say(f"{broker} broker audit log{where}: {len(records[broker])} records, "
            f"verify: {status}")

    in_s3 = run.settings.store == "s3"
    say(_heading("what storage holds (the shared store volume"
                 + (f" and the bucket {run.settings.dataset_store})" if in_s3 else ")")))
    corpus = {p.name: p.read_text() for p in sorted(CORPUS.iterdir()) if p.is_file()}
    objects: list[tuple[str, int, Callable[[], bytes]]] = [
        (name, size, lambda n=name: run.read("tenant", f"/store/{n}"))
        for name, size in run.list_files("tenant", "/store")]
    if in_s3:
        objects += [(f"s3:{name}", len(body), lambda b=body: b)
                    for name, body in sorted(run.s3_objects().items())]
    total_hits = 0
    first_shard, first_bytes = "", b""
    for name, size, body in objects:
        if name.startswith("jobs/"):
            kind = "job description (ids only)"
        elif name.startswith("checkpoints/"):
            kind = "encrypted checkpoint"
        elif name.removeprefix("s3:").startswith(MANIFEST_PREFIX):
            kind = "encrypted manifest"
        else:
            kind = "encrypted shard"
            first_shard = first_shard or name
        data = body()
        total_hits += plaintext_hits(data, corpus.values())
        if name == first_shard:
            first_bytes = data[:64]
        say(f"  {name:<58} {human_size(size):>10}  {kind}")
    say(f"objects: {len(objects)}; corpus lines found in any of them: {total_hits}")
    if run.local:
        written = [p for p in (run.directory / "compose").rglob("*")
                   if p.is_file() and not p.is_symlink()]
        leaked = [p for p in written
                  if plaintext_hits(p.read_bytes()[:MAX_SCAN], corpus.values())]
        say(f"every file the services wrote (volumes, logs, homes, temp dirs): {len(written)}; "
            f"containing corpus text: {len(leaked)}")
    if first_shard:
        say(f"\nfirst bytes of {first_shard} (what storage and the node operator see):")
        for offset in range(0, len(first_bytes), 16):
            chunk = first_bytes[offset:offset + 16]
            say(f"  {offset:04x}  {chunk.hex(' ')}")
    name, text = next(iter(corpus.items()))
    say(f"\nwhat the tenant has on its own machine (deploy/config/corpus/{name}):")
    say("  " + text.strip().splitlines()[0][:96])
    say("(the nodes decrypted it in memory only; it exists nowhere in the store or on their "
        "disks)")

    say(_heading("timings"))
    for phase, took in run.timings:
        say(f"  {phase:<10} {took:6.1f}s")
    say(f"  {'total':<10} {sum(t for _, t in run.timings):6.1f}s")

    say(_heading("logs"))
    if run.local:
        where = run.directory / "compose" / "logs"
        shown = where.relative_to(REPO) if where.is_relative_to(REPO) else where
        say(f"service logs: {shown}/<service>.log"
            + ("" if keep else "  (removed at the end; run with --keep to inspect them)"))
        if keep:
            say(f"volumes: {Path(shown).parent / 'volumes'}   code the services ran: "
                f"{Path(shown).parent.parent / 'image'}")
    else:
        say("service logs: docker compose logs <service>")
    return out
