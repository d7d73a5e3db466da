"""``python -m demo``: the whole system on one machine (``make demo``).

Runs docker-compose.yml through the harness (``docker compose`` where an engine runs, local
processes otherwise): bootstrap, two key brokers each holding one share, the tenant's
encrypted upload, policy and grant, two attested nodes training tiny-gpt together, encrypted
checkpoint, shred; then prints a summary. ``--state postgres`` puts the provider broker's
state and audit log in the compose ``postgres`` service and ``--store s3`` the dataset in the
``s3`` service (``make demo DEMO_STATE=postgres DEMO_STORE=s3``); the default is embedded.
Exit status 0 when every phase passed, 1 when one failed (with the failing service's log
tail), 2 for bad arguments, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="Confidential training end to end on this machine: a tenant's encrypted "
        "corpus, two key brokers, two attested nodes training tiny-gpt with DDP.",
    )
    parser.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    parser.add_argument("--keep", action="store_true",
                        help="leave the run directory (logs, volumes) for inspection; services "
                        "are stopped either way")
    parser.add_argument("--mode", choices=("auto", "local", "docker"), default="auto",
                        help="docker compose if an engine runs (auto), or force one")
    parser.add_argument("--run-root", type=Path, default=None,
                        help="parent of the run directory (default: ./run in the repository)")
    parser.add_argument("--state", choices=("sqlite", "postgres"), default="sqlite",
                        help="the provider broker's state and audit log: embedded SQLite "
                        "(default) or the compose `postgres` service (make demo "
                        "DEMO_STATE=postgres)")
    parser.add_argument("--store", choices=("local", "s3"), default="local",
                        help="where the encrypted dataset lives: the shared store volume "
                        "(default) or the compose `s3` service (make demo DEMO_STORE=s3)")
    return parser


def _say(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from demo.runner import REPO, DemoRun, PhaseFailed, Settings

    try:
        settings = Settings(steps=args.steps, mode=args.mode,
                            run_root=args.run_root or REPO / "run", state=args.state,
                            store=args.store)
    except ValueError as exc:
        _parser().error(str(exc))

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        run = DemoRun(settings, _say)
    except PhaseFailed as exc:
        _say(f"demo: {exc}")
        return 1
    how = f"local processes, run {run.harness.run_id}" if run.local else "docker compose"
    how += {"postgres": "; provider broker on PostgreSQL"}.get(settings.state, "")
    how += {"s3": f"; dataset in S3 ({settings.dataset_store})"}.get(settings.store, "")
    _say(f"confidential training demo: run directory {run.directory} ({how})")
    code = 0
    try:
        run.bring_up()
        run.train()
        from demo.summary import summarise

        for line in summarise(run, keep=args.keep):
            _say(line)
        _say("\ndemo: every phase passed")
    except PhaseFailed as exc:
        _say(f"\ndemo: {exc}")
        code = 1
    except KeyboardInterrupt:
        _say("\ndemo: interrupted; stopping every service")
        code = 130
    finally:
        try:
            run.tear_down(keep=args.keep)
        except Exception as exc:  # the run's outcome stands; say what could not be cleaned
            _say(f"demo: teardown problem: {exc}")
            code = code or 1
        else:
            if args.keep:
                _say(f"demo: services stopped; run directory kept at {run.directory}")
            else:
                _say("demo: services stopped, run directory wiped")
    return code


if __name__ == "__main__":
    sys.exit(main())
