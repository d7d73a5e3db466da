"""``python -m trainer`` (and ``torchrun -m trainer``) is the ``trainer`` command.

Under ``--attest`` the code identity guard comes first, before the CLI is imported: it
re-executes the interpreter isolated and checks every later import (trainer/guard.py); an
import it refuses ends the process with exit status 5.
"""

from trainer import signals

signals.start()  # first: torch, OpenMP and gRPC start threads at import (trainer/signals.py)

import sys  # noqa: E402

if "--attest" not in sys.argv[1:]:
    from trainer.cli import main

    sys.exit(main())

from trainer.guard import EXIT_CODE_IDENTITY, CodeIdentityRefused, enter  # noqa: E402

try:
    enter()
    from trainer.cli import main

    code = main()
except CodeIdentityRefused as exc:
    print(f"trainer: code identity refused: {exc}", file=sys.stderr)
    code = EXIT_CODE_IDENTITY
sys.exit(code)
