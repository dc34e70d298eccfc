"""``dtype: auto``: the CPU's flags read from /proc/cpuinfo text, and the choice made from them.

No test needs a CPU with bfloat16 units: the flags are given as text or patched in."""

import numpy as np
import pytest

import pcomp_jax
from pcomp_jax import hardware
from pcomp_jax.checkpoints import auto_dtype

EPYC_AVX512_BF16 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512dq avx512_bf16 avx512_vnni
bugs\t\t: sysret_ss_attrs
processor\t: 1
flags\t\t: fpu avx2
"""
SAPPHIRE_RAPIDS = "processor : 0\nflags : fpu avx2 avx512f amx_tile amx_int8 amx_bf16\n"
EPYC_AVX2 = "processor\t: 0\nflags\t\t: fpu vme sse sse2 avx avx2 fma\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes bf16 i8mm\nCPU implementer\t: 0x41\n"


def test_flags_come_from_the_first_processor():
    assert "avx512_bf16" in hardware.read_cpu_flags(EPYC_AVX512_BF16)
    assert hardware.read_cpu_flags(EPYC_AVX2) == {"fpu", "vme", "sse", "sse2", "avx", "avx2", "fma"}
    assert "bf16" in hardware.read_cpu_flags(ARM)
    assert hardware.read_cpu_flags("") == frozenset()
    assert hardware.read_cpu_flags("processor : 0\nmodel name : x\n") == frozenset()


@pytest.mark.parametrize("text,dtype,reason", [
    (EPYC_AVX512_BF16, "bfloat16", "avx512_bf16"),
    (SAPPHIRE_RAPIDS, "bfloat16", "amx_bf16"),
    (EPYC_AVX2, "float32", "no bfloat16 dot units"),
    (ARM, "float32", "no bfloat16 dot units"),  # XLA's CPU dots are not known to use ARM's bf16: not assumed
    ("", "float32", "could not be read"),
])
def test_cpu_choice_follows_the_bfloat16_units(text, dtype, reason):
    choice = hardware.choose_dtype("cpu", hardware.read_cpu_flags(text))
    assert choice.dtype == dtype and reason in choice.reason


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_accelerators_choose_bfloat16_whatever_the_host_cpu(backend):
    assert hardware.choose_dtype(backend, hardware.read_cpu_flags(EPYC_AVX2)).dtype == "bfloat16"


@pytest.mark.parametrize("text,dtype", [(EPYC_AVX512_BF16, np.dtype("bfloat16")), (EPYC_AVX2, np.float32)])
def test_load_model_auto_uses_the_choice_and_says_why_once(monkeypatch, capsys, hf_checkpoints, text, dtype):
    import jax.numpy as jnp

    monkeypatch.setattr(hardware, "cpu_flags", lambda: hardware.read_cpu_flags(text))
    hardware.announce_auto_dtype.cache_clear()
    try:
        first = pcomp_jax.load_model(hf_checkpoints("llama_gqa_untied")[0], dtype="auto")
        again = pcomp_jax.load_model(hf_checkpoints("llama_gqa_untied")[0], dtype="auto")
        assert first.dtype == again.dtype == jnp.dtype(dtype) and auto_dtype() == jnp.dtype(dtype).name
        said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dtype auto:")]
        assert len(said) == 1 and jnp.dtype(dtype).name in said[0]
    finally:
        hardware.announce_auto_dtype.cache_clear()


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_load_model_auto_is_bfloat16_on_accelerators(monkeypatch, hf_checkpoints, platform):
    import jax
    import jax.numpy as jnp

    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: hardware.read_cpu_flags(EPYC_AVX2))
    assert pcomp_jax.load_model(hf_checkpoints("llama_gqa_untied")[0], dtype="auto").dtype == jnp.bfloat16


def test_this_machine_is_read_without_error():
    flags = hardware.cpu_flags()
    assert isinstance(flags, frozenset)
    assert hardware.choose_dtype("cpu", flags).dtype in ("float32", "bfloat16")
