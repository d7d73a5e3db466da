"""The compose deployment the start-up benchmarks (``bench_code_identity``,
``bench_first_step``) time ``trainer --attest`` in: two brokers, two swtpm nodes, the measured
image environment, run as local processes (compose/local.py).

``UNCHECKED_TRAINER`` is the trainer CLI with the code-identity guard's checks replaced by
stand-ins that check nothing, so a benchmark can show what the guard costs. It is a
benchmark-only script string, never importable as a module and never used outside
``benchmarks/``.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import yaml

from attest.code_digest import MANIFEST_NAME
from compose import LocalHarness
from compose.image import build_image_environment, image_environment_variables
from compose.ports import free_port_pairs

REPO = Path(__file__).resolve().parents[1]

UNCHECKED_TRAINER = f"""
import hashlib, sys
import trainer.guard as guard
digest = hashlib.sha256(open(sys.prefix + "/{MANIFEST_NAME}", "rb").read()).hexdigest()
guard.enter = lambda: None
guard.require_measured_module = lambda name: None
guard.code_claims = lambda: {{"code_digest": digest, "python_version": "3",
                              "torch_version": "unchecked"}}
from trainer.cli import main
sys.argv = ["trainer", *sys.argv[1:]]
sys.exit(main())
"""


def deploy(base: Path, steps: int) -> tuple[LocalHarness, dict[str, str]]:
    """A harness for the deployment under ``base`` (not started) and its variables."""
    provider, tenant, tpm_a, tpm_b, master = free_port_pairs(5)
    variables = {
        "PROVIDER_BROKER_PORT": str(provider), "TENANT_BROKER_PORT": str(tenant),
        "TPM_A_PORT": str(tpm_a), "TPM_A_CTRL_PORT": str(tpm_a + 1),
        "TPM_B_PORT": str(tpm_b), "TPM_B_CTRL_PORT": str(tpm_b + 1),
        "MASTER_PORT": str(master), "TRAIN_STEPS": str(steps), "LEASE_TTL_MS": "60000",
    }
    image = build_image_environment(base / "image")
    harness = LocalHarness(REPO / "docker-compose.yml", base / "run", variables=variables,
                           image_env=image_environment_variables(image))
    return harness, variables


def children_cpu() -> float:
    """CPU seconds (user + system) of every waited-for child process so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def enrolled_node(harness: LocalHarness, variables: dict[str, str],
                  steps: int) -> tuple[Path, dict[str, Any]]:
    """Start the brokers, enrol the nodes, let the tenant upload and grant, and run node-a's
    job once through ``deploy/bin/node.py`` (which also renders its ``job.yaml``); returns
    node-a's home directory and that job, set to ``steps`` steps with a log line per step."""
    harness.up(["enrol", "tenant"])
    harness.wait_all_completed(["bootstrap", "enrol", "tenant"])
    root = str(harness.host_path("node-a", "/"))
    warm = harness.run("node-a", [
        "python", f"{root}/deploy/bin/node.py", f"--root={root}", "--node=node-a",
        f"--tcti=swtpm:host=127.0.0.1,port={variables['TPM_A_PORT']}",
        f"--job-info={root}/store/jobs/job-1.json", f"--steps={steps}",
        f"--broker=127.0.0.1:{variables['PROVIDER_BROKER_PORT']}",
        f"--broker=127.0.0.1:{variables['TENANT_BROKER_PORT']}"])
    if warm.returncode != 0:
        raise RuntimeError(f"warm-up run failed: {warm.stderr.decode()[-2000:]}")
    home = harness.host_path("node-a", "/var/lib/node-a")
    job = yaml.safe_load((home / "job.yaml").read_text())
    job.update(steps=steps, log_interval=1,
               checkpoint={**job["checkpoint"], "dir": str(home / "bench-checkpoints")})
    return home, job
