"""``python -m trainer`` (and ``torchrun -m trainer``) is the ``trainer`` command.

Under ``--attest`` the code identity guard comes first, before the CLI is imported: it
re-executes the interpreter isolated and checks every later import (trainer/guard.py).
"""

import sys

if "--attest" in sys.argv[1:]:
    from trainer.guard import EXIT_CODE_IDENTITY, CodeIdentityRefused, enter

    try:
        enter()
    except CodeIdentityRefused as exc:
        print(f"trainer: code identity refused: {exc}", file=sys.stderr)
        sys.exit(EXIT_CODE_IDENTITY)

from trainer.cli import main

sys.exit(main())
