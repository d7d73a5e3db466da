"""``python -m fuzz``: seed, run and replay the fuzz harnesses (``make fuzz`` runs ``run``).

    python -m fuzz list                      every harness and what it fuzzes
    python -m fuzz seed [NAME ...]           (re)write fuzz/corpus/NAME/seed-* from
                                             ../shared/vectors and the project's encoders
    python -m fuzz run [NAME ...] --seconds N [--runs R] [--keep K]
                                             fuzz each harness for N seconds (one process
                                             each, libFuzzer via atheris), print its line
                                             ``goal fuzz_NAME_crashes: C (E execs in S s ...)``;
                                             --runs R: stop a harness after R executions
                                             (the campaign: --seconds 1800 --runs 1000000);
                                             --keep K: keep at most K of the inputs the
                                             run found (new coverage) in fuzz/corpus
    python -m fuzz replay [NAME ...]         run every corpus and regression input once
                                             (no atheris needed; what ``make test`` does)

A crash's input is written to run/fuzz/NAME/crash-*, with the log beside it
(run/fuzz/NAME/fuzz.log). Exit status: 0 when no harness crashed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fuzz.base import check, repo_root

TARGET_EXECS = 1_000_000
TARGET_SECONDS = 1800  # the fallback for slow harnesses: what 30 minutes reach


def corpus_dir(name: str) -> Path:
    return repo_root() / "fuzz" / "corpus" / name


def regression_dir(name: str) -> Path:
    return repo_root() / "tests" / "fuzz" / "regressions" / name


def _names(args: argparse.Namespace) -> list[str]:
    from fuzz.harnesses import all_harnesses

    known = all_harnesses()
    unknown = [n for n in args.names if n not in known]
    if unknown:
        sys.exit(f"fuzz: unknown harness {', '.join(unknown)}; see `python -m fuzz list`")
    return args.names or list(known)


def cmd_list(args: argparse.Namespace) -> int:
    from fuzz.harnesses import all_harnesses

    for h in all_harnesses().values():
        print(f"{h.name:18} {h.parser}")
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    from fuzz.harnesses import get

    for name in _names(args):
        d = corpus_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("seed-*"):
            old.unlink()
        n = 0
        for label, data in get(name).seeds():
            (d / f"seed-{label}").write_bytes(data)
            n += 1
        print(f"{name}: {n} seeds")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from fuzz.harnesses import get

    for name in _names(args):
        h = get(name)
        files = sorted(corpus_dir(name).glob("*")) + sorted(regression_dir(name).glob("*"))
        for f in files:
            check(h, f.read_bytes())
        print(f"{name}: {len(files)} inputs replayed")
    return 0


_EXECS = re.compile(rb"stat::number_of_executed_units:\s*(\d+)")
_PROGRESS = re.compile(rb"^#(\d+)\s", re.M)
_DONE = re.compile(rb"Done (\d+) runs")


def executions(log: bytes) -> int:
    """The number of executions libFuzzer reported (final stats, else the last status)."""
    for pattern in (_EXECS, _DONE):
        found = pattern.findall(log)
        if found:
            return int(found[-1])
    found = _PROGRESS.findall(log)
    return int(found[-1]) if found else 0


def _run_one(name: str, seconds: int, keep: int | None, jobs_dir: Path,
             runs: int | None = None) -> tuple[int, int]:
    from fuzz.harnesses import get

    h = get(name)
    out = repo_root() / "run" / "fuzz" / name
    out.mkdir(parents=True, exist_ok=True)
    work = jobs_dir / name
    shutil.copytree(corpus_dir(name), work, dirs_exist_ok=True)
    for f in regression_dir(name).glob("*"):
        shutil.copy(f, work / f"regression-{f.name}")
    cmd = [sys.executable, "-m", "fuzz.worker", name, str(work),
           f"-max_total_time={seconds}", f"-max_len={h.max_len}", "-rss_limit_mb=2048",
           "-timeout=120", f"-artifact_prefix={out}/", "-print_final_stats=1"]
    if runs is not None:
        cmd.append(f"-runs={runs}")
    start = time.monotonic()
    with open(out / "fuzz.log", "wb") as log:
        status = subprocess.run(cmd, cwd=repo_root(), stdout=log, stderr=subprocess.STDOUT,
                                check=False).returncode
    took = time.monotonic() - start
    text = (out / "fuzz.log").read_bytes()
    execs = executions(text)
    crashes = 0 if status == 0 else 1
    ok = crashes == 0 and (execs >= TARGET_EXECS or seconds >= TARGET_SECONDS)
    print(f"goal fuzz_{name}_crashes: {crashes} ({execs} execs in {took:.0f} s; target 0 "
          f"crashes after {TARGET_EXECS:,} execs or {TARGET_SECONDS // 60} min) "
          f"{'met' if ok else 'missed'}", flush=True)
    if crashes:
        print(f"  finding: see {out}/fuzz.log and {out}/crash-* (exit status {status})",
              flush=True)
    if keep is not None and crashes == 0:
        _keep(name, work, keep)
    return crashes, execs


def _keep(name: str, work: Path, keep: int) -> None:
    """Keep at most ``keep`` of the inputs this run added to the corpus (libFuzzer writes only
    inputs that reached new coverage there), spread over their sizes, as ``cov-*`` files."""
    d = corpus_dir(name)
    for old in d.glob("cov-*"):
        old.unlink()
    known = {f.read_bytes() for f in d.glob("*")}
    known |= {f.read_bytes() for f in regression_dir(name).glob("*")}
    found = sorted((f for f in work.iterdir() if f.read_bytes() not in known),
                   key=lambda f: (f.stat().st_size, f.name))
    if not found or keep <= 0:
        return
    step = max(1, len(found) // keep)
    for f in found[::step][:keep]:
        data = f.read_bytes()
        (d / f"cov-{hashlib.sha256(data).hexdigest()[:16]}").write_bytes(data)


def cmd_run(args: argparse.Namespace) -> int:
    names = _names(args)
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("python -m fuzz run: atheris is not installed in this environment; "
              "`make fuzz` installs it (pip install -e '.[fuzz]')", file=sys.stderr)
        return 2
    total = 0
    with tempfile.TemporaryDirectory(prefix="fuzz-run-") as tmp:
        for name in names:
            crashes, _ = _run_one(name, args.seconds, args.keep, Path(tmp), args.runs)
            total += crashes
    return 1 if total else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in ("list", "seed", "run", "replay"):
        p = sub.add_parser(command)
        if command != "list":
            p.add_argument("names", nargs="*", metavar="NAME")
        if command == "run":
            p.add_argument("--seconds", type=int, default=60)
            p.add_argument("--keep", type=int, default=None)
            p.add_argument("--runs", type=int, default=None,
                           help="stop each harness after this many executions")
    args = parser.parse_args(argv)
    return {"list": cmd_list, "seed": cmd_seed, "run": cmd_run, "replay": cmd_replay}[
        args.command](args)


if __name__ == "__main__":
    sys.exit(main())
