"""Several processes (hosts) as one run, through JAX's own distributed runtime.

``initialize(DistributedConfig(...))`` calls ``jax.distributed.initialize`` before any other
JAX call: with a coordinator address, a process count and this process's id when they are
given (``--coordinator``, ``--num-processes``, ``--process-id``), else with JAX's own
cluster detection (SLURM, Open MPI, Kubernetes, Cloud TPU); outside a cluster and without
flags the run stays one process. After it, ``jax.devices()`` lists every process's devices:
``sharding.make_mesh`` spans them, ``sharding.shard`` places on each process only its own
share of the chunk rows (``jax.make_array_from_process_local_data``), and the selection
and answer come out replicated, the same on every process. Only the main process
(``is_main()``, process 0) prints and writes files.
"""

from __future__ import annotations

import json
import os
import sys
import threading

import jax
import numpy as np

from .config import DistributedConfig
from .errors import PcompError


def initialize(cfg: DistributedConfig) -> bool:
    """Joins the run's processes (see the module docstring); call before any other JAX call.

    Returns whether this run spans several processes. Raises ``PcompError`` with one line
    when the processes cannot join (a peer that never starts, an unreachable coordinator)
    within ``cfg.timeout_s``.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if not cfg.explicit and os.environ.get("SLURM_NTASKS") == "1":
        return False  # a one-task job: nothing to join (JAX's detection would hide all GPUs but SLURM_LOCALID's)
    if hasattr(jax.config, "jax_cpu_collectives_implementation"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over TCP
    where = f"coordinator {cfg.coordinator}" if cfg.explicit else "the detected cluster's coordinator"
    failure = (f"the processes did not all join at {where} within {cfg.timeout_s} s (a peer that never started, "
               "or a wrong address?)")
    # JAX's own client aborts the process when its join deadline passes, so a watchdog of
    # ours, set to fire first, ends this process with one line instead.
    watchdog = threading.Timer(cfg.timeout_s, _give_up, (failure,))
    watchdog.daemon = True
    watchdog.start()
    try:
        if cfg.explicit:
            jax.distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id,
                                       initialization_timeout=cfg.timeout_s + 60)
        else:
            jax.distributed.initialize(initialization_timeout=cfg.timeout_s + 60)
    except ValueError as err:
        if not cfg.explicit and "coordinator_address should be defined" in str(err):
            return False  # no cluster detected and no flags: one process
        raise PcompError(f"cannot start the distributed run: {err}") from None
    except RuntimeError as err:
        if "before any JAX" in str(err):  # this process already computed (e.g. the CLI called from Python)
            if not cfg.explicit:
                return False  # nothing to join
            raise PcompError("a distributed run must be joined before this process runs any JAX computation; "
                             "start it as its own process (python -m ...)") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PcompError(f"{failure}: {first}") from None
    finally:
        watchdog.cancel()
    return jax.process_count() > 1


def _give_up(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)


def is_main() -> bool:
    """Whether this is the process that prints and writes files (process 0)."""
    return jax.process_index() == 0


def add_distributed_flags(parser) -> None:
    """``--coordinator``, ``--num-processes``, ``--process-id`` (the ``distributed`` section)."""
    group = parser.add_argument_group("several processes (jax.distributed; without these, JAX's cluster detection)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (distributed.coordinator)")
    group.add_argument("--num-processes", type=int, metavar="N", help="processes in the run (distributed.num_processes)")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 = main (distributed.process_id)")


def distributed_overrides(args) -> list[str]:
    """The ``--set`` assignments the distributed flags stand for."""
    flags = ("coordinator", "num_processes", "process_id")
    return [f"distributed.{flag}={json.dumps(getattr(args, flag))}" for flag in flags if getattr(args, flag) is not None]


def main_decides(values: np.ndarray) -> np.ndarray:
    """Process 0's ``values`` on every process (each passes an array of the same shape and
    dtype): what only process 0 knows, e.g. which items its result files already hold."""
    if jax.process_count() == 1:
        return np.asarray(values)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(values)))
