"""ParallelComp on models with local (sliding-window) layers, without checkpoints: what the
plan refuses, the merged cache's positions, keys rotated on with each layer's rope, and
SnapKV scores in a local layer. The pipeline against the NumPy reference on a tiny Gemma 3
is in tests/test_against_reference.py."""

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pcomp_jax
from pcomp_jax import ParallelCompConfig
from pcomp_jax.checkpoints import Model
from pcomp_jax.compress import SnapKV, snapkv_token_scores
from pcomp_jax.model.config import ModelConfig, RopeConfig
from pcomp_jax.model.rope import apply_rope, rope_tables
from pcomp_jax.plans import plan
from pcomp_jax.prefill import (ChunkSelection, SequentialLayout, merge_selection, rope_shift_is_exact,
                               shift_keys)

LOCAL = ModelConfig(architecture="Gemma3ForCausalLM", vocab_size=32, hidden_size=16, intermediate_size=16,
                    num_layers=3, num_heads=2, num_kv_heads=1, head_dim=8, window=256,
                    rope=RopeConfig(theta=1e6, type="linear", factor=2.0), sliding_windows=(4, 0, 4),
                    local_rope=RopeConfig(theta=1e4))
PLAIN = dataclasses.replace(LOCAL, architecture="LlamaForCausalLM", sliding_windows=(), local_rope=None)


def _model(cfg, chat_template="{{ x }}"):
    tokenizer = SimpleNamespace(chat_template=chat_template)
    return Model(cfg, SimpleNamespace(embed=jnp.zeros((1,), jnp.float32)), tokenizer, "tiny")


def test_plan_refuses_windowless_backends_and_chat_without_a_template():
    for name in ("cudnn", "splash", "mosaic_gpu"):
        with pytest.raises(pcomp_jax.ConfigError, match=f"the {name} attention backend takes no sliding window"):
            plan(_model(LOCAL), ParallelCompConfig(attention=name))
    assert plan(_model(LOCAL)).prefill.attention == "auto"
    with pytest.raises(pcomp_jax.ConfigError, match="'tiny' has no chat template .*set chat: false"):
        plan(_model(PLAIN, chat_template=None))
    plan(_model(PLAIN, chat_template=None), ParallelCompConfig(chat=False))


def _selection(rng, cfg, k=2, cap=3):
    shape = (cfg.num_layers, k, cap, cfg.num_kv_heads, cfg.head_dim)
    kept = np.sort(rng.choice(np.arange(5, 12), size=(cfg.num_layers, k, cfg.num_kv_heads, cap)), axis=-1)
    return ChunkSelection(
        keys=jnp.asarray(rng.normal(size=shape), jnp.float32), values=jnp.asarray(rng.normal(size=shape), jnp.float32),
        kept_positions=jnp.asarray(kept, jnp.int32), token_valid=jnp.ones((k, cap), bool),
        scores=jnp.asarray([1.0, 2.0]), chunk_ids=jnp.asarray([0, 1], jnp.int32), chunk_valid=jnp.ones((k,), bool),
        row_lengths=jnp.asarray([5 + 7, 5 + 6], jnp.int32))


def test_merged_cache_positions_per_layout():
    rng = np.random.default_rng(0)
    sel = _selection(rng, LOCAL)
    prefix = jnp.zeros((3, 5, 1, 8))
    kept = np.asarray(sel.kept_positions)[..., 0, :]  # [L, K, cap]
    for layout, shifts in ((None, [0, 0]), (SequentialLayout(), [0, 7])):
        extra = {} if layout is None else {"layout": layout}
        cache, start = merge_selection(prefix, prefix, sel, room=4, cfg=LOCAL, **extra)
        pos = np.asarray(cache.positions)[:, 0, :, 0]  # [L, S]
        assert cache.positions.shape == cache.valid.shape
        want = np.concatenate([np.broadcast_to(np.arange(5), (3, 5)), (kept + np.array(shifts)[None, :, None]).reshape(3, 6),
                               np.full((3, 4), -1)], axis=1)
        np.testing.assert_array_equal(pos, want)
        assert int(start) == (12 if layout is None else 5 + 7 + 6)
    assert merge_selection(prefix, prefix, sel, room=4, cfg=PLAIN)[0].positions is None  # other models: unchanged


def test_shift_keys_rotates_each_layer_with_its_own_rope():
    rng = np.random.default_rng(1)
    raw = jnp.asarray(rng.normal(size=(3, 2, 3, 1, 8)), jnp.float32)
    at, shifts = jnp.asarray([[4, 5, 9], [6, 7, 8]]), jnp.asarray([0, 11])
    for layer, rope in enumerate((LOCAL.local_rope, LOCAL.rope, LOCAL.local_rope)):
        cos, sin = rope_tables(LOCAL, at, rope)
        rotated = apply_rope(raw[layer], cos, sin)
        cos2, sin2 = rope_tables(LOCAL, at + shifts[:, None], rope)
        moved = shift_keys(LOCAL, jnp.stack([rotated] * 3), shifts)[layer]
        # float32 angles: position x frequency rounds to ~1e-7 relative, as in
        # test_merge_layouts' rotation test (the same bound, for a shift of 11)
        np.testing.assert_allclose(moved, apply_rope(raw[layer], cos2, sin2), atol=3e-7 * (256 + 11))
    assert rope_shift_is_exact(LOCAL)
    assert not rope_shift_is_exact(dataclasses.replace(LOCAL, local_rope=RopeConfig(type="dynamic", factor=2.0)))


def test_snapkv_in_a_local_layer_counts_only_what_the_window_shows():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(1, 20, 2, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 20, 1, 8)), jnp.float32)
    content = jnp.asarray((np.arange(20) >= 2) & (np.arange(20) < 14))[None]
    lengths = jnp.asarray([20])
    windowed = np.asarray(snapkv_token_scores(q, k, lengths, 4, 1, content, window=jnp.int32(10)))[0, 0]
    # the observation queries sit at 16..19 and see keys from 7 on: earlier content scores 0
    assert (windowed[2:7] == 0).all() and (windowed[7:14] > 0).all()
    wide = SnapKV(4, 1).local_scores(q, k, lengths, content, jnp.int32(2**30))
    np.testing.assert_array_equal(wide, SnapKV(4, 1)(q, k, lengths, content))  # a global layer: as before
    assert jax.tree.leaves(wide)[0].shape == (1, 1, 20)
