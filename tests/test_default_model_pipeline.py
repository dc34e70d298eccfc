"""The pipeline on the real default model: with one kept chunk and no eviction, ParallelComp
is exactly full attention over P + that chunk + Q (the equivalence that separates what the
method does from what the model can read). More on the default model:
test_default_model_agreement.py."""

import numpy as np
import pytest

from pcomp_jax import ParallelCompConfig, answer
from pcomp_jax.chunking import chunk_bounds, encode_parts
from pcomp_jax.decode import generate_ids
from pcomp_jax.tasks import make_task

pytestmark = [pytest.mark.default_model, pytest.mark.slow]

# num_devices=1: these check the real model, not sharding (test_sharding.py, test_pipeline.py do);
# its programs split over the suite's four CPU devices take twice as long on a 2-core machine.
ONE_DEVICE = 1


@pytest.fixture(scope="module")
def model(default_model):
    return default_model


@pytest.mark.parametrize("kind, depth", [("passkey", 0.1), ("number_string", 0.9)])
def test_one_kept_chunk_without_eviction_is_full_attention_over_it(model, kind, depth):
    task = make_task(kind, model.tokenizer, 1024, depth, seed=2)  # two chunks of at most 512: one is dropped
    config = ParallelCompConfig(chunk_len=512, top_k_chunks=1, capacity=None, num_devices=ONE_DEVICE)
    ours = answer(model, task.context, task.question, config, max_new_tokens=12)
    parts = encode_parts(model.tokenizer, task.context, task.question, config.instruction, config.answer_prefix,
                         config.chat)
    (chunk,) = ours.selected_chunks
    start, end = chunk_bounds(len(parts.context), config.chunk_len, parts.breaks)[chunk]
    full = generate_ids(model, np.concatenate([parts.prefix, parts.context[start:end], parts.question]), 12)
    assert ours.token_ids == full.token_ids, (ours.text, full.text)
