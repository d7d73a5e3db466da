"""The demo's phases: docker-compose.yml brought up step by step through the harness.

Each phase starts the services it needs and waits for them (health checks, one-shots that
complete); a phase that fails raises :class:`PhaseFailed` naming the phase and carrying the
failing service's log tail. Files the summary needs (audit logs, the store) are read where
the services keep them: under the run directory with the local harness, through
``docker compose run`` under Docker.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compose import ComposeError, LocalHarness, ServiceFailed, open_harness
from compose.image import build_image_environment, image_environment_variables
from compose.ports import free_port_pairs
from demo.report import progress_line

__all__ = ["DemoRun", "PhaseFailed", "Settings", "heartbeat"]

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
PACKAGES = ("sealed", "kms_broker", "attest", "trainer", "compose")
BROKERS = ("provider", "tenant")
NODES = ("node-a", "node-b")
MAX_AUDIT_BYTES = 16 << 20
S3_DATASET = "s3://ct-data/corpus"  # the bucket the `s3` service creates, and a prefix
PROVIDER_CONFIG = "/var/lib/provider-broker/broker.yaml"
# lists every object under the store address in argv[1] (the tenant's own AWS files) as JSON
# {name: base64 of its bytes}; run in the tenant's environment, so under Docker as well
_LIST_S3 = (
    "import base64, json, sys\n"
    "from sealed.store import open_store\n"
    "store = open_store(sys.argv[1])\n"
    "print(json.dumps({n: base64.b64encode(store.get_range(n, 0, store.size(n))).decode()\n"
    "                  for n in store.list()}))\n"
)

Say = Callable[[str], None]
HEARTBEAT_S = 15.0  # a phase that runs longer says so this often, so a wait never looks hung


@contextmanager
def heartbeat(say: Say, label: str, interval_s: float = HEARTBEAT_S) -> Iterator[None]:
    """While the body runs, ``say`` a "still waiting" line every ``interval_s`` seconds
    (plain lines: the demo's output is read in terminals and CI logs alike)."""
    stop = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not stop.wait(interval_s):
            say(f"          {label}: still waiting ({time.monotonic() - start:.0f}s so far)")

    thread = threading.Thread(target=beat, name=f"heartbeat-{label}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval_s + 5)


class PhaseFailed(Exception):
    def __init__(self, phase: str, message: str) -> None:
        super().__init__(f"phase '{phase}' failed: {message}")
        self.phase = phase


@dataclass(frozen=True, kw_only=True)
class Settings:
    steps: int = 40
    lease_ttl_ms: int = 20000
    mode: str = "auto"  # auto | local | docker
    run_root: Path = REPO / "run"
    # sqlite: every broker embedded; postgres: the provider broker's state and audit log in
    # the compose `postgres` service (the tenant's own broker keeps SQLite)
    state: str = "sqlite"
    # local: the shared store volume; s3: the compose `s3` service (S3_BUCKET/S3_PREFIX)
    store: str = "local"

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= 100_000:
            raise ValueError("steps must be from 1 to 100000")
        if not 2000 <= self.lease_ttl_ms <= 3_600_000:
            raise ValueError("lease TTL must be from 2000 to 3600000 ms")
        if self.mode not in ("auto", "local", "docker"):
            raise ValueError("mode must be auto, local or docker")
        if self.state not in ("sqlite", "postgres"):
            raise ValueError("state must be sqlite or postgres")
        if self.store not in ("local", "s3"):
            raise ValueError("store must be local or s3")

    @property
    def profiles(self) -> tuple[str, ...]:
        return (("postgres",) if self.state == "postgres" else ()) + (
            ("s3",) if self.store == "s3" else ())

    @property
    def dataset_store(self) -> str:
        """The tenant's ``--store``: empty for the shared volume."""
        return S3_DATASET if self.store == "s3" else ""


@dataclass
class DemoRun:
    settings: Settings
    say: Say
    directory: Path = field(init=False)
    harness: Any = field(init=False)
    variables: dict[str, str] = field(init=False)
    timings: list[tuple[str, float]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.settings.run_root.mkdir(parents=True, exist_ok=True)
        self.directory = self.settings.run_root / f"demo-{stamp}"
        suffix = 1
        while self.directory.exists():
            suffix += 1
            self.directory = self.settings.run_root / f"demo-{stamp}-{suffix}"
        self.directory.mkdir(mode=0o700)
        provider, tenant, tpm_a, tpm_b, master, postgres, s3 = free_port_pairs(7)
        self.variables = {
            "PROVIDER_BROKER_PORT": str(provider), "TENANT_BROKER_PORT": str(tenant),
            "TPM_A_PORT": str(tpm_a), "TPM_A_CTRL_PORT": str(tpm_a + 1),
            "TPM_B_PORT": str(tpm_b), "TPM_B_CTRL_PORT": str(tpm_b + 1),
            "MASTER_PORT": str(master), "TRAIN_STEPS": str(self.settings.steps),
            "LEASE_TTL_MS": str(self.settings.lease_ttl_ms),
            "POSTGRES_PORT": str(postgres), "S3_PORT": str(s3),
            "PROVIDER_BROKER_STATE": self.settings.state,
            "DATASET_STORE": self.settings.dataset_store,
        }
        try:
            image = build_image_environment(self.directory / "image")
            self.harness = open_harness(
                COMPOSE_FILE, self.directory / "compose", mode=self.settings.mode,  # type: ignore[arg-type]
                variables=self.variables, image_env=image_environment_variables(image),
                profiles=self.settings.profiles,
            )
        except (OSError, ComposeError) as exc:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise PhaseFailed("prepare", str(exc)) from None

    # ------------------------------------------------------------------ plumbing
    @property
    def local(self) -> bool:
        return isinstance(self.harness, LocalHarness)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @contextmanager
    def phase(self, name: str, what: str) -> Iterator[None]:
        self.say(f"[{self.elapsed():6.1f}s] {name}: {what} ...")
        t0 = time.monotonic()
        try:
            with heartbeat(self.say, name):
                yield
        except ServiceFailed as exc:
            raise PhaseFailed(name, str(exc)) from None
        except ComposeError as exc:
            raise PhaseFailed(name, str(exc)) from None
        took = time.monotonic() - t0
        self.timings.append((name, took))
        self.say(f"[{self.elapsed():6.1f}s] {name}: done in {took:.1f}s")

    def read(self, service: str, path: str, limit: int = MAX_AUDIT_BYTES) -> bytes:
        """A file as ``service`` sees it at container path ``path`` (b"" when absent)."""
        if self.local:
            host = self.harness.host_path(service, path)
            if not host.exists():
                return b""
            if host.stat().st_size > limit:
                raise PhaseFailed("summary", f"{path} in {service} is over {limit} bytes")
            return host.read_bytes()
        result = self.harness.run(service, ["cat", path])
        return result.stdout[:limit] if result.returncode == 0 else b""

    def list_files(self, service: str, path: str) -> list[tuple[str, int]]:
        """``(relative name, size)`` of every file under ``path`` in ``service``."""
        if self.local:
            root = self.harness.host_path(service, path).resolve()
            return sorted((p.relative_to(root).as_posix(), p.stat().st_size)
                          for p in root.rglob("*") if p.is_file())
        result = self.harness.run(service, ["find", path, "-type", "f", "-printf", "%s %P\\n"])
        out = []
        for line in result.stdout.decode().splitlines():
            size, _, name = line.partition(" ")
            out.append((name, int(size)))
        return sorted(out)

    def audit(self, broker: str) -> list[dict[str, Any]]:
        if broker == "provider" and self.settings.state == "postgres":
            return self._pg_audit()
        raw = self.read(f"{broker}-broker", f"/var/lib/{broker}-broker/state/audit.log")
        return [json.loads(line) for line in raw.decode().splitlines() if line.endswith("}")]

    def _pg_audit(self) -> list[dict[str, Any]]:
        """The provider broker's audit log in the `postgres` service: read with the URL and
        password file its broker.yaml names (here), or ``kms-broker audit tail --config``
        next to the broker (Docker). Empty until the broker has created it."""
        if self.local:
            import psycopg
            import yaml

            config = self.harness.host_path("provider-broker", PROVIDER_CONFIG)
            dsn = yaml.safe_load(config.read_text())["state"]
            try:
                with psycopg.connect(dsn, connect_timeout=10) as db:
                    rows = db.execute("SELECT line FROM audit_log ORDER BY seq").fetchall()
            except psycopg.errors.UndefinedTable:
                return []
            except psycopg.OperationalError as exc:
                raise PhaseFailed("audit", f"the postgres service is unreachable: {exc}"
                                  ) from None
            return [json.loads(bytes(r[0])) for r in rows]
        done = self.harness.exec("provider-broker", [
            "kms-broker", "audit", "tail", "--config", PROVIDER_CONFIG, "--limit", "1000000",
            "--format", "json"])
        if done.returncode != 0:
            return []
        return list(json.loads(done.stdout)["records"])

    def s3_objects(self) -> dict[str, bytes]:
        """Every object of the dataset's S3 prefix, fetched with the tenant's AWS files."""
        import base64

        done = self.harness.run("tenant", ["python", "-c", _LIST_S3, S3_DATASET])
        if done.returncode != 0:
            raise PhaseFailed("summary", "listing the S3 bucket failed: "
                              + done.stderr.decode(errors="replace")[-500:])
        return {name: base64.b64decode(body)
                for name, body in json.loads(done.stdout).items()}

    def log_tail(self, service: str, lines: int = 25) -> str:
        try:
            return "\n".join(self.harness.logs(service).splitlines()[-lines:])
        except ComposeError:
            return ""

    # ------------------------------------------------------------------ phases
    def bring_up(self) -> None:
        h = self.harness
        with self.phase("bootstrap", "development CA, certificates, a SoftHSM token per "
                                     "broker, a software TPM per node"):
            h.up(["bootstrap"])
            h.wait_completed("bootstrap")
        extra = [s for s in ("postgres", "s3") if s in self.settings.profiles]
        where = {"postgres": "PostgreSQL (the provider broker's state and audit log)",
                 "s3": "an S3-compatible server (the dataset)"}
        with self.phase("services", "provider broker, tenant broker, TPMs of node-a and "
                                    "node-b" + "".join(f", {where[s]}" for s in extra)
                                    + " (waiting for their health checks)"):
            if "postgres" in extra:  # initialised and serving before anything else starts
                h.up(["postgres"], wait=True)
            h.up([*extra, "provider-broker", "tenant-broker", "tpm-a", "tpm-b"], wait=True)
        for broker in ("provider-broker", "tenant-broker"):
            for line in h.logs(broker).splitlines():
                if line.startswith("kms-broker ") and " listening on " in line:
                    self.say(f"          {broker}: {line.removeprefix('kms-broker ')}")
        with self.phase("enrol", "the operator enrols each node's TPM at both brokers"):
            h.up(["enrol"])
            h.wait_completed("enrol")
        with self.phase("tenant", "tenant key, registration, policy, encrypted upload of the "
                                  "sample corpus (one key share per broker), grant for 2 nodes"):
            h.up(["tenant"])
            h.wait_completed("tenant")
        for line in h.logs("tenant").splitlines():
            if line.startswith("tenant: ") and "progress" not in line:
                self.say(f"          {line}")

    def train(self) -> None:
        h = self.harness
        steps = self.settings.steps
        with self.phase("train", f"node-a and node-b attest to both brokers, receive their "
                                 f"sealed shares and train tiny-gpt together ({steps} steps)"):
            h.up(list(NODES))
            announced: set[tuple[str, str, str]] = set()
            printed_step = 0
            while True:
                for broker in BROKERS:
                    for r in self.audit(broker):
                        if r["event"] not in ("attest", "release") or not r["actor"].startswith(
                                "node:"):
                            continue
                        key = (broker, r["actor"], r["event"])
                        if key in announced:
                            continue
                        announced.add(key)
                        verb = {"attest": "attestation", "release": "share release"}[r["event"]]
                        self.say(f"          {r['actor'][5:]}: {verb} at the {broker} broker: "
                                 f"{r['outcome']}")
                for line in h.logs("node-a").splitlines():
                    progress = progress_line(line)
                    if progress is not None and progress[0] > printed_step:
                        step, total, loss, rate = progress
                        printed_step = step
                        self.say(f"          step {step:>4}/{total}  loss {loss:.4f}  {rate}")
                states = {s.name: s for s in h.ps()}
                done = [states[n] for n in NODES if states[n].state in ("exited", "stopped")]
                failed = [s for s in done if s.exit_code != 0]
                if failed:
                    h.wait_completed(failed[0].name)  # raises ServiceFailed with the log tail
                if len(done) == len(NODES):
                    break
                time.sleep(0.5)

    def tear_down(self, *, keep: bool) -> None:
        h = self.harness
        if not keep:
            try:
                h.down()
            finally:
                shutil.rmtree(self.directory, ignore_errors=True)
            return
        for status in h.ps():
            if status.state == "running":
                h.stop(status.name)

