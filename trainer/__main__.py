"""``python -m trainer`` (and ``torchrun -m trainer``) is the ``trainer`` command."""

from trainer import signals

signals.start()  # first: torch, OpenMP and gRPC start threads at import (trainer/signals.py)

import sys  # noqa: E402

from trainer.cli import main  # noqa: E402

sys.exit(main())
