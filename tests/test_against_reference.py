"""The JAX pipeline against an independent plain-NumPy reading of ALGORITHM.md
(tests/reference_numpy.py, float64) on tiny random models."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import reference_numpy as ref

import pcomp_jax
from pcomp_jax import ParallelCompConfig, answer
from pcomp_jax.chunking import build_rows, encode_parts
from pcomp_jax.decode import stop_token_ids
from pcomp_jax.prefill import document_order, empty_selection, keep_best_chunks, prefill_group
from test_pipeline import make_context

CASES = {
    "evict": ParallelCompConfig(chunk_len=40, top_k_chunks=2, capacity=12, group_size=8),
    "evict_pool3_w4": ParallelCompConfig(chunk_len=56, top_k_chunks=3, capacity=20, obs_window=4, pool_kernel=3, group_size=8),
    "pcw_no_eviction": ParallelCompConfig(method="parallelcomp", chunk_len=40, top_k_chunks=8, capacity=None, group_size=8),
}


@pytest.mark.parametrize("variant", ["llama_gqa_untied", "qwen2_bias"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_pipeline_matches_numpy_reference(hf_checkpoints, variant, case):
    path, _ = hf_checkpoints(variant)
    model = pcomp_jax.load_model(path)
    config = CASES[case]
    context, question = make_context(70, seed=7), "where did the cat sit?"
    parts = encode_parts(model.tokenizer, context, question, config.instruction, config.answer_prefix, config.chat)
    expected = ref.reference_parallelcomp(
        ref.load_reference_model(path), parts.prefix, parts.context, parts.question, config.chunk_len,
        config.top_k_chunks, config.capacity, config.obs_window, config.pool_kernel, 10, stop_token_ids(model),
    )
    ours = answer(model, context, question, config, max_new_tokens=10)
    np.testing.assert_allclose(ours.chunk_scores, expected["chunk_scores"], atol=1e-4)
    assert ours.selected_chunks == expected["selected"]
    assert ours.token_ids == expected["tokens"]

    # Kept token positions for every layer and KV head.
    rows = build_rows(parts, config.chunk_len, model.config.window, num_rows=8)
    capacity = config.capacity or config.chunk_len
    scored = prefill_group(
        model.params, model.config, rows.tokens, rows.positions, rows.row_lengths, rows.chunk_lengths,
        np.arange(8, dtype=np.int32), rows.question_targets, rows.question_mask, rows.score_at,
        prefix_len=rows.prefix_len, capacity=capacity, obs_window=config.obs_window, pool_kernel=config.pool_kernel,
    )
    state = keep_best_chunks(empty_selection(model.config, config.top_k_chunks, capacity, model.dtype), scored, config.top_k_chunks)
    state = state.take(document_order(state.chunk_ids, state.chunk_valid))
    for layer, expected_chunks in enumerate(expected["kept_positions"]):
        for slot, expected_heads in enumerate(expected_chunks):
            valid = np.asarray(state.token_valid[slot])
            kept = np.asarray(state.kept_positions[layer, slot])[:, valid]
            np.testing.assert_array_equal(kept, expected_heads, err_msg=f"layer {layer}, kept chunk {slot}")
