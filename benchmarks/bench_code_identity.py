"""What the code identity checks cost: time to the first training step of `trainer --attest`.

The real path: docker-compose.yml's deployment run by the local harness (two brokers on
SoftHSM, swtpm, the image as the measured environment of compose/image.py), and node-a's
trainer started as deploy/bin/node.py starts it (``python -I -B -m trainer --attest``). Each
run is timed from its start to the log line ``step 1/``: interpreter start, imports, process
hardening, TPM quotes, attestation and release at both brokers, data pipeline, first step.

Three kinds of run, on one deployment:

* **checked**: ``trainer --attest`` as shipped: the guard checks the interpreter, every
  imported module (source and bytecode read once, hashed, executed as checked), every
  extension module and, before the first broker is asked, every mapped library (torch's
  400 MB among them) against the manifest. The digests of the files it hashed whole are kept
  in the trusted cache beside the manifest (attest/digest_cache.py) by the run before, as on
  a node that has started the trainer before.
* **unchecked**: the same command with the guard replaced, for this benchmark only, by
  stand-ins that attest the stored manifest's digest without checking anything (what the
  trainer did before code identity was enforced). Everything else is the same: the same
  interpreter flags, job, deployment, imports (``trainer.guard`` included) and steps.
* **checked, cold cache**: checked with the cache removed first (a node's first start):
  everything is hashed, the mapped libraries on a background thread.

**How the runs are paired, and why.** One run takes about 3.5 s and, on the 2-core machine
where the brokers, swtpm and the trainer share the cores, single runs of the same command
differ by 10 to 40 % (page cache, the brokers' and swtpm's own work, anything else running):
more than the 10 % the goal allows and far more than what the checks cost (about 3 % of the
CPU). Comparing medians of separate runs, or rounds of one run each, lets that noise decide
the goal. So:

1. one run of each kind first, not counted (the first runs after the deployment started pay
   for the page cache and the brokers' first requests, whichever kind runs first);
2. then rounds, each four runs in an ABBA pattern (checked, unchecked, unchecked, checked;
   the next round BAAB), and one cold-cache run after them. The round's ratio is the two
   checked runs' sum over the two unchecked runs' sum: both pairs sit, on average, at the
   same point in time, so a steady drift of the machine's speed during the round (load that
   comes or goes) cancels out of the ratio, and alternating ABBA with BAAB cancels what the
   first run of a round pays;
3. the estimate is the **median of the rounds' ratios** (a round hit by a burst of load moves
   the median little), printed with its range. The same ratio is printed for the CPU seconds
   of the same runs (the trainer process and its children), which a busy machine disturbs
   much less than wall time, so a wall ratio far from the CPU ratio says the machine was busy.

Full mode runs 9 rounds (45 timed runs), quick mode 3. Both kinds do the same work in the
same number of runs except the checks themselves: nothing here spares the checked runs any
cost (the cache they find was filled by the deployment's first trainer run through
deploy/bin/node.py, as a node's previous start fills it, and each cold run fills it again).

Goal: checked / unchecked <= 1.10, the median of the rounds' ratios of the time to the first
step; the cold-cache ratio (its run over the mean of the round's unchecked runs) is printed
beside it. Also printed, from the guard's own log line (``trainer.guard.CheckCost``): files and
bytes hashed by the importing thread and by the background thread, the CPU seconds of the
start-up check, of the check before keys and of the background thread, the seconds spent in
the checked imports until the first key (imports after it, torch's lazy ones during the first
steps, are not in the line), how long the check before keys waited for the background thread,
how many digests came from the cache, and how many scans of the mappings the background thread
made (with the cache, none after the first: no extension module needs its libraries hashed).
"""

from __future__ import annotations

import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from attest.code_digest import CACHE_NAME
from benchmarks._deployment import (
    UNCHECKED_TRAINER,
    children_cpu,
    deploy,
    enrolled_node,
)
from compose import LocalHarness

GOAL = 1.10

_COST = re.compile(
    r"code identity checked: (?P<files>\d+) files \((?P<mb>[\d.]+) MB\) hashed while "
    r"importing, (?P<bg_files>\d+) libraries \((?P<bg_mb>[\d.]+) MB\) in the background; "
    r"CPU s: start-up (?P<startup>[\d.]+), before keys (?P<before_keys>[\d.]+), background "
    r"(?P<background>[\d.]+); s in checked imports (?P<imports>[\d.]+); waited "
    r"(?P<waited>[\d.]+) s for the background; (?P<cached>\d+) digests from the trusted cache; "
    r"(?P<scans>\d+) scans of the mappings in the background")
_COST_ROWS = (
    ("MB hashed while importing", "mb"), ("MB hashed in the background", "bg_mb"),
    ("CPU s, start-up check (manifest, interpreter, modules so far)", "startup"),
    ("s in checked imports until the first key (read + hash + look-up)", "imports"),
    ("CPU s, check before keys (mapped libraries)", "before_keys"),
    ("CPU s, background hashing (second core)", "background"),
    ("wall s, waited for the background before keys", "waited"),
    ("digests taken from the trusted cache", "cached"),
    ("scans of the mappings on the background thread", "scans"),
)


def _first_step(harness: LocalHarness, argv: list[str]) -> tuple[float, float, str]:
    """Seconds from start to the ``step 1/`` line (its log timestamp, millisecond
    resolution), the CPU seconds of the whole run (two steps and the shred), and the
    output."""
    cpu = children_cpu()
    start = time.time()
    result = harness.run("node-a", argv)
    cpu = children_cpu() - cpu
    output = (result.stdout + result.stderr).decode(errors="replace")
    match = re.search(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) rank 0 INFO trainer: step 1/",
                      output, re.MULTILINE)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"trainer run failed ({result.returncode}):\n{output[-3000:]}")
    stamp = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S"))
    return stamp + int(match.group(2)) / 1000 - start, cpu, output


_LABELS = {"checked": "checked", "cold": "checked, cold cache", "unchecked": "unchecked"}


def round_order(i: int) -> tuple[str, ...]:
    """Round ``i``'s runs: ABBA, then BAAB the next round, each followed by the cold run."""
    a, b = ("checked", "unchecked") if i % 2 == 0 else ("unchecked", "checked")
    return (a, b, b, a, "cold")


def paired_ratio(runs: list[tuple[str, float]], kind: str, base: str = "unchecked") -> float:
    """A round's ratio: the mean of its ``kind`` runs over the mean of its ``base`` runs."""
    a = [v for k, v in runs if k == kind]
    b = [v for k, v in runs if k == base]
    return (sum(a) / len(a)) / (sum(b) / len(b))


def spread(values: list[float]) -> str:
    return (f"{statistics.median(values):.3f}x (range {min(values):.3f}-{max(values):.3f}, "
            f"{len(values)} rounds)")


def main(quick: bool = False) -> None:
    rounds = 3 if quick else 9
    times: dict[str, list[float]] = {name: [] for name in _LABELS}
    cpus: dict[str, list[float]] = {name: [] for name in _LABELS}
    ratios: dict[str, list[float]] = {"checked": [], "cold": []}
    cpu_ratios: dict[str, list[float]] = {"checked": [], "cold": []}
    costs: dict[str, list[dict[str, float]]] = {"checked": [], "cold": []}
    with tempfile.TemporaryDirectory(prefix="bench-code-identity-") as tmp:
        base = Path(tmp)
        harness, variables = deploy(base, steps=2)
        try:
            home, job = enrolled_node(harness, variables, steps=2)
            ckpt = Path(job["checkpoint"]["dir"])
            (home / "bench.yaml").write_text(yaml.safe_dump(job))
            args = ["--attest", "--job", str(home / "bench.yaml"), "--node-id", "node-a"]
            python = str(base / "image" / "bin" / "python")
            commands = {
                "checked": [python, "-I", "-B", "-m", "trainer", *args],
                "cold": [python, "-I", "-B", "-m", "trainer", *args],
                "unchecked": [python, "-I", "-B", "-c", UNCHECKED_TRAINER, *args],
            }
            cache = base / "image" / CACHE_NAME

            def run(name: str) -> tuple[float, float, str]:
                shutil.rmtree(ckpt, ignore_errors=True)  # each run starts at step 0
                if name == "cold":
                    cache.unlink(missing_ok=True)  # a first start: nothing cached yet
                return _first_step(harness, commands[name])

            warm = {name: run(name)[0] for name in ("checked", "unchecked")}
            print(f"warm-up (not counted): first step checked {warm['checked']:.2f} s, "
                  f"unchecked {warm['unchecked']:.2f} s", flush=True)
            for i in range(rounds):
                wall: list[tuple[str, float]] = []
                cpu: list[tuple[str, float]] = []
                for name in round_order(i):
                    seconds, cpu_s, output = run(name)
                    if name != "unchecked":
                        found = _COST.search(output)
                        if found is None:
                            raise RuntimeError(f"the {name} run logged no code identity cost")
                        costs[name].append({k: float(v) for k, v in found.groupdict().items()})
                    times[name].append(seconds)
                    cpus[name].append(cpu_s)
                    wall.append((name, seconds))
                    cpu.append((name, cpu_s))
                for name in ("checked", "cold"):
                    ratios[name].append(paired_ratio(wall, name))
                    cpu_ratios[name].append(paired_ratio(cpu, name))
                pattern = "ABBA" if i % 2 == 0 else "BAAB"
                print(f"round {i + 1} ({pattern}): first step "
                      + ", ".join(f"{n} {v:.2f}" for n, v in wall)
                      + f" s; ratio {ratios['checked'][-1]:.3f} (CPU "
                      f"{cpu_ratios['checked'][-1]:.3f}), cold {ratios['cold'][-1]:.3f} (CPU "
                      f"{cpu_ratios['cold'][-1]:.3f})", flush=True)
        finally:
            harness.down()
    for name, values in times.items():
        print(f"{_LABELS[name]:>22}: time to first step median {statistics.median(values):.2f} s "
              f"(min {min(values):.2f}, max {max(values):.2f}; CPU s per run median "
              f"{statistics.median(cpus[name]):.2f}; {len(values)} runs)")
    print("where the checks' cost goes (trainer.guard's log line, median of "
          f"{len(costs['checked'])} and {len(costs['cold'])} runs):")
    print(f"  {'':<64} {'checked':>8} {'cold':>8}")
    for label, key in _COST_ROWS:
        print(f"  {label:<64} "
              + " ".join(f"{statistics.median(c[key] for c in costs[n]):8.3f}"
                         for n in ("checked", "cold")))
    for name in ("cold", "checked"):
        print(f"CPU {_LABELS[name]} / unchecked, median of the rounds' ratios: "
              f"{spread(cpu_ratios[name])}")
        print(f"{_LABELS[name]} / unchecked, median of the rounds' ratios: "
              f"{spread(ratios[name])}")
    ratio = statistics.median(ratios["checked"])
    print(f"goal code_identity_startup_overhead: {ratio:.3f}x (target <= {GOAL:.2f}x) "
          f"{'met' if ratio <= GOAL else 'missed'}")
