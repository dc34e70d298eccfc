"""Agreement on the real default model: a document read once answers as ``answer`` does;
runs repeat bit for bit; bfloat16 keeps float32's chunks and answer."""

import numpy as np
import pytest
from bounds import assert_within, nll_bound

from pcomp_jax import ParallelCompConfig, answer, read_document
from pcomp_jax.tasks import make_task

pytestmark = [pytest.mark.default_model, pytest.mark.slow]

# num_devices=1: these check the real model, not sharding (test_sharding.py, test_pipeline.py do);
# its programs split over the suite's four CPU devices take twice as long on a 2-core machine.
ONE_DEVICE = 1


@pytest.fixture(scope="module")
def model(default_model):
    return default_model


@pytest.fixture(scope="module")
def passkey(model):
    """A 1536-token passkey input (3 chunks of at most 512), its config, and answer()'s result."""
    task = make_task("passkey", model.tokenizer, 1536, 0.4, seed=3)
    config = ParallelCompConfig(chunk_len=512, top_k_chunks=2, capacity=128, num_devices=ONE_DEVICE)
    return task, config, answer(model, task.context, task.question, config, max_new_tokens=12)


def test_document_answers_a_passkey_as_answer_does(model, passkey):
    task, config, reference = passkey
    ours = read_document(model, task.context, config).ask(task.question, max_new_tokens=12)
    assert ours.num_chunks == reference.num_chunks >= 3
    assert_within(ours.chunk_scores, reference.chunk_scores,
                  nll_bound(model.config, reference.chunk_scores, row_len=config.chunk_len + 64), "chunk scores")
    assert ours.selected_chunks == reference.selected_chunks
    assert ours.token_ids == reference.token_ids and task.is_correct(ours.text), (ours.text, reference.text)


def test_runs_repeat_exactly_and_bfloat16_agrees_with_float32(model, default_model_bfloat16, passkey):
    # Measured (2026-11-25, 2048-token passkeys at depths 0.3 and 0.8; 2026-11-26, this input):
    # same chunks and answer in both dtypes; chunk scores (mean question NLL, 1.2-2.4) differ
    # by at most 0.012.
    task, config, first = passkey
    again = answer(model, task.context, task.question, config, max_new_tokens=12)
    assert again.token_ids == first.token_ids and again.chunk_scores == first.chunk_scores  # bit for bit
    bf16 = answer(default_model_bfloat16, task.context, task.question, config, max_new_tokens=12)
    assert bf16.selected_chunks == first.selected_chunks
    assert task.is_correct(first.text) and task.is_correct(bf16.text), (first.text, bf16.text)
    print("largest chunk-score difference, bfloat16 - float32:",
          np.abs(np.asarray(bf16.chunk_scores) - np.asarray(first.chunk_scores)).max())
    assert np.abs(np.asarray(bf16.chunk_scores) - np.asarray(first.chunk_scores)).max() < 0.05
