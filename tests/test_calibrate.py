"""Calibration (stage 1c): hand-built attention cases, presets, and the pipeline with rules."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from bounds import assert_within, attention_bound, float32_bound

import pcomp_jax
from pcomp_jax import answer
from pcomp_jax.attention import blockwise_causal_attention, dense_causal_attention
from pcomp_jax.calibrate import (
    CalibrationRule,
    chunk_keep_fn,
    in_region,
    mean_last_query_attention,
    merged_drop_fn,
    preset_rules,
)
from test_pipeline import BASE, make_context


def test_regions_by_rank():
    rank = jnp.arange(10)[None]
    count = jnp.array([[10]])
    expect = {
        "sink": [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        "recent": [0, 0, 0, 0, 0, 0, 0, 1, 1, 1],
        "middle": [0, 0, 0, 1, 1, 1, 1, 0, 0, 0],
        "all": [1] * 10,
    }
    for region, want in expect.items():
        np.testing.assert_array_equal(in_region(rank, count, region, 3)[0], np.array(want, bool), err_msg=region)
    assert not in_region(jnp.array([[-1]]), count, "all", 3).any()  # not part of the sequence


def spiky_qk(t, spikes, heads=4, kv_heads=2, d=8):
    """q/k where every query of KV head g attends almost only to key ``spikes[g]``."""
    q = np.zeros((1, t, heads, d), np.float32)
    k = np.zeros((1, t, kv_heads, d), np.float32)
    for g, s in enumerate(spikes):
        q[0, :, g * (heads // kv_heads) : (g + 1) * (heads // kv_heads), g] = 10.0
        k[0, s, g, g] = 10.0
    return jnp.asarray(q), jnp.asarray(k)


def test_mean_attention_of_last_queries():
    q, k = spiky_qk(12, spikes=[2, 7])
    visible = jnp.ones((1, 1, 12), bool)
    mean = np.asarray(mean_last_query_attention(q[:, -1:], k, visible))
    assert mean.shape == (1, 2, 12)
    assert mean[0, 0, 2] > 0.99 and mean[0, 1, 7] > 0.99
    assert_within(mean.sum(-1), np.ones((1, 2)), float32_bound(1.0, reduction=12, depth=2), "attention row sums")


@pytest.mark.parametrize(
    "region,size,removed",
    [("all", 100, {0: [2], 1: [7]}), ("sink", 3, {0: [2], 1: []}), ("recent", 5, {0: [], 1: [7]}),
     ("middle", 3, {0: [], 1: [7]})],
)
def test_chunk_stage_removes_known_tokens(region, size, removed):
    q, k = spiky_qk(12, spikes=[2, 7])
    rule = CalibrationRule(layers=(1, 2), region=region, region_size=size, threshold=0.5, stage="chunk")
    keep_fn = chunk_keep_fn((rule,), row_lengths=jnp.array([12]))
    keep = np.asarray(keep_fn(q, k, jnp.int32(1)))
    for head, tokens in removed.items():
        assert sorted(np.flatnonzero(~keep[0, head]).tolist()) == tokens
    assert np.asarray(keep_fn(q, k, jnp.int32(0))).all() and np.asarray(keep_fn(q, k, jnp.int32(3))).all()


def test_chunk_stage_ignores_padding_and_threshold():
    q, k = spiky_qk(12, spikes=[2, 9])
    rule = CalibrationRule(layers=(0, 0), region="all", threshold=0.5, stage="chunk")
    keep = np.asarray(chunk_keep_fn((rule,), jnp.array([8]))(q, k, jnp.int32(0)))  # key 9 is padding
    assert not keep[0, 0, 2] and keep[0, 1].all()
    high = CalibrationRule(layers=(0, 0), region="all", threshold=1.0, stage="chunk")
    assert np.asarray(chunk_keep_fn((high,), jnp.array([12]))(q, k, jnp.int32(0))).all()


def test_merged_stage_drops_cache_entries_not_question():
    # Cache slots 0..5 hold content (head 1 has slot 4 invalid), slots 6..7 the question.
    q, k = spiky_qk(8, spikes=[3, 6])
    valid = np.ones((1, 8, 2), bool)
    valid[0, 6:] = False
    valid[0, 4, 1] = False
    rule = CalibrationRule(layers=(0, 0), region="all", threshold=0.5, stage="merged")
    drop = merged_drop_fn((rule,), question_len=jnp.int32(2))
    q_new = q[:, 6:]
    new_valid = np.asarray(drop(q_new, k, jnp.asarray(valid), jnp.int32(0), jnp.array([[6, 7]])))
    expected = valid.copy()
    expected[0, 3, 0] = False  # head 0 attends to slot 3: removed; head 1 to slot 6, a question token: kept
    np.testing.assert_array_equal(new_valid, expected)
    # Rank-based regions count only valid entries of each head: slot 5 is rank 4 for head 1.
    recent = CalibrationRule(layers=(0, 0), region="recent", region_size=1, threshold=0.0, stage="merged")
    dropped = np.asarray(merged_drop_fn((recent,), jnp.int32(2))(q_new, k, jnp.asarray(valid), jnp.int32(0), jnp.array([[6, 7]])))
    assert [np.flatnonzero(valid[0, :, h] & ~dropped[0, :, h]).tolist() for h in range(2)] == [[5], [5]]


def test_blockwise_and_dense_agree_with_key_masks():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 40, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 40, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 40, 2, 8)), jnp.float32)
    keep = jnp.asarray(rng.random((2, 2, 40)) > 0.3)
    assert_within(blockwise_causal_attention(q, k, v, keep, block=16), dense_causal_attention(q, k, v, keep),
                  attention_bound(q, k, v), "blockwise with key masks")


def test_presets_scale_with_depth():
    (rule,) = preset_rules("remove_shallow_middle", 30)
    assert rule.layers == (1, 8) and rule.region == "middle"
    (rule,) = preset_rules("remove_deep_middle", 30)
    assert rule.layers == (22, 29)
    (rule,) = preset_rules("remove_deep_middle", 2)
    assert rule.layers == (1, 1)
    with pytest.raises(pcomp_jax.ConfigError, match="preset 'nope' is unknown"):
        preset_rules("nope", 30)


@pytest.fixture(scope="module")
def model(hf_checkpoints):
    return pcomp_jax.load_model(hf_checkpoints("llama_gqa_untied")[0])


@pytest.mark.slow
def test_rules_that_never_fire_leave_results_bit_identical(model):
    context, question = make_context(120, seed=11), "where is the sun?"
    plain = answer(model, context, question, BASE, max_new_tokens=6)
    never = tuple(CalibrationRule(layers=(0, 1), region="all", threshold=1.0, stage=s) for s in ("chunk", "merged"))
    same = answer(model, context, question, dataclasses.replace(BASE, calibration=never), max_new_tokens=6)
    assert same.chunk_scores == plain.chunk_scores and same.token_ids == plain.token_ids


def test_chunk_rules_change_scores_merged_rules_do_not(model):
    context, question = make_context(120, seed=12), "where is the sun?"
    plain = answer(model, context, question, BASE, max_new_tokens=6)
    rule = lambda stage: (CalibrationRule(layers=(0, 1), region="all", threshold=0.0, stage=stage),)
    chunk = answer(model, context, question, dataclasses.replace(BASE, calibration=rule("chunk")), max_new_tokens=6)
    assert chunk.chunk_scores != plain.chunk_scores
    merged = answer(model, context, question, dataclasses.replace(BASE, calibration=rule("merged")), max_new_tokens=6)
    assert merged.chunk_scores == plain.chunk_scores and merged.token_ids != plain.token_ids


def test_rules_outside_the_model_depth_and_wrong_method(model):
    deep = (CalibrationRule(layers=(1, 5), region="sink"),)
    with pytest.raises(pcomp_jax.PcompError, match=r"layers \[1, 5\] lie outside the model's 2 layers \(allowed: 0 to 1\)"):
        answer(model, make_context(30), "q?", dataclasses.replace(BASE, calibration=deep))
    ok = (CalibrationRule(layers=(0, 1), region="sink"),)
    with pytest.raises(pcomp_jax.ConfigError, match="calibration applies to the chunked methods"):
        answer(model, make_context(30), "q?", dataclasses.replace(BASE, method="full", calibration=ok))
