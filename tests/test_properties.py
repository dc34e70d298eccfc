"""Properties of the pure transforms over widely varying inputs (hypothesis): eviction,
selection, calibration's masks, and padding invariance of token scoring. Chunking's own
properties are in test_chunking.py."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from bounds import assert_within, attention_bound, scale_of

from pcomp_jax.calibrate import CalibrationRule, removed_by_rules
from pcomp_jax.compress import document_order, keep_top_tokens, snapkv_token_scores, top_k_lowest
from pcomp_jax.prefill import ChunkArrangement, ChunkSelection

SETTINGS = settings(max_examples=25, deadline=None)
B, T, KVH, GROUP, D = 2, 64, 2, 3, 8  # fixed shapes (JAX compiles once per shape): lengths vary as data


@st.composite
def rows(draw):
    """Random rotated q, k of rows P + chunk + Q + padding (shapes fixed, lengths drawn), with
    each row's content span and the shortest chunk."""
    prefix, question = draw(st.integers(0, 6)), draw(st.integers(1, 6))
    chunk = draw(st.lists(st.integers(8, T - 12), min_size=B, max_size=B))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    q = jnp.asarray(rng.normal(size=(B, T, KVH * GROUP, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, KVH, D)), jnp.float32)
    lengths = np.array([prefix + c + question for c in chunk])
    slot = np.arange(T)[None]
    content = (slot >= prefix) & (slot < prefix + np.array(chunk)[:, None])
    return q, k, lengths, content, min(chunk)


@SETTINGS
@given(rows(), st.sampled_from([1, 4]), st.sampled_from([1, 7]), st.sampled_from([1, 5, 8]))
def test_eviction_keeps_exactly_capacity_chunk_tokens_per_kv_head(case, window, pool, capacity):
    q, k, lengths, content, _ = case  # every chunk has at least 8 tokens
    scores = snapkv_token_scores(q, k, jnp.asarray(lengths), window, pool, jnp.asarray(content))
    idx, valid = map(np.asarray, keep_top_tokens(scores, capacity))
    assert valid.all()  # every row has at least `capacity` chunk tokens: all kept slots are real
    for b in range(idx.shape[0]):
        for h in range(idx.shape[1]):
            kept = idx[b, h]
            assert len(set(kept)) == capacity and (np.diff(kept) > 0).all()  # distinct, in position order
            assert content[b, kept].all()  # never prefix, question or padding


@SETTINGS
@given(rows())
def test_padding_after_the_rows_never_changes_token_scores(case):
    q, k, lengths, content, _ = case
    extra = 5
    pad = lambda x: jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)), constant_values=3.0)  # not zeros: any values
    base = snapkv_token_scores(q, k, jnp.asarray(lengths), 4, 3, jnp.asarray(content))
    padded = snapkv_token_scores(pad(q), pad(k), jnp.asarray(lengths), 4, 3,
                                 jnp.asarray(np.pad(content, ((0, 0), (0, extra)))))
    # scores are sums of softmax weights: attention_bound's model with unit values, times their size
    bound = attention_bound(q, k, np.ones(k.shape)) * max(1.0, scale_of(base))
    assert_within(padded[..., : q.shape[1]], base, bound, "token scores")
    assert np.isneginf(np.asarray(padded[..., q.shape[1]:])).all()


@SETTINGS
@given(st.sampled_from([5, 24]), st.sampled_from([1, 3, 6]), st.data())
def test_selection_returns_k_distinct_real_chunks_in_document_order(n, k, data):
    scores = np.asarray(data.draw(st.lists(st.floats(-50, 50, allow_nan=False), min_size=n, max_size=n)), np.float32)
    valid = np.asarray(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    idx, picked = map(np.asarray, top_k_lowest(jnp.asarray(scores), jnp.asarray(valid), k))
    real = idx[picked]
    assert len(real) == min(k, int(valid.sum())) and len(set(real)) == len(real) and valid[real].all()
    worst_kept = scores[real].max() if len(real) else np.inf
    assert not (valid & (scores < worst_kept) & ~np.isin(np.arange(n), real)).any()  # nothing better left out
    order = np.asarray(document_order(jnp.asarray(idx), jnp.asarray(picked)))
    in_order = idx[order][picked[order]]
    assert (np.diff(in_order) > 0).all() and picked[order][: len(real)].all()  # real ones first, by position


@SETTINGS
@given(st.sampled_from([3, 6]), st.data())
def test_an_arrangement_reads_the_chunks_within_its_margin_in_its_order(k, data):
    scores = np.asarray(data.draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=k, max_size=k)), np.float32)
    scores[data.draw(st.integers(0, k - 1))] = scores[0]  # ties happen (equal NLLs)
    valid = np.asarray(data.draw(st.lists(st.booleans(), min_size=k, max_size=k)))
    ids = np.asarray(data.draw(st.permutations(range(0, 3 * k, 3))), np.int32)
    order = data.draw(st.sampled_from(["document", "relevance"]))
    margin = data.draw(st.sampled_from([None, 0.0, 0.5, 3.0]))
    one = lambda x: jnp.asarray(x)[None, :, None, None, None]  # a field with the chunk axis at 1
    selection = ChunkSelection(
        keys=one(ids.astype(np.float32)), values=one(scores), kept_positions=jnp.zeros((1, k, 1, 1), jnp.int32),
        token_valid=jnp.ones((k, 1), bool), scores=jnp.asarray(scores), chunk_ids=jnp.asarray(ids),
        chunk_valid=jnp.asarray(valid), row_lengths=jnp.asarray(ids + 5))
    laid = ChunkArrangement(order, margin).apply(selection)
    best = scores[valid].min() if valid.any() else np.inf
    read = valid & (scores <= best + (np.inf if margin is None else margin))
    expected = sorted(np.flatnonzero(read), key=lambda i: (ids[i],) if order == "document" else (-scores[i], ids[i]))
    n = len(expected)
    assert np.asarray(laid.chunk_valid).tolist() == [True] * n + [False] * (k - n)  # read ones first
    assert np.asarray(laid.chunk_ids)[:n].tolist() == ids[expected].tolist()
    # every field moved with its chunk
    assert np.asarray(laid.keys)[0, :, 0, 0, 0].tolist() == np.asarray(laid.chunk_ids, np.float32).tolist()
    assert np.array_equal(np.asarray(laid.values)[0, :, 0, 0, 0], np.asarray(laid.scores))
    assert np.array_equal(np.asarray(laid.row_lengths), np.asarray(laid.chunk_ids) + 5)
    if margin is None and order == "document":
        assert np.array_equal(np.asarray(laid.chunk_ids), ids[np.asarray(document_order(jnp.asarray(ids),
                                                                                       jnp.asarray(valid)))])


@SETTINGS
@given(st.integers(4, 40), st.integers(0, 11), st.data())
def test_calibration_removes_only_tokens_above_threshold_in_its_region_and_layers(count, layer, data):
    region = data.draw(st.sampled_from(["sink", "middle", "recent"]))
    first = data.draw(st.integers(0, 11))
    rule = CalibrationRule(layers=(first, data.draw(st.integers(first, 11))), region=region,
                           threshold=data.draw(st.floats(0.0, 0.2)), region_size=data.draw(st.integers(1, 5)))
    s = 48  # slots past `count` are not part of the sequence
    mean = jnp.asarray(np.random.default_rng(data.draw(st.integers(0, 2**31))).dirichlet(np.ones(s), size=(1, 2)),
                       jnp.float32)  # [B=1, KVH=2, S]
    rank = jnp.where(jnp.arange(s) < count, jnp.arange(s), -1)[None, None]
    removed = np.asarray(removed_by_rules((rule,), jnp.int32(layer), lambda r: mean, rank, jnp.int32(count)))
    positions = np.arange(s)
    in_region = {"sink": positions < rule.region_size, "recent": (positions >= count - rule.region_size),
                 "middle": (positions >= rule.region_size) & (positions < count - rule.region_size)}[region]
    expected = (rule.layers[0] <= layer <= rule.layers[1]) & in_region & (positions < count) & (np.asarray(mean) > rule.threshold)
    np.testing.assert_array_equal(removed, expected)
