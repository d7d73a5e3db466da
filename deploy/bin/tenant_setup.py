"""Tenant one-shot (service ``tenant``): what the tenant does on its own machine.

1. ``kms-broker tenant init``: its Ed25519 signing key (kept in the ``tenant`` volume).
2. ``kms-broker tenant register`` at both brokers (one share each: dual control).
3. The release policy: ``/policies/dev-swtpm.yaml`` with the code digest of this image
   allowed (``attest code-digest`` over the image's environment: computed offline, the
   trainer is not run) and the job's model pinned (``--job-model``), ``kms-broker policy
   put`` at both.
4. ``kms-broker dataset upload``: the sample corpus encrypted into the shared store (or into
   ``--store s3://BUCKET/PREFIX``).
5. ``kms-broker grant create`` for the job, for ``--max-nodes`` nodes, at both brokers.
6. Publishes the job description (ids only, no secret) to ``/store/jobs/<job>.json`` for
   the nodes. Not the manifest's name: the brokers have it on record from the upload and
   tell each node's trainer (trainer/dataset_check.py).

Container paths are ``--root`` + the path, as in bootstrap.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml


def _run(*argv: str, quiet: bool = False) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"tenant: `{' '.join(argv[:3])}` failed: {result.stderr.strip()}")
    if not quiet:
        for line in result.stdout.strip().splitlines():
            print(f"tenant: {line}", flush=True)
    return result.stdout


def _json(*argv: str) -> dict:
    """A ``kms-broker ... --format json`` command's result document."""
    doc = json.loads(_run(*argv, "--format", "json", quiet=True))
    if not isinstance(doc, dict):
        raise SystemExit(f"tenant: `{' '.join(argv[:3])}` printed no JSON object")
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", default="", help="prefix of every container path (CT_ROOT)")
    parser.add_argument("--tenant", default="acme")
    parser.add_argument("--dataset", default="corpus")
    parser.add_argument("--job", default="job-1")
    parser.add_argument("--max-nodes", type=int, default=2)
    parser.add_argument("--corpus", required=True, help="plaintext corpus to upload")
    parser.add_argument("--policy", required=True, help="policy YAML to start from")
    parser.add_argument("--broker", action="append", required=True, metavar="HOST:PORT")
    parser.add_argument("--store", default="",
                        help="where the dataset goes: s3://BUCKET/PREFIX (AWS configuration "
                             "from the environment), or empty for the shared /store volume")
    parser.add_argument("--job-model", default="tiny-gpt",
                        help="the only model.name the policy lets the job train")
    args = parser.parse_args(argv)
    root = args.root.rstrip("/")
    home = Path(f"{root}/var/lib/tenant")
    store = Path(f"{root}/store")
    key = home / "tenant.key"
    tls = ["--ca", str(home / "ca.pem"), "--cert", str(home / f"tenant-{args.tenant}.pem"),
           "--key", str(home / f"tenant-{args.tenant}.key")]
    brokers = [arg for b in args.broker for arg in ("--broker", b)]
    who = ["--tenant", args.tenant, *brokers, *tls]

    if not key.exists():
        _run("kms-broker", "tenant", "init", "--key", str(key))
    for row in _json("kms-broker", "tenant", "register", "--tenant-key", str(key), *who)[
            "brokers"]:
        print(f"tenant: {row['broker']}: registered, KEK v{row['kek_version']}", flush=True)

    code_digest = _run("attest", "code-digest", quiet=True).strip()
    policy = yaml.safe_load(Path(args.policy).read_text())
    params = policy.setdefault("params", {})
    params["allowed_code_digests"] = [code_digest]
    params["allowed_job_models"] = [args.job_model]
    policy_file = home / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(policy, sort_keys=False))
    put = _json("kms-broker", "policy", "put", str(policy_file), *who)
    digests = {row["digest"] for row in put["brokers"]}
    if digests != {put["digest"]}:
        raise SystemExit(f"tenant: brokers report different policy digests: {sorted(digests)}")
    digest = put["digest"]
    print(f"tenant: policy {put['policy']} {digest} at {len(put['brokers'])} broker(s)",
          flush=True)

    dataset_store = args.store or str(store)
    uploaded = _json("kms-broker", "dataset", "upload", args.corpus, "--store", dataset_store,
                     "--dataset", args.dataset, "--tenant-key", str(key), *who)
    manifest = uploaded["manifest"]
    print(f"tenant: uploaded {uploaded['num_records']} records in {uploaded['num_shards']} "
          f"shards; manifest {manifest}; shares at {', '.join(uploaded['holders'])}",
          flush=True)

    grant = _json("kms-broker", "grant", "create", "--dataset", args.dataset, "--job",
                  args.job, "--policy-digest", digest, "--max-nodes", str(args.max_nodes),
                  "--grant-id", f"grant-{args.job}", "--tenant-key", str(key), *who)
    print(f"tenant: grant {grant['grant_id']} at {len(grant['brokers'])} broker(s)", flush=True)

    jobs = store / "jobs"
    jobs.mkdir(exist_ok=True)
    (jobs / f"{args.job}.json").write_text(json.dumps({
        "job_id": args.job, "tenant_id": args.tenant, "dataset_id": args.dataset,
        "grant_id": f"grant-{args.job}",
        **({"store": args.store} if args.store else {}),
    }, indent=1))
    print(f"tenant: job {args.job} published", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
