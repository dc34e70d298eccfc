"""The JAX pipeline against an independent plain-NumPy reading of docs/algorithm.md
(tests/reference_numpy.py, float64) on tiny random models."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bounds import assert_within, model_bound, nll_bound, scale_of
import reference_numpy as ref
import tiny

import pcomp_jax
from pcomp_jax import ParallelCompConfig, answer
from pcomp_jax.chunking import build_rows, chunk_bounds, encode_parts
from pcomp_jax.calibrate import CalibrationRule
from pcomp_jax.decode import DecodeEviction, StageEviction, decode_jit, stop_token_ids
from pcomp_jax.merge import ContextCache, MergeSpec, merged_forward, question_prefill
from pcomp_jax.compress import SnapKV
from pcomp_jax.prefill import (
    MERGE_LAYOUTS,
    PrefillSpec,
    document_order,
    empty_selection,
    keep_best_chunks,
    merge_selection,
    prefill_group,
    prefill_prefix,
)
from test_pipeline import make_context

pytestmark = pytest.mark.slow  # subprocesses or whole pipelines: the full suite, not the fast tier

CASES = {
    "evict": ParallelCompConfig(chunk_len=40, top_k_chunks=2, capacity=12, group_size=8),
    "evict_pool3_w4": ParallelCompConfig(chunk_len=56, top_k_chunks=3, capacity=20, obs_window=4, pool_kernel=3, group_size=8),
    "pcw_no_eviction": ParallelCompConfig(method="parallelcomp", chunk_len=40, top_k_chunks=8, capacity=None, group_size=8),
    "sequential": ParallelCompConfig(chunk_len=40, top_k_chunks=3, capacity=12, group_size=8, merge_layout="sequential"),
}


def make_sentences(n_words: int, seed: int) -> str:
    """Words with a full stop after every 3 to 9 of them, so that chunks end at sentence ends."""
    words = make_context(n_words, seed).split()
    ends = np.cumsum(np.random.default_rng(seed).integers(3, 10, size=n_words))
    return " ".join(w + ("." if i + 1 in ends else "") for i, w in enumerate(words)) + "."


# Every case on the Llama variant; Qwen2's biases on the cases that touch keys differently
# (eviction, the sequential layout's rotation), to keep the suite's time down.
PIPELINE_RUNS = [(case, "llama_gqa_untied") for case in sorted(CASES) + ["sentences"]] + [
    ("evict", "qwen2_bias"), ("sequential", "qwen2_bias")] + [
    # the families: Gemma 3's local layers (a window shorter than a chunk row, the merged
    # cache's positions, keys rotated on with each layer's rope) in both layouts; Qwen3's
    # QK-norm where keys are rotated on
    ("evict", "gemma3_local"), ("sequential", "gemma3_local"), ("sequential", "qwen3")]


@pytest.mark.parametrize("case, variant", PIPELINE_RUNS)
def test_pipeline_matches_numpy_reference(hf_checkpoints, variant, case):
    path, _ = hf_checkpoints(variant)
    model = pcomp_jax.load_model(path)
    config = CASES.get(case, CASES["evict"])
    context, question = make_context(70, seed=7), "where did the cat sit?"
    if case == "sentences":
        context = make_sentences(70, seed=7)
    parts = encode_parts(model.tokenizer, context, question, config.instruction, config.answer_prefix, config.chat)
    expected = ref.reference_parallelcomp(
        ref.load_reference_model(path), parts.prefix, parts.context, parts.question, config.chunk_len,
        config.top_k_chunks, config.capacity, config.obs_window, config.pool_kernel, 10, stop_token_ids(model),
        bounds=chunk_bounds(len(parts.context), config.chunk_len, parts.breaks),  # chunks end at sentence ends
        merge_layout=config.merge_layout,
    )
    ours = answer(model, context, question, config, max_new_tokens=10)
    assert_within(ours.chunk_scores, expected["chunk_scores"],
                  nll_bound(model.config, expected["chunk_scores"], row_len=model.config.window), "chunk scores")
    assert ours.selected_chunks == expected["selected"]
    assert ours.token_ids == expected["tokens"]
    if case == "sentences":  # every chunk ends at a sentence end (the last at the text's end)
        text_ends = [model.tokenizer.decode(parts.context[:e]).rstrip() for _, e in chunk_bounds(
            len(parts.context), config.chunk_len, parts.breaks)]
        assert len(text_ends) > 2 and all(t.endswith(".") for t in text_ends), text_ends

    # Kept token positions for every layer and KV head.
    rows = build_rows(parts, config.chunk_len, model.config.window, num_rows=8)
    spec = PrefillSpec(capacity=config.capacity, token_scorer=SnapKV(config.obs_window, config.pool_kernel),
                       attention="dense")
    capacity = spec.kept_tokens(rows)
    scored = prefill_group(model.params, model.config, rows, spec)
    state = keep_best_chunks(empty_selection(model.config, config.top_k_chunks, capacity, model.dtype), scored, config.top_k_chunks)
    state = state.take(document_order(state.chunk_ids, state.chunk_valid))
    for layer, expected_chunks in enumerate(expected["kept_positions"]):
        for slot, expected_heads in enumerate(expected_chunks):
            valid = np.asarray(state.token_valid[slot])
            kept = np.asarray(state.kept_positions[layer, slot])[:, valid]
            np.testing.assert_array_equal(kept, expected_heads, err_msg=f"layer {layer}, kept chunk {slot}")
    if variant in tiny.FAMILY_VARIANTS:  # the question on the merged cache, logit by logit
        prefix_k, prefix_v = prefill_prefix(model.params, model.config, jnp.asarray(parts.prefix))
        question = np.zeros(64, np.int32)
        question[: len(parts.question)] = parts.question
        merge_spec = MergeSpec(layout=MERGE_LAYOUTS[config.merge_layout])
        logits, _, _ = jax.jit(lambda w, c: merged_forward(w, model.config, c, jnp.asarray(question),
                                                           jnp.int32(len(parts.question)), merge_spec, room=80))(
            model.params, ContextCache(prefix_k, prefix_v, state))
        want = expected["question_logits"]
        assert_within(logits[: len(want)], want, model_bound(model.config, scale_of(want), row_len=model.config.window),
                      "question logits on the merged cache")


CALIBRATION_CASES = {
    "chunk_sink_and_middle": (
        CalibrationRule(layers=(0, 0), region="sink", region_size=6, threshold=0.05, last_queries=1, stage="chunk"),
        CalibrationRule(layers=(1, 1), region="middle", region_size=10, threshold=0.02, last_queries=3, stage="chunk"),
    ),
    "merged_all_recent": (
        CalibrationRule(layers=(0, 1), region="all", threshold=0.04, last_queries=2, stage="merged"),
        CalibrationRule(layers=(1, 1), region="recent", region_size=12, threshold=0.02, last_queries=1, stage="merged"),
    ),
    "both_stages": (
        CalibrationRule(layers=(0, 1), region="all", threshold=0.05, last_queries=4, stage="chunk"),
        CalibrationRule(layers=(0, 0), region="sink", region_size=20, threshold=0.03, last_queries=1, stage="merged"),
    ),
}


def as_reference_rules(rules):
    return [dict(first=r.layers[0], last=r.layers[1], region=r.region, size=r.region_size, threshold=r.threshold,
                 last_queries=r.last_queries, stage=r.stage) for r in rules]


@pytest.mark.parametrize("case", sorted(CALIBRATION_CASES))
def test_calibration_matches_numpy_reference(hf_checkpoints, case):
    path, _ = hf_checkpoints("llama_gqa_untied")
    model = pcomp_jax.load_model(path)
    rules = CALIBRATION_CASES[case]
    config = dataclasses.replace(CASES["evict"], calibration=rules)
    context, question = make_context(70, seed=8), "what ran in the sun?"
    parts = encode_parts(model.tokenizer, context, question, config.instruction, config.answer_prefix, config.chat)
    expected = ref.reference_parallelcomp(
        ref.load_reference_model(path), parts.prefix, parts.context, parts.question, config.chunk_len,
        config.top_k_chunks, config.capacity, config.obs_window, config.pool_kernel, 10, stop_token_ids(model),
        calibration=as_reference_rules(rules), bounds=chunk_bounds(len(parts.context), config.chunk_len, parts.breaks),
        merge_layout=config.merge_layout,
    )
    fired = sum(len(h) for c in expected["chunk_masked"] for layer in c for h in layer)
    fired += sum(len(h) for layer in expected["merged_masked"] for h in layer)
    assert fired > 0, "the rules must remove something, or this test proves nothing"
    ours = answer(model, context, question, config, max_new_tokens=10)
    assert_within(ours.chunk_scores, expected["chunk_scores"],
                  nll_bound(model.config, expected["chunk_scores"], row_len=model.config.window), "chunk scores")
    assert ours.selected_chunks == expected["selected"]
    assert ours.token_ids == expected["tokens"]

    # The merged-stage removals, rank by rank, from the cache the question prefill leaves.
    merged = tuple(r for r in rules if r.stage == "merged")
    if not merged:
        return
    chunk_rules = tuple(r for r in rules if r.stage == "chunk")
    spec = PrefillSpec(capacity=config.capacity, token_scorer=SnapKV(config.obs_window, config.pool_kernel),
                       attention="dense", chunk_rules=chunk_rules)
    for layer, head, removed in removed_from_merged_cache(model, parts, config, spec, MergeSpec(rules=merged)):
        assert removed == expected["merged_masked"][layer][head], f"layer {layer}, KV head {head}"


def top2_selection(model, parts, config, spec):
    """Stage 1 by hand: the top-2 selection of ``spec``'s chunk prefill, P's K/V, and the
    question padded to 64 ids."""
    rows = build_rows(parts, config.chunk_len, model.config.window)
    state = empty_selection(model.config, 2, spec.kept_tokens(rows), model.dtype)
    for group in rows.groups(8):
        state = keep_best_chunks(state, prefill_group(model.params, model.config, group, spec), 2)
    prefix_k, prefix_v = prefill_prefix(model.params, model.config, jnp.asarray(parts.prefix))
    question_ids = np.zeros(64, np.int32)
    question_ids[: len(parts.question)] = parts.question
    return state, prefix_k, prefix_v, question_ids


def removed_from_merged_cache(model, parts, config, spec, merge_spec):
    """(layer, KV head, ranks among the merged cache's valid entries that the question
    prefill removed) for the top-2 selection of ``spec``'s chunk prefill."""
    state, prefix_k, prefix_v, question_ids = top2_selection(model, parts, config, spec)
    before, _ = merge_selection(prefix_k, prefix_v, state, room=64 + 16)
    after = question_prefill(model.params, model.config, ContextCache(prefix_k, prefix_v, state),
                             jnp.asarray(question_ids), jnp.int32(len(parts.question)), merge_spec, num_steps=16).cache
    content = np.asarray(before.valid[:, 0])  # [L, S, KVH]
    kept = np.asarray(after.valid[:, 0])
    for layer in range(content.shape[0]):
        for head in range(content.shape[2]):
            valid_slots = np.flatnonzero(content[layer, :, head])
            yield layer, head, [i for i, slot in enumerate(valid_slots) if not kept[layer, slot, head]]

@pytest.mark.parametrize("variant", ["llama_gqa_untied", "gemma3_local"])  # Gemma 3: local layers score what the
# question's windows show; Qwen2's biases: the decode-eviction test
def test_stage_eviction_matches_numpy_reference(hf_checkpoints, variant):
    """Stage eviction (chunks whole through stage 1, the merged cache cut to capacity x k by
    the question's SnapKV scores): scores, selection, tokens and every evicted entry."""
    path, _ = hf_checkpoints(variant)
    model = pcomp_jax.load_model(path)
    config = dataclasses.replace(CASES["evict"], capacity=10, obs_window=4, pool_kernel=3, stage_eviction=True)
    context, question = make_sentences(80, seed=9), "who sat on the mat?"
    parts = encode_parts(model.tokenizer, context, question, config.instruction, config.answer_prefix, config.chat)
    bounds = chunk_bounds(len(parts.context), config.chunk_len, parts.breaks)
    budget = config.capacity * config.top_k_chunks
    expected = ref.reference_parallelcomp(
        ref.load_reference_model(path), parts.prefix, parts.context, parts.question, config.chunk_len,
        config.top_k_chunks, None, config.obs_window, config.pool_kernel, 10, stop_token_ids(model),
        bounds=bounds, stage_budget=budget, merge_layout=config.merge_layout,
    )
    assert sum(len(h) for layer in expected["merged_evicted"] for h in layer) > 0, "nothing evicted: a vacuous test"
    ours = answer(model, context, question, config, max_new_tokens=10)
    assert_within(ours.chunk_scores, expected["chunk_scores"],
                  nll_bound(model.config, expected["chunk_scores"], row_len=model.config.window), "chunk scores")
    assert ours.selected_chunks == expected["selected"]
    assert ours.token_ids == expected["tokens"]

    # Which merged-cache entries each layer and KV head evicted, by rank among the valid ones.
    spec = PrefillSpec(capacity=None, token_scorer=SnapKV(config.obs_window, config.pool_kernel))
    eviction = StageEviction(budget, SnapKV(config.obs_window, config.pool_kernel))
    kept_chunk_tokens = sum(bounds[c][1] - bounds[c][0] for c in ours.selected_chunks)
    for layer, head, evicted in removed_from_merged_cache(model, parts, config, spec, MergeSpec(eviction=eviction)):
        assert evicted == expected["merged_evicted"][layer][head], f"layer {layer}, KV head {head}"
        assert len(evicted) == kept_chunk_tokens - budget  # exactly the budget stays


@pytest.mark.parametrize("variant", ["qwen2_bias"])  # Llama: the stage-eviction test
def test_decode_eviction_matches_numpy_reference(hf_checkpoints, variant):
    """Decode-time eviction (the cache held at its size after the question while decoding):
    the answer's tokens, and every entry each layer and KV head evicted while decoding."""
    path, _ = hf_checkpoints(variant)
    model = pcomp_jax.load_model(path)
    config = dataclasses.replace(CASES["evict"], obs_window=4, pool_kernel=3, decode_eviction=True)
    context, question = make_sentences(80, seed=11), "what did the dog eat?"
    parts = encode_parts(model.tokenizer, context, question, config.instruction, config.answer_prefix, config.chat)
    bounds = chunk_bounds(len(parts.context), config.chunk_len, parts.breaks)
    reference_model = ref.load_reference_model(path)

    def reference(max_new_tokens, stop_ids):
        return ref.reference_parallelcomp(
            reference_model, parts.prefix, parts.context, parts.question, config.chunk_len, config.top_k_chunks,
            config.capacity, config.obs_window, config.pool_kernel, max_new_tokens, stop_ids, bounds=bounds,
            decode_eviction=True, merge_layout=config.merge_layout)

    expected = reference(10, stop_token_ids(model))
    ours = answer(model, context, question, config, max_new_tokens=10)
    assert ours.selected_chunks == expected["selected"]
    assert ours.token_ids == expected["tokens"]

    # The evicted entries, decoding n tokens with no stop token (each fed: n evictions).
    n = 12
    expected = reference(n + 1, [])
    spec = PrefillSpec(capacity=config.capacity, token_scorer=SnapKV(config.obs_window, config.pool_kernel))
    state, prefix_k, prefix_v, question_ids = top2_selection(model, parts, config, spec)
    eviction = DecodeEviction(SnapKV(config.obs_window, config.pool_kernel))
    start = question_prefill(model.params, model.config, ContextCache(prefix_k, prefix_v, state),
                             jnp.asarray(question_ids), jnp.int32(len(parts.question)),
                             MergeSpec(decode_eviction=eviction), num_steps=16)
    done = decode_jit(model.params, model.config, start, jnp.array([-1], jnp.int32), jnp.int32(n), eviction)
    cache, final = start.cache, done.cache
    assert np.asarray(done.emitted)[0, :n].tolist() == expected["tokens"][:n]
    end = int(cache.end[0])
    held = np.array(cache.valid[:, 0])  # [L, S, KVH] after the question
    held[:, end: end + n] = True  # the fed tokens' slots
    kept = np.asarray(final.valid[:, 0])
    for layer in range(held.shape[0]):
        for head in range(held.shape[2]):
            present = np.flatnonzero(held[layer, :, head])
            evicted = [i for i, slot in enumerate(present) if not kept[layer, slot, head]]
            assert evicted == sorted(step[layer][head] for step in expected["decode_evicted"]), (layer, head)
            assert len(evicted) == n
