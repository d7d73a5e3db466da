"""Suite-wide set-up that every test directory shares."""

from __future__ import annotations

import signal

# A suite started as a background job (`make test &`, `nohup`, a CI step run with `&`) inherits
# SIGINT ignored: a non-interactive shell ignores SIGINT and SIGQUIT for asynchronous commands,
# every child inherits the ignored disposition across exec, and CPython then installs no
# KeyboardInterrupt handler. The tests that press Ctrl-C on a command (SIGINT to a subprocess)
# would then see it ignored and the command run to its own end. A handler (unlike SIG_IGN) is
# reset to the default on exec, so installing Python's own handler here gives every subprocess
# the disposition a terminal gives it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
