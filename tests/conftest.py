import os
import sys

import pytest

# The command lines run in-process here keep JAX's compilation cache off (pcomp_jax.cli): no
# files in the user's cache, and the test session's compilation the same in every order.
os.environ["PCOMP_JAX_COMPILATION_CACHE"] = ""

sys.path.insert(0, os.path.dirname(__file__))

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
