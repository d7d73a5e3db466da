"""What the code identity checks cost: time to the first training step of `trainer --attest`.

The real path: docker-compose.yml's deployment run by the local harness (two brokers on
SoftHSM, swtpm, the image as the measured environment of compose/image.py), and node-a's
trainer started as deploy/bin/node.py starts it (``python -I -m trainer --attest``). Each
run is timed from its start to the log line ``step 1/``: interpreter start, imports, process
hardening, TPM quotes, attestation and release at both brokers, data pipeline, first step.

Side by side, in rounds of three adjacent runs (rotating which goes first), on one
deployment:

* **checked**: ``trainer --attest`` as shipped: the guard checks the interpreter, every
  imported module (source and bytecode read once, hashed, executed as checked), every
  extension module and, before the first broker is asked, every mapped library (torch's
  400 MB among them) against the manifest. The digests of the files it hashed whole are kept
  in the trusted cache beside the manifest (attest/digest_cache.py) by the run before, as on
  a node that has started the trainer before.
* **checked, cold cache**: the same with the cache removed first (a node's first start):
  everything is hashed, the mapped libraries on a background thread.
* **unchecked**: the same command with the guard replaced, for this benchmark only, by
  stand-ins that attest the stored manifest's digest without checking anything (what the
  trainer did before code identity was enforced).

Goal: checked / unchecked <= 1.10 (median of the per-round ratios of the time to the first
step); the cold-cache ratio is printed beside it. Also printed: the CPU seconds of each whole
run (the trainer process, as the harness's child), whose ratio a busy machine disturbs much
less than wall time, and where the checks' cost goes, from the guard's own log line
(``trainer.guard.CheckCost``): files and bytes hashed by the importing thread and by the
background thread, the CPU seconds of the start-up check, of the check before keys and of the
background thread, the seconds spent in the checked imports until the first key (imports
after it, torch's lazy ones during the first steps, are not in the line), how long the check
before keys waited for the background thread, and how many digests came from the cache.
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
    r"(?P<waited>[\d.]+) s for the background; (?P<cached>\d+) digests from the trusted cache")
_COST_ROWS = (
    ("MB hashed while importing", "mb"), ("MB hashed in the background", "bg_mb"),
    ("CPU s, start-up check (manifest, interpreter, modules so far)", "startup"),
    ("s in checked imports until the first key (read + hash + look-up)", "imports"),
    ("CPU s, check before keys (mapped libraries)", "before_keys"),
    ("CPU s, background hashing (second core)", "background"),
    ("wall s, waited for the background before keys", "waited"),
    ("digests taken from the trusted cache", "cached"),
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


# each round runs the three once, in a rotating order
_ORDERS = (("checked", "cold", "unchecked"), ("unchecked", "checked", "cold"),
           ("cold", "unchecked", "checked"))
_LABELS = {"checked": "checked", "cold": "checked, cold cache", "unchecked": "unchecked"}


def main(quick: bool = False) -> None:
    pairs = 3 if quick else 7
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
            for i in range(pairs):
                order = _ORDERS[i % len(_ORDERS)]
                pair, cpu = {}, {}
                for name in order:
                    shutil.rmtree(ckpt, ignore_errors=True)  # each run starts at step 0
                    if name == "cold":
                        cache.unlink(missing_ok=True)  # a first start: nothing cached yet
                    pair[name], cpu[name], output = _first_step(harness, commands[name])
                    if name != "unchecked":
                        found = _COST.search(output)
                        if found is None:
                            raise RuntimeError(f"the {name} run logged no code identity cost")
                        costs[name].append({k: float(v) for k, v in found.groupdict().items()})
                    times[name].append(pair[name])
                    cpus[name].append(cpu[name])
                for name in ("checked", "cold"):
                    ratios[name].append(pair[name] / pair["unchecked"])
                    cpu_ratios[name].append(cpu[name] / cpu["unchecked"])
                print(f"round {i + 1}: first step checked {pair['checked']:.2f} s, cold cache "
                      f"{pair['cold']:.2f} s, unchecked {pair['unchecked']:.2f} s, ratios "
                      f"{ratios['checked'][-1]:.3f} / {ratios['cold'][-1]:.3f}; CPU checked "
                      f"{cpu['checked']:.2f} s, cold {cpu['cold']:.2f} s, unchecked "
                      f"{cpu['unchecked']:.2f} s", flush=True)
        finally:
            harness.down()
    for name, values in times.items():
        print(f"{_LABELS[name]:>22}: time to first step median {statistics.median(values):.2f} s "
              f"(min {min(values):.2f}, max {max(values):.2f}; CPU s per run median "
              f"{statistics.median(cpus[name]):.2f}; {len(values)} runs)")
    print("where the checks' cost goes (trainer.guard's log line, median of "
          f"{pairs} runs each):")
    print(f"  {'':<64} {'checked':>8} {'cold':>8}")
    for label, key in _COST_ROWS:
        print(f"  {label:<64} "
              + " ".join(f"{statistics.median(c[key] for c in costs[n]):8.3f}"
                         for n in ("checked", "cold")))
    for name in ("cold", "checked"):
        print(f"CPU {_LABELS[name]} / unchecked (median of {pairs} ratios): "
              f"{statistics.median(cpu_ratios[name]):.3f}x")
        print(f"{_LABELS[name]} / unchecked (median of {pairs} ratios): "
              f"{statistics.median(ratios[name]):.3f}x")
    ratio = statistics.median(ratios["checked"])
    print(f"goal code_identity_startup_overhead: {ratio:.3f}x (target <= {GOAL:.2f}x) "
          f"{'met' if ratio <= GOAL else 'missed'}")
