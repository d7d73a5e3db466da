"""``python -m trainer.launch ARGS``: torchrun (``torch.distributed.run``) with the trainer's
exit status on a stop signal.

torchrun's agent turns SIGTERM, SIGINT, SIGHUP and SIGQUIT into a ``SignalException``: it
sends the same signal to every worker, waits for them (each ``trainer --attest`` worker
shreds and exits ``128 + N``, :mod:`trainer.signals`), then re-raises, and plain ``torchrun``
exits 1 with a traceback. This wrapper runs the same agent and leaves with ``128 + N`` instead
(143 SIGTERM, 130 SIGINT, 129 SIGHUP, 131 SIGQUIT), so a scheduler that signals the job sees
the status ``trainer --help`` documents whichever way the job was started.
``deploy/bin/node.py`` starts multi-node jobs through it. Arguments are torchrun's.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as exc:
        name = getattr(exc.sigval, "name", str(exc.sigval))
        print(f"trainer.launch: {name}: the workers were signalled and have exited",
              file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
