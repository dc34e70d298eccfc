"""Logical axes of the weights, and the model run with its batch axis sharded over 4 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from bounds import assert_within, model_bound, nll_bound, scale_of

import pcomp_jax
from pcomp_jax.model.llama import logical_axes, prefill_forward
from pcomp_jax.sharding import chunk_sharding, make_mesh, shard_weights


def test_every_weight_declares_one_name_per_axis(hf_checkpoints):
    model = pcomp_jax.load_model(hf_checkpoints("qwen2_bias")[0])
    specs = logical_axes(model.params)
    flat_w = jax.tree.leaves(model.params)
    flat_s = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(flat_w) == len(flat_s) == 15  # 12 layer fields (with biases) + embed, final norm, lm_head
    for w, s in zip(flat_w, flat_s):
        assert len(s) == w.ndim


def test_batch_sharded_over_four_devices_gives_same_logits(hf_checkpoints):
    assert len(jax.devices()) >= 4
    model = pcomp_jax.load_model(hf_checkpoints("llama_gqa_untied")[0])
    ids = jnp.asarray(np.random.default_rng(0).integers(0, tiny.VOCAB_SIZE, size=(8, 32)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(32), ids.shape)
    run = jax.jit(lambda w, t, p: prefill_forward(w, model.config, t, p)[0])
    single = run(model.params, ids, pos)
    mesh = make_mesh(4)
    sharded_ids = jax.device_put(ids, chunk_sharding(mesh, 2))
    sharded = run(shard_weights(model.params, mesh), sharded_ids, jax.device_put(pos, chunk_sharding(mesh, 2)))
    assert len(sharded.sharding.device_set) == 4
    assert_within(sharded, single, model_bound(model.config, scale_of(single), row_len=32), "logits over 4 devices")


@pytest.mark.slow
def test_tensor_parallel_2x2_mesh_equals_one_device(hf_checkpoints):
    """A (chunk 2, model 2) mesh: weights split over heads, MLP and vocabulary, chunk rows over
    chunk; logits, chunk scores, selections and tokens as on one device."""
    import dataclasses

    from pcomp_jax import ParallelCompConfig, answer
    from pcomp_jax.sharding import MODEL_AXIS, rules_for, shardings

    model = pcomp_jax.load_model(hf_checkpoints("llama_gqa_untied")[0])
    mesh = make_mesh(4, model_parallel=2)
    assert dict(mesh.shape) == {"chunk": 2, "model": 2}
    placed = shard_weights(model.params, mesh, rules_for(model.config, mesh))
    assert placed.embed.sharding.spec[0] is None  # the tiny vocabulary (267) does not divide: whole
    assert placed.layers.wq.sharding.spec[2] == MODEL_AXIS and placed.layers.w_up.sharding.spec[2] == MODEL_AXIS
    assert placed.layers.wq.addressable_shards[0].data.shape[2] == model.config.num_heads // 2
    ids = jnp.asarray(np.random.default_rng(1).integers(0, tiny.VOCAB_SIZE, size=(4, 24)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(24), ids.shape)
    run = jax.jit(lambda w, t, p: prefill_forward(w, model.config, t, p)[0])
    single = run(model.params, ids, pos)
    assert_within(run(placed, jax.device_put(ids, chunk_sharding(mesh, 2)), pos), single,
                  model_bound(model.config, scale_of(single), row_len=24), "logits on a 2 x 2 mesh")

    context = " ".join(f"The {w} sat on mat number {i}." for i, w in enumerate(["cat", "dog", "owl"] * 10))
    base = ParallelCompConfig(chunk_len=48, top_k_chunks=2, capacity=16, obs_window=4, group_size=4, num_devices=1)
    for layout in ("parallel", "sequential"):
        config = dataclasses.replace(base, merge_layout=layout, decode_eviction=True)
        one = answer(model, context, "where did the owl sit?", config, max_new_tokens=8)
        split = answer(model, context, "where did the owl sit?",
                       dataclasses.replace(config, num_devices=4, model_parallel=2), max_new_tokens=8)
        assert split.selected_chunks == one.selected_chunks and split.token_ids == one.token_ids
        assert_within(split.chunk_scores, one.chunk_scores,
                      nll_bound(model.config, one.chunk_scores, row_len=model.config.window), "chunk scores")
    assert shardings(placed, mesh).layers.wk.spec[2] == MODEL_AXIS  # KV heads too
    assert shardings(placed, mesh).embed.spec[0] == MODEL_AXIS  # a vocabulary that divides is split


def test_model_parallel_that_does_not_divide_is_refused(hf_checkpoints):
    import pytest

    from pcomp_jax import ConfigError, ParallelCompConfig, answer

    model = pcomp_jax.load_model(hf_checkpoints("llama_gqa_untied")[0])  # 4 query heads, 2 KV heads
    with pytest.raises(ConfigError, match=r"model_parallel=4 must divide the model's query heads \(4\), KV heads "
                                          r"\(2\) and MLP width \(96\); 2 KV heads do not; choose a divisor of 2"):
        answer(model, "the cat sat. " * 30, "who sat?", ParallelCompConfig(chunk_len=48, num_devices=4,
                                                                           model_parallel=4), 4)
    with pytest.raises(ConfigError, match="model_parallel=3 must divide num_devices=4"):
        ParallelCompConfig(num_devices=4, model_parallel=3)
    with pytest.raises(ConfigError, match="cannot be split over model_parallel devices"):
        ParallelCompConfig(model_parallel=2, attention="cudnn")
