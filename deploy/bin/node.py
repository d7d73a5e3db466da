"""Entry point of a training node (services ``node-a`` and ``node-b`` in docker-compose.yml).

Renders this node's job file from ``/deploy/config/job.yaml.tmpl`` (its own certificate,
TPM and paths; the job, tenant and dataset ids from the job description the tenant published
in the store; no manifest name unless the description pins ``key_version`` and ``manifest``:
the trainer learns it from the brokers, which have it on record from the upload, and checks
the store for it before any key is released, exit 8 when it is missing or a pinned one does
not match), records its
pid for the healthcheck (``python -m compose.probe pidfile``), and replaces itself with the
trainer: torchrun (through ``trainer.launch``, which exits 128 + N when the job is stopped by
signal N) with a static rendezvous at ``--master`` when the job spans several nodes, else
``trainer`` directly. Always ``--attest``: the only way the
trainer obtains the dataset key.

Container paths are ``--root`` + the path, as in bootstrap.py (``${CT_ROOT:-}``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import string
import sys
from pathlib import Path

MAX_JOB_INFO_BYTES = 64 * 1024


def _store(published: object, root: str) -> str:
    """The dataset's store: the s3:// address the tenant published, else the shared volume."""
    if published is None:
        return f"{root}/store"
    # rendered into YAML: only what an s3:// address can hold (the job config checks the rest)
    if not isinstance(published, str) or not re.fullmatch(
            r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._/-]{0,256})?", published):
        raise SystemExit(f"node: the job description names an unusable store {published!r:.80}")
    return published


def _where(spec: str) -> str:
    """The job file's address key of one ``--broker``: one address, or a replica set's."""
    replicas = [a.strip() for a in spec.split("|")]
    if not all(re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+:\d{1,5}", a) for a in replicas):
        raise SystemExit(f"node: --broker {spec!r:.80} is not HOST:PORT[|HOST:PORT...]")
    if len(replicas) == 1:
        return f'address: "{replicas[0]}"'
    return "addresses: [" + ", ".join(f'"{a}"' for a in replicas) + "]"


def _pinned(info: dict) -> str:
    """``, key_version: N, manifest: NAME`` when the job description pins them, else ""."""
    out = ""
    if info.get("key_version") is not None:
        version = info["key_version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise SystemExit(f"node: the job description names a bad key_version {version!r:.40}")
        out += f", key_version: {version}"
    if info.get("manifest") is not None:
        manifest = info["manifest"]
        # rendered into YAML: only what an object name can hold (the job config checks more)
        if not isinstance(manifest, str) or not re.fullmatch(r"[A-Za-z0-9._/-]{1,256}", manifest):
            raise SystemExit(f"node: the job description names a bad manifest {manifest!r:.80}")
        out += f", manifest: {manifest}"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", default="", help="prefix of every container path (CT_ROOT)")
    parser.add_argument("--node", required=True, help="this node's enrolled id")
    parser.add_argument("--tcti", required=True, help="this node's TPM (swtpm:host=..,port=..)")
    parser.add_argument("--broker", action="append", required=True, metavar="HOST:PORT",
                        help="brokers in share order; a broker's replicas joined by |")
    parser.add_argument("--job-info", required=True, help="JSON the tenant published")
    parser.add_argument("--rank", type=int, default=0, help="this node's rank")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes in the job")
    parser.add_argument("--master", default="", help="HOST:PORT of rank 0's rendezvous")
    parser.add_argument("--steps", type=int, default=40, help="training steps")
    parser.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                        help="local ranks (local rank 0 attests for the node and hands the key "
                             "to the others, trainer/local_keys.py)")
    args = parser.parse_args(argv)
    if not 1 <= args.nproc_per_node <= 64:
        parser.error("--nproc-per-node must be in [1, 64]")
    if not 0 <= args.rank < args.nnodes:
        parser.error(f"--rank must be in [0, {args.nnodes})")
    if args.nnodes > 1 and ":" not in args.master:
        parser.error("--master HOST:PORT is needed for a job over several nodes")

    root = args.root.rstrip("/")
    home = Path(f"{root}/var/lib/{args.node}")
    info_path = Path(args.job_info)
    if info_path.stat().st_size > MAX_JOB_INFO_BYTES:
        raise SystemExit(f"node: {info_path} is larger than {MAX_JOB_INFO_BYTES} bytes")
    info = json.loads(info_path.read_text())
    tls = home / "tls"
    brokers = "\n".join(
        f"  - {{{_where(spec)}, ca: {tls}/ca.pem, cert: {tls}/node-{args.node}.pem, "
        f"key: {tls}/node-{args.node}.key}}"
        for spec in args.broker
    )
    template = string.Template(Path(f"{root}/deploy/config/job.yaml.tmpl").read_text())
    job = template.substitute(
        job_id=info["job_id"], tenant_id=info["tenant_id"], dataset_id=info["dataset_id"],
        store=_store(info.get("store"), root), pinned=_pinned(info),
        brokers=brokers, node_id=args.node, tcti=args.tcti, steps=args.steps,
        checkpoints=f"{root}/store/checkpoints/{info['job_id']}",
    )
    job_file = home / "job.yaml"
    job_file.write_text(job)
    (home / "trainer.pid").write_text(f"{os.getpid()}\n")
    # -I (isolated): no PYTHON* variable, user site or current directory reaches the trainer
    # from its first instruction, and -B: it writes no bytecode into the measured image;
    # torchrun starts each worker the same way (--no-python), so every process that receives
    # a key runs only measured code (trainer/guard.py).
    trainer = [sys.executable, "-I", "-B", "-m", "trainer", "--attest", "--job", str(job_file),
               "--node-id", args.node]
    nproc = ["--nproc-per-node", str(args.nproc_per_node)]
    if args.nnodes > 1:
        host, _, port = args.master.rpartition(":")
        argv_exec = [
            sys.executable, "-I", "-B", "-m", "trainer.launch", "--nnodes", str(args.nnodes),
            "--node-rank", str(args.rank), *nproc, "--master-addr", host,
            "--master-port", port, "--no-python", *trainer,
        ]
    elif args.nproc_per_node > 1:
        argv_exec = [sys.executable, "-I", "-B", "-m", "trainer.launch", "--standalone", *nproc,
                     "--no-python", *trainer]
    else:
        argv_exec = trainer
    print(f"node {args.node}: rank {args.rank}/{args.nnodes}, job {info['job_id']}, "
          f"starting the trainer", flush=True)
    os.execv(sys.executable, argv_exec)  # noqa: S606 - fixed argv, no shell
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
