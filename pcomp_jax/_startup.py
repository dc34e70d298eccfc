"""A Ctrl-C while ``python -m pcomp_jax.<command>`` is still importing the package ends the
process with one line and exit 130, as a Ctrl-C later in the command does (``cli``),
instead of a traceback through the imports. Only for commands started with ``-m``: a
program that imports the package keeps its own SIGINT handling."""

from __future__ import annotations

import os
import signal
import sys

INTERRUPTED_EXIT = 130


def _interrupted_while_importing(signum, frame) -> None:
    print("interrupted", file=sys.stderr, flush=True)
    os._exit(INTERRUPTED_EXIT)


def started_as_command() -> bool:
    """Whether the package is being imported by ``python -m pcomp_jax...`` (runpy sets
    ``sys.argv[0]`` to the module's path only after importing its package)."""
    return sys.argv[:1] == ["-m"]


def quiet_interrupts_while_importing() -> None:
    """Until ``restore_interrupts``: a Ctrl-C prints ``interrupted`` and exits 130. Left alone
    when SIGINT is ignored (a background job) or handled by someone else."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_while_importing)


def restore_interrupts() -> None:
    """Python's own handler again (a Ctrl-C raises ``KeyboardInterrupt``, which the commands
    turn into one line and exit 130, keeping what they finished)."""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_importing:
        signal.signal(signal.SIGINT, signal.default_int_handler)
