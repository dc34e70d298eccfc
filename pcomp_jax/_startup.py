"""A Ctrl-C while ``python -m pcomp_jax.<command>`` is still importing the package ends the
process with one line and exit 130, as a Ctrl-C later in the command does (``cli``),
instead of a traceback through the imports; later, it is remembered so that it is never
lost (``raise_if_interrupted``). Only for commands started with ``-m``: a program that
imports the package keeps its own SIGINT handling."""

from __future__ import annotations

import os
import signal
import sys

INTERRUPTED_EXIT = 130
_interrupt_requested = False  # set by a command's SIGINT handler (``restore_interrupts``), never cleared


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


def _interrupt_the_command(signum, frame) -> None:
    global _interrupt_requested
    _interrupt_requested = True
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Raises ``KeyboardInterrupt`` when a command was interrupted (``restore_interrupts``);
    called between units of work (an evaluation item, a chunk group). Never in a program
    that imports the package without running a command."""
    if _interrupt_requested:
        raise KeyboardInterrupt


def restore_interrupts() -> None:
    """After the imports, a command's Ctrl-C raises ``KeyboardInterrupt`` as Python's handler
    does (the commands turn it into one line and exit 130, keeping what they finished), and
    is also remembered, so that ``raise_if_interrupted`` raises it again where Python dropped
    it: a Ctrl-C that lands in a garbage-collection callback is printed as "Exception
    ignored" and lost. A program that imports the package keeps its own handler."""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_importing:
        signal.signal(signal.SIGINT, _interrupt_the_command)
        sys.unraisablehook = _quiet_dropped_interrupt(sys.unraisablehook)


def _quiet_dropped_interrupt(hook):
    """``sys.unraisablehook`` that says nothing of a remembered Ctrl-C Python could not raise
    (it is raised again, or the command ends as interrupted); anything else goes to ``hook``."""

    def unraisable(info) -> None:
        if not (_interrupt_requested and isinstance(info.exc_value, KeyboardInterrupt)):
            hook(info)

    return unraisable
