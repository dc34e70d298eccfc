"""Every attention backend agrees with the dense reference (GPU-only ones skip on the CPU)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bounds import assert_within, attention_bound

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
    assert_within(out, dense_causal_attention(q, k, v, keep), attention_bound(q, k, v), "pallas (interpreted)")


@pytest.mark.parametrize("name", ["blockwise", "pallas"])
def test_backends_by_name_match_dense(name):
    q, k, v = qkv(48, seed=3)
    assert_within(causal_attention(name)(q, k, v), dense_causal_attention(q, k, v), attention_bound(q, k, v), name)


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


# -- the kernels JAX ships: splash attention (TPU) and Mosaic GPU flash attention (Hopper) --

from pcomp_jax.kernels.library_kernels import mosaic_gpu_available, splash_causal_attention  # noqa: E402

SMOLLM2_HEADS = (9, 3, 64)
LLAMA3_8B_HEADS = (32, 8, 128)


@pytest.mark.parametrize("heads,t,batch", [(SMOLLM2_HEADS, 256, 2), (SMOLLM2_HEADS, 200, 2), (LLAMA3_8B_HEADS, 130, 1)])
def test_splash_interpreted_matches_dense(heads, t, batch):
    # 200 and 130 are padded to 256 (a multiple of the TPU's 128 lanes): causality hides the padding.
    h, kvh, d = heads
    rng = np.random.default_rng(t)
    q, k, v = (jnp.asarray(rng.normal(size=(batch, t, n, d)), jnp.float32) for n in (h, kvh, kvh))
    out = splash_causal_attention(q, k, v, interpret=True)
    assert_within(out, dense_causal_attention(q, k, v), attention_bound(q, k, v), "splash (interpreted)")


def test_splash_refuses_a_key_mask_and_auto_picks_it_on_tpu(monkeypatch):
    with pytest.raises(ValueError, match="splash attention backend takes no calibration keep-mask; use blockwise or pallas"):
        causal_attention("splash", needs_key_mask=True)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert causal_attention("auto") is CAUSAL_BACKENDS["splash"]
    assert causal_attention("auto", needs_key_mask=True) is CAUSAL_BACKENDS["blockwise"]


def test_mosaic_gpu_is_probed_and_refused_with_the_reason_off_hopper():
    missing = mosaic_gpu_available()
    if missing is None:
        pytest.skip("a Hopper GPU is here: the backend runs (test_mosaic_gpu_matches_dense_on_hopper)")
    with pytest.raises(ValueError, match="mosaic_gpu|Mosaic GPU"):
        causal_attention("mosaic_gpu", dtype=jnp.bfloat16)


@pytest.mark.skipif(mosaic_gpu_available() is not None, reason=str(mosaic_gpu_available()))
@pytest.mark.parametrize("heads,t", [(SMOLLM2_HEADS, 1088), (LLAMA3_8B_HEADS, 1000)])
def test_mosaic_gpu_matches_dense_on_hopper(heads, t):
    h, kvh, d = heads
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, t, n, d)), jnp.bfloat16) for n in (h, kvh, kvh))
    out = causal_attention("mosaic_gpu", dtype=jnp.bfloat16)(q, k, v).astype(jnp.float32)
    ref = dense_causal_attention(q, k, v).astype(jnp.float32)
    np.testing.assert_allclose(out, ref, atol=3e-2)


def export_chunk_prefill(platform: str, attention: str, heads=SMOLLM2_HEADS, dtype=jnp.bfloat16, serialize=True):
    """``prefill.prefill_group`` (the whole chunk prefill: every layer, scoring, eviction) for a
    2-layer model of the given head shape, exported for ``platform`` from abstract shapes."""
    from jax import export

    from pcomp_jax.checkpoints.orbax_dir import weight_shapes
    from pcomp_jax.chunking import Rows
    from pcomp_jax.model.config import ModelConfig
    from pcomp_jax.prefill import PrefillSpec, prefill_group

    h, kvh, d = heads
    cfg = ModelConfig("LlamaForCausalLM", 1024, h * d, 4 * h * d, 2, h, kvh, d, 8192)
    weights = weight_shapes(cfg, jnp.dtype(dtype))
    g, r, qb = 4, 1088, 16
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    rows = Rows(tokens=ints(g, r), positions=ints(g, r), row_lengths=ints(g), chunk_lengths=ints(g), chunk_ids=ints(g),
                question_targets=ints(g, qb), question_mask=jax.ShapeDtypeStruct((g, qb), jnp.bool_),
                score_at=ints(g, qb), prefix_len=32, chunk_len=1040)
    spec = PrefillSpec(capacity=256, attention=attention)
    if not serialize:  # lowered for the platform, without export's check of custom-call stability
        return prefill_group.trace(weights, cfg, rows, spec).lower(lowering_platforms=(platform,)).as_text()
    # Triton calls carry no compatibility guarantee across jax versions: allowed here, in a test.
    unstable = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")] if platform == "cuda" else []
    exported = export.export(prefill_group, platforms=[platform], disabled_checks=unstable)(weights, cfg, rows, spec)
    return exported.mlir_module()


def test_chunk_prefill_with_splash_exports_for_tpu():
    module = export_chunk_prefill("tpu", "splash")
    assert "stablehlo.custom_call @tpu_custom_call" in module


def test_chunk_prefill_with_pallas_exports_for_cuda():
    module = export_chunk_prefill("cuda", "pallas", heads=LLAMA3_8B_HEADS)
    assert module.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 1  # one kernel, inside the layer scan


@pytest.mark.parametrize("backend", ["cudnn", "mosaic_gpu"])
def test_chunk_prefill_with_gpu_library_kernels_exports_for_cuda(backend, monkeypatch):
    # cuDNN's and Mosaic GPU's lowerings ask the installed CUDA libraries for their versions:
    # without a GPU's libraries they cannot lower, and the test says so.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the configuration checks of a GPU run
    import pcomp_jax.kernels.library_kernels as library

    monkeypatch.setattr(library, "mosaic_gpu_available", lambda: None)
    try:
        module = export_chunk_prefill("cuda", backend, heads=LLAMA3_8B_HEADS, serialize=False)
    except (RuntimeError, AssertionError) as e:
        if ON_GPU:
            raise
        pytest.skip(f"{backend} cannot be lowered without a GPU's CUDA libraries here ({type(e).__name__}: {e})")
    target = {"cudnn": "__cudnn$fmha", "mosaic_gpu": "mosaic_gpu"}[backend]
    assert f"stablehlo.custom_call @{target}" in module, sorted(set(re.findall(r"custom_call @([\w$.]+)", module)))


def test_kernels_never_run_interpreted_on_an_accelerator(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    with pytest.raises(ValueError, match="the pallas attention kernel does not run on tpu .it runs on gpu, cpu.; use auto"):
        causal_attention("pallas")
    with pytest.raises(ValueError, match="splash attention backend takes no calibration keep-mask; use blockwise$"):
        causal_attention("splash", needs_key_mask=True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match="the splash attention kernel does not run on gpu .it runs on tpu, cpu."):
        causal_attention("splash")
