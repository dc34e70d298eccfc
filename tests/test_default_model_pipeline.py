"""The pipeline on the real default model: with one kept chunk and no eviction, ParallelComp
is exactly full attention over P + that chunk + Q (the equivalence that separates what the
method does from what the model can read); a document read once answers as ``answer`` does."""

import numpy as np
import pytest

import pcomp_jax
from pcomp_jax import ParallelCompConfig, answer, read_document
from pcomp_jax.chunking import chunk_bounds, encode_parts
from pcomp_jax.decode import generate_ids
from pcomp_jax.tasks import make_task

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def model():
    return pcomp_jax.load_model()


@pytest.mark.parametrize("kind, depth", [("passkey", 0.1), ("passkey", 0.6), ("number_string", 0.9)])
def test_one_kept_chunk_without_eviction_is_full_attention_over_it(model, kind, depth):
    task = make_task(kind, model.tokenizer, 3072, depth, seed=2)
    config = ParallelCompConfig(chunk_len=512, top_k_chunks=1, capacity=None)
    ours = answer(model, task.context, task.question, config, max_new_tokens=12)
    parts = encode_parts(model.tokenizer, task.context, task.question, config.instruction, config.answer_prefix,
                         config.chat)
    (chunk,) = ours.selected_chunks
    start, end = chunk_bounds(len(parts.context), config.chunk_len, parts.breaks)[chunk]
    full = generate_ids(model, np.concatenate([parts.prefix, parts.context[start:end], parts.question]), 12)
    assert ours.token_ids == full.token_ids, (ours.text, full.text)


def test_document_answers_a_passkey_as_answer_does(model):
    task = make_task("passkey", model.tokenizer, 3072, 0.4, seed=3)
    config = ParallelCompConfig(chunk_len=512, top_k_chunks=2, capacity=128)
    ours = read_document(model, task.context, config).ask(task.question, max_new_tokens=12)
    reference = answer(model, task.context, task.question, config, max_new_tokens=12)
    assert ours.num_chunks == reference.num_chunks >= 6
    np.testing.assert_allclose(ours.chunk_scores, reference.chunk_scores, atol=1e-5, rtol=0)
    assert ours.selected_chunks == reference.selected_chunks
    assert ours.token_ids == reference.token_ids and task.is_correct(ours.text), (ours.text, reference.text)


def test_runs_repeat_exactly_and_bfloat16_agrees_with_float32(model):
    # Measured (2026-11-25, 2048-token passkey at depths 0.3 and 0.8, capacity 128): same chunks
    # and answer in both dtypes; chunk scores (mean question NLL, 1.2-2.4) differ by at most 0.012.
    task = make_task("passkey", model.tokenizer, 2048, 0.3, seed=4)
    config = ParallelCompConfig(chunk_len=512, top_k_chunks=2, capacity=128)
    first = answer(model, task.context, task.question, config, max_new_tokens=10)
    again = answer(model, task.context, task.question, config, max_new_tokens=10)
    assert again.token_ids == first.token_ids and again.chunk_scores == first.chunk_scores  # bit for bit
    bf16 = answer(pcomp_jax.load_model(None, dtype="bfloat16"), task.context, task.question, config, max_new_tokens=10)
    assert bf16.selected_chunks == first.selected_chunks
    assert task.is_correct(first.text) and task.is_correct(bf16.text), (first.text, bf16.text)
    assert np.abs(np.asarray(bf16.chunk_scores) - np.asarray(first.chunk_scores)).max() < 0.05
