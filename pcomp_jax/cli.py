"""What the command-line tools (``generate``, ``eval``) share: JAX's persistent compilation
cache, and one line instead of a traceback when the user stops a run with Ctrl-C.

The cache is on by default in ``DEFAULT_COMPILATION_CACHE`` (``$XDG_CACHE_HOME/pcomp_jax/jax``,
else ``~/.cache/pcomp_jax/jax``; the environment variable ``PCOMP_JAX_COMPILATION_CACHE``
replaces it, empty for off): a second run of the same shapes loads the compiled programs
instead of compiling them again. ``--compilation-cache DIR`` (or the config field
``compilation_cache``) moves it; ``--no-compilation-cache`` (or ``compilation_cache: null``)
turns it off.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ._startup import INTERRUPTED_EXIT  # noqa: E402  (130 = 128 + SIGINT, as a shell reports a Ctrl-C)



def default_compilation_cache(environ=os.environ) -> str | None:
    """``$PCOMP_JAX_COMPILATION_CACHE`` when set (empty: off), else ``$XDG_CACHE_HOME/pcomp_jax/jax``
    (``~/.cache/pcomp_jax/jax`` without XDG_CACHE_HOME)."""
    if "PCOMP_JAX_COMPILATION_CACHE" in environ:
        return environ["PCOMP_JAX_COMPILATION_CACHE"] or None
    return os.path.join(environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                        "pcomp_jax", "jax")


DEFAULT_COMPILATION_CACHE = default_compilation_cache()


def _not_the_torch_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("PyTorch was not found")


def quiet_transformers() -> None:
    """Drops transformers' import-time notice "PyTorch was not found. Models won't be
    available ..." (pcomp_jax uses only its tokenizers and configs); every other message of
    transformers still shows. Call before transformers is imported."""
    logger = logging.getLogger("transformers")
    if _not_the_torch_notice not in logger.filters:
        logger.addFilter(_not_the_torch_notice)


def add_cache_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--compilation-cache", metavar="DIR",
                       help=f"JAX's persistent compilation cache (default: the config's compilation_cache, "
                            f"{DEFAULT_COMPILATION_CACHE})")
    group.add_argument("--no-compilation-cache", action="store_true", help="compile everything again (no cache)")


def cache_overrides(args) -> list[str]:
    """``--set`` overrides of the ``compilation_cache`` field from the flags."""
    if args.no_compilation_cache:
        return ["compilation_cache=null"]
    if args.compilation_cache is not None:
        return [f"compilation_cache={args.compilation_cache!r}"]
    return []


def cache_problem(directory: str) -> str | None:
    """Why JAX could not keep compiled programs in ``directory`` (it cannot be created, or
    a file cannot be written in it), in words; None when it can."""
    import tempfile

    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".pcomp_write_probe"):
            pass
    except OSError as err:
        return f"cannot be written ({err.strerror or err})"
    return None


def use_compilation_cache(directory: str | None) -> None:
    """Turns on JAX's persistent compilation cache in ``directory`` (None: leaves it off).
    Call before anything is compiled. Every compiled program is kept (no minimum compile
    time): a warm start skips the many small ones too."""
    if directory is None:
        return
    import jax

    from .errors import ConfigError

    directory = os.path.expanduser(directory)
    problem = cache_problem(directory)
    if problem is not None:
        if directory == os.path.expanduser(DEFAULT_COMPILATION_CACHE):  # not the user's choice: run without it
            print(f"warning: the compilation cache {directory!r} {problem}; running without it (every program "
                  "compiles anew)", file=sys.stderr)
            return
        raise ConfigError(f"compilation_cache {directory!r} {problem}; give a writable directory, or "
                          "--no-compilation-cache") from None
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def exit_interrupted() -> int:
    """Reports a Ctrl-C in one line; returns the exit code (130)."""
    print("interrupted", file=sys.stderr, flush=True)
    return INTERRUPTED_EXIT


def finish(code: int) -> None:
    """Ends the process with ``code``. After a Ctrl-C, work already dispatched to the device
    may still be running; the interpreter would wait for it at exit, so the process ends at
    once instead (the output streams flushed first)."""
    if code == INTERRUPTED_EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
