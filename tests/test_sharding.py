"""Logical axes of the weights, and the model run with its batch axis sharded over 4 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import tiny

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
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)
