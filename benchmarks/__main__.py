"""Run every benchmark: ``python -m benchmarks [--quick] [NAME ...]``.

Each ``benchmarks/bench_*.py`` module has ``main(quick: bool) -> None`` that prints its side by
side comparison and ends with one line per goal: ``goal NAME: VALUE (target TARGET) met|missed``.
"""

from __future__ import annotations

import argparse
import pkgutil
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, a few minutes in all")
    parser.add_argument("names", nargs="*", help="run only these (e.g. sealed broker)")
    args = parser.parse_args()
    here = Path(__file__).parent
    names = sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))
    if args.names:
        names = [n for n in names if n.removeprefix("bench_") in args.names or n in args.names]
    failed = []
    for name in names:
        print(f"\n===== {name} =====", flush=True)
        start = time.perf_counter()
        # each benchmark in its own interpreter: SoftHSM reads its configuration once per
        # process, torch keeps thread pools, and one benchmark must not warm up another
        code = f"import benchmarks.{name} as b; b.main(quick={args.quick!r})"
        result = subprocess.run([sys.executable, "-c", code], cwd=here.parent, check=False)
        if result.returncode != 0:  # a broken benchmark must not hide the others' results
            failed.append(name)
            print(f"benchmark {name} failed with exit status {result.returncode}", flush=True)
        print(f"({name} took {time.perf_counter() - start:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
