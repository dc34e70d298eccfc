"""The JAX model against Hugging Face transformers' PyTorch models (tiny random weights)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from bounds import assert_bfloat16_close, assert_within, attention_bound, bfloat16_bound, model_bound, scale_of

import pcomp_jax
from pcomp_jax.cache import cache_from_prefill
from pcomp_jax.model.llama import appended_forward, cached_forward, prefill_forward


@pytest.mark.parametrize("variant", sorted(tiny.VARIANTS))
def test_logits_match_transformers(hf_checkpoints, variant):
    path, reference = hf_checkpoints(variant)
    model = pcomp_jax.load_model(path)
    ids = np.random.default_rng(1).integers(0, tiny.VOCAB_SIZE, size=(2, 64))
    ours = pcomp_jax.forward(model, ids)
    expected = tiny.hf_logits(reference, ids)
    assert_within(ours, expected, model_bound(model.config, scale_of(expected), row_len=64), "logits")


@pytest.mark.parametrize("variant", ["llama_gqa_untied", "dynamic_rope"])
def test_one_dimensional_input_and_padding_invariance(hf_checkpoints, variant):
    path, reference = hf_checkpoints(variant)
    # transformers' dynamic rope keeps state between calls; a fresh copy sees only this input.
    reference = type(reference).from_pretrained(path).eval()
    model = pcomp_jax.load_model(path)
    ids = np.random.default_rng(2).integers(0, tiny.VOCAB_SIZE, size=37)  # padded to a 64 bucket inside
    ours = pcomp_jax.forward(model, ids)
    assert ours.shape == (37, tiny.VOCAB_SIZE)
    expected = tiny.hf_logits(reference, ids[None])[0]
    assert_within(ours, expected, model_bound(model.config, scale_of(expected), row_len=64), "logits")


@pytest.mark.parametrize("variant", ["llama_gqa_untied", "qwen2_bias"])
def test_bfloat16_is_within_its_rounding_bound_of_float32(hf_checkpoints, variant):
    # Mixed precision: bfloat16 weights, float32 accumulation: within bounds.bfloat16_bound of
    # float32, as transformers' bfloat16 model is of its float32 one (so the two bfloat16 models
    # are within twice the bound of each other).
    import torch

    path, reference = hf_checkpoints(variant)
    ids = np.random.default_rng(3).integers(0, tiny.VOCAB_SIZE, size=(1, 48))
    f32 = pcomp_jax.forward(pcomp_jax.load_model(path), ids)
    bf16_model = pcomp_jax.load_model(path, dtype="bfloat16")
    assert bf16_model.params.layers.wq.dtype == jnp.bfloat16
    bf16 = pcomp_jax.forward(bf16_model, ids)
    assert bf16.dtype == np.float32
    hf_bf16 = tiny.hf_logits(type(reference).from_pretrained(path, dtype=torch.bfloat16).eval(), ids)
    depth = bf16_model.config.num_layers + 1
    assert_bfloat16_close(bf16, f32, depth=depth)
    assert np.abs(bf16 - hf_bf16).mean() <= 2 * bfloat16_bound(np.abs(f32).mean(), depth=depth)
    assert (bf16.argmax(-1) == f32.argmax(-1)).mean() > 0.9


def test_every_dot_of_a_bfloat16_layer_takes_bfloat16_and_accumulates_in_float32(hf_checkpoints):
    path, _ = hf_checkpoints("qwen2_bias")
    model = pcomp_jax.load_model(path, dtype="bfloat16")
    ids = jnp.zeros((2, 16), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda w: prefill_forward(w, model.config, ids, jnp.broadcast_to(jnp.arange(16), ids.shape)))(
        model.params)
    dots = []

    def collect(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                dots.append(eqn)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                collect(sub)

    collect(jaxpr.jaxpr)
    # q, k, v, o, gate, up, down in the scanned layer, QK^T and PV of attention, the output head
    assert len(dots) >= 10
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16], eqn
        assert eqn.outvars[0].aval.dtype == jnp.float32, eqn


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["llama_gqa_untied", "qwen2_bias"])
def test_cached_decoding_matches_prefill(hf_checkpoints, variant):
    """Feeding tokens one by one through the KV cache gives the prefill's logits."""
    path, _ = hf_checkpoints(variant)
    model = pcomp_jax.load_model(path)
    cfg, w = model.config, model.params
    ids = jnp.asarray(np.random.default_rng(4).integers(0, tiny.VOCAB_SIZE, size=(2, 24)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(24), ids.shape)
    full, _ = prefill_forward(w, cfg, ids, pos)
    _, (keys, values) = prefill_forward(w, cfg, ids[:, :16], pos[:, :16])
    cache = cache_from_prefill(keys, values, jnp.array([16, 16]), capacity=32)
    step = jax.jit(lambda t, p, c: cached_forward(w, cfg, t, p, c))
    for t in range(16, 24):
        logits, cache = step(ids[:, t : t + 1], pos[:, t : t + 1], cache)
        assert_within(logits[:, 0], full[:, t], model_bound(cfg, scale_of(full), row_len=32), "cached step")
    # A block of several tokens at once gives the same as one at a time.
    cache = cache_from_prefill(keys, values, jnp.array([16, 16]), capacity=32)
    block, _ = cached_forward(w, cfg, ids[:, 16:], pos[:, 16:], cache)
    assert_within(block, full[:, 16:], model_bound(cfg, scale_of(full), row_len=32), "cached block")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["llama_gqa_untied", "qwen2_bias"])
def test_tokens_appended_to_a_read_only_cache_match_prefill(hf_checkpoints, variant):
    """appended_forward (a document's question pass): rows whose stored parts differ in
    length, with junk in their unused slots, give the prefill's logits, keys and values."""
    path, _ = hf_checkpoints(variant)
    model = pcomp_jax.load_model(path)
    cfg, w = model.config, model.params
    rng = np.random.default_rng(6)
    ids = jnp.asarray(rng.integers(0, tiny.VOCAB_SIZE, size=(3, 30)), jnp.int32)
    stored = np.array([20, 13, 0])  # tokens already in each row's cache (0: an empty row)
    _, (keys, values) = prefill_forward(w, cfg, ids[:, :20], jnp.broadcast_to(jnp.arange(20), (3, 20)))
    junk = jnp.asarray(np.arange(20)[None, :] >= stored[:, None])[None, :, :, None, None]
    keys, values = jnp.where(junk, 7.0, keys), jnp.where(junk, -3.0, values)
    new = jnp.stack([ids[b, s: s + 10] for b, s in enumerate(stored)])
    positions = jnp.asarray(stored[:, None] + np.arange(10)[None, :], jnp.int32)
    emit = lambda q, k, v, k_cache, v_cache, index: (k, v)
    logits, (new_keys, new_values) = appended_forward(w, cfg, new, positions, keys, values,
                                                      jnp.asarray(np.arange(20)[None, :] < stored[:, None]), emit)
    for b, s in enumerate(stored):
        row = ids[b: b + 1, : s + 10]
        full, (full_keys, full_values) = prefill_forward(w, cfg, row, jnp.arange(s + 10)[None])
        for name, got, want in [("logits", logits[b], full[0, s:]), ("keys", new_keys[:, b], full_keys[:, 0, s:]),
                                ("values", new_values[:, b], full_values[:, 0, s:])]:
            assert_within(got, want, model_bound(cfg, scale_of(want), row_len=30), name)


def test_logits_at_selected_positions(hf_checkpoints):
    path, _ = hf_checkpoints("llama_gqa_untied")
    model = pcomp_jax.load_model(path)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, tiny.VOCAB_SIZE, size=(2, 32)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(32), ids.shape)
    full, _ = prefill_forward(model.params, model.config, ids, pos)
    at = jnp.array([[3, 31], [0, 17]])
    picked, _ = prefill_forward(model.params, model.config, ids, pos, logits_at=at)
    expected = jnp.take_along_axis(full, at[..., None], axis=1)
    assert_within(picked, expected, model_bound(model.config, scale_of(expected), row_len=32), "picked logits")


def test_generate_full_matches_transformers_greedy(hf_checkpoints):
    path, reference = hf_checkpoints("llama_gqa_untied")
    model = pcomp_jax.load_model(path)
    prompt = np.random.default_rng(6).integers(3, tiny.VOCAB_SIZE, size=20)
    ours = pcomp_jax.generate_full(model, prompt, max_new_tokens=12)
    import torch

    with torch.no_grad():
        ref = reference.generate(
            torch.as_tensor(prompt[None]), max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0
        )[0, 20:].tolist()
    if 2 in ref:
        ref = ref[: ref.index(2)]
    assert ours.token_ids == ref
    assert ours.prompt_length == 20


@pytest.mark.parametrize("t,block", [(64, 16), (100, 32), (37, 64), (8, 512)])
def test_blockwise_attention_matches_dense(t, block):
    from pcomp_jax.attention import blockwise_causal_attention, dense_causal_attention

    rng = np.random.default_rng(t)
    q = jnp.asarray(rng.normal(size=(2, t, 6, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, t, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, t, 2, 16)), jnp.float32)
    assert_within(blockwise_causal_attention(q, k, v, block=block), dense_causal_attention(q, k, v),
                  attention_bound(q, k, v), f"blockwise, block {block}")


def test_blockwise_backend_in_the_model(hf_checkpoints):
    from pcomp_jax.attention import blockwise_causal_attention

    path, reference = hf_checkpoints("llama_gqa_untied")
    model = pcomp_jax.load_model(path)
    ids = jnp.asarray(np.random.default_rng(9).integers(0, tiny.VOCAB_SIZE, size=(1, 96)), jnp.int32)
    pos = jnp.arange(96)[None]
    attention = lambda q, k, v, keep: blockwise_causal_attention(q, k, v, keep, block=32)
    logits, _ = prefill_forward(model.params, model.config, ids, pos, attention=attention)
    expected = tiny.hf_logits(reference, np.asarray(ids))
    assert_within(logits, expected, model_bound(model.config, scale_of(expected), row_len=96), "logits")


def test_bucket_lengths():
    from pcomp_jax.buckets import bucket_length

    assert [bucket_length(n) for n in (1, 64, 65, 500, 512, 513)] == [64, 64, 128, 512, 512, 576]
    assert bucket_length(16400) == 18432 and bucket_length(32768) == 32768
    for n in range(1, 100000, 997):
        size = bucket_length(n)
        assert n <= size <= max(64, n * 1.125 + 1)
    assert len({bucket_length(n) for n in range(1, 70000)}) < 80  # few buckets: few compilations
