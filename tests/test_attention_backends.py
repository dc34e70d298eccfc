"""Every attention backend agrees with the dense reference (GPU-only ones skip on the CPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcomp_jax.attention import CAUSAL_BACKENDS, causal_attention, dense_causal_attention
from pcomp_jax.kernels.pallas_attention import pallas_causal_attention

ON_GPU = jax.default_backend() == "gpu"


def qkv(t, heads=6, kv_heads=2, d=16, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    make = lambda h: jnp.asarray(rng.normal(size=(2, t, h, d)), dtype)
    return make(heads), make(kv_heads), make(kv_heads)


@pytest.mark.parametrize("t,block_q,block_k", [(40, 16, 32), (64, 32, 16), (100, 32, 32), (16, 16, 16)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_pallas_kernel_interpreted_matches_dense(t, block_q, block_k, with_mask):
    q, k, v = qkv(t, seed=t)
    keep = jnp.asarray(np.random.default_rng(1).random((2, 2, t)) > 0.3) if with_mask else None
    out = pallas_causal_attention(q, k, v, keep, block_q=block_q, block_k=block_k, interpret=True)
    np.testing.assert_allclose(out, dense_causal_attention(q, k, v, keep), atol=1e-5)


@pytest.mark.parametrize("name", ["blockwise", "pallas"])
def test_backends_by_name_match_dense(name):
    q, k, v = qkv(48, seed=3)
    np.testing.assert_allclose(causal_attention(name)(q, k, v), dense_causal_attention(q, k, v), atol=1e-5)


def test_auto_and_bad_names():
    if not ON_GPU:
        assert causal_attention("auto") is CAUSAL_BACKENDS["blockwise"]
    with pytest.raises(ValueError, match="backend 'flash9' is not available; choose one of: auto, dense"):
        causal_attention("flash9")
    with pytest.raises(ValueError, match="cudnn attention backend takes no calibration keep-mask"):
        causal_attention("cudnn", needs_key_mask=True)


@pytest.mark.parametrize("heads,kv_heads,d,dtype,with_mask", [(9, 3, 64, jnp.float32, True), (32, 8, 128, jnp.bfloat16, False)])
def test_pallas_kernel_lowers_to_triton_for_cuda(heads, kv_heads, d, dtype, with_mask):
    # Cross-platform lowering, no GPU needed: the compiled kernel must become one Triton
    # custom call (pallas_call's default GPU backend, Mosaic GPU, would try to hold a
    # whole row's K/V in shared memory and fail).
    from jax import export

    t = 1088  # a ParallelComp row: not a power of two
    q = jax.ShapeDtypeStruct((2, t, heads, d), dtype)
    kv = jax.ShapeDtypeStruct((2, t, kv_heads, d), dtype)
    keep = jax.ShapeDtypeStruct((2, kv_heads, t), jnp.bool_) if with_mask else None
    kernel = jax.jit(functools.partial(pallas_causal_attention, interpret=False))
    exported = export.export(kernel, platforms=["cuda"],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(q, kv, kv, keep)
    module = exported.mlir_module()
    assert module.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 1
    assert exported.out_avals[0].shape == (2, t, heads, d) and exported.out_avals[0].dtype == dtype


@pytest.mark.skipif(not ON_GPU, reason="cuDNN attention needs an NVIDIA GPU (jax.nn.dot_product_attention, implementation='cudnn')")
def test_cudnn_matches_dense_on_gpu():
    q, k, v = qkv(256, heads=8, kv_heads=2, d=64, dtype=jnp.bfloat16)
    out = causal_attention("cudnn")(q, k, v).astype(jnp.float32)
    ref = dense_causal_attention(q, k, v).astype(jnp.float32)
    np.testing.assert_allclose(out, ref, atol=2e-2)


@pytest.mark.skipif(not ON_GPU, reason="the compiled (Triton) Pallas kernel needs a GPU; the interpreted one is tested above")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_compiled_on_gpu(dtype):
    q, k, v = qkv(1000, heads=8, kv_heads=2, d=64, dtype=dtype)
    keep = jnp.asarray(np.random.default_rng(2).random((2, 2, 1000)) > 0.2)
    out = pallas_causal_attention(q, k, v, keep).astype(jnp.float32)
    ref = dense_causal_attention(q, k, v, keep).astype(jnp.float32)
    np.testing.assert_allclose(out, ref, atol=1e-4 if dtype == jnp.float32 else 2e-2)


def test_cudnn_refuses_float32_naming_the_fix(monkeypatch):
    # Seen on an H100 (docs/bench/gpu): cuDNN's flash attention raises NotImplementedError on float32.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match="cudnn attention backend takes bfloat16 or float16 inputs, not float32"):
        causal_attention("cudnn", dtype=jnp.float32)
    assert causal_attention("cudnn", dtype=jnp.bfloat16) is CAUSAL_BACKENDS["cudnn"]
