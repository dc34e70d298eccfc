"""The ParallelComp pipeline on a tiny random model: invariances, the full-attention limit,
static shapes, and bad input."""

import dataclasses

import numpy as np
import pytest
from bounds import assert_within, nll_bound

import pcomp_jax
from pcomp_jax import ParallelCompConfig, answer
from pcomp_jax.chunking import build_rows, chunk_bounds, encode_parts, question_bucket
from pcomp_jax.decode import generate_ids
from pcomp_jax.prefill import prefill_group

WORDS = "the cat sat on a mat and then ran in the sun as the other one slept there".split()


def make_context(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words))


@pytest.fixture(scope="module")
def model(hf_checkpoints):
    return pcomp_jax.load_model(hf_checkpoints("llama_gqa_untied")[0])


BASE = ParallelCompConfig(chunk_len=48, top_k_chunks=2, capacity=16, group_size=4, chat=True)


def test_chunk_bounds_near_equal():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 7), (7, 10)]
    assert chunk_bounds(8, 8) == [(0, 8)]
    sizes = [e - s for s, e in chunk_bounds(1001, 100)]
    assert len(sizes) == 11 and max(sizes) - min(sizes) <= 1 and sum(sizes) == 1001


def test_rows_layout(model):
    parts = encode_parts(model.tokenizer, make_context(60), "where is the cat?", "Read.", "Answer:", True)
    rows = build_rows(parts, 48, model.config.window, num_rows=8)
    p, q = len(parts.prefix), len(parts.question)
    n = rows.num_chunks
    assert n == len(chunk_bounds(len(parts.context), 48)) and rows.tokens.shape[0] == 8
    for i in range(n):
        c = rows.chunk_lengths[i]
        assert rows.row_lengths[i] == p + c + q
        np.testing.assert_array_equal(rows.positions[i, : p + c + q], np.arange(p + c + q))
        np.testing.assert_array_equal(rows.tokens[i, p + c : p + c + q], parts.question)
        np.testing.assert_array_equal(rows.tokens[i, rows.score_at[i, :q] + 1], parts.question)
    assert (rows.chunk_lengths[n:] == 0).all() and (rows.row_lengths[n:] == 0).all()


def test_single_chunk_without_eviction_equals_full_attention(model):
    context, question = make_context(50, seed=1), "what did the cat do?"
    config = dataclasses.replace(BASE, chunk_len=512, capacity=None, top_k_chunks=1)
    ours = answer(model, context, question, config, max_new_tokens=8)
    assert ours.num_chunks == 1 and ours.selected_chunks == [0]
    parts = encode_parts(model.tokenizer, context, question, config.instruction, config.answer_prefix, config.chat)
    full = generate_ids(model, np.concatenate([parts.prefix, parts.context, parts.question]), 8)
    assert ours.token_ids == full.token_ids
    assert answer(model, context, question, dataclasses.replace(config, method="full"), 8).token_ids == full.token_ids
    assert answer(model, context, question, dataclasses.replace(config, method="pcw"), 8).token_ids == full.token_ids


@pytest.mark.slow
@pytest.mark.parametrize("changed", [dict(num_devices=1), dict(group_size=1, num_devices=1), dict(group_size=8)])
def test_devices_and_group_size_do_not_change_results(model, changed):
    context, question = make_context(150, seed=2), "who slept in the sun?"
    reference = answer(model, context, question, dataclasses.replace(BASE, num_devices=4), max_new_tokens=6)
    assert reference.num_chunks >= 4
    other = answer(model, context, question, dataclasses.replace(BASE, **changed), max_new_tokens=6)
    assert other.selected_chunks == reference.selected_chunks
    assert other.token_ids == reference.token_ids
    assert_within(other.chunk_scores, reference.chunk_scores, nll_bound(model.config, reference.chunk_scores,
                                                                         row_len=model.config.window), "chunk scores")


def test_selection_keeps_the_lowest_nll_chunks(model):
    result = answer(model, make_context(150, seed=3), "is the mat red?", BASE, max_new_tokens=4)
    best = sorted(np.argsort(result.chunk_scores, kind="stable")[: BASE.top_k_chunks].tolist())
    assert result.selected_chunks == best


def test_inputs_in_one_bucket_compile_nothing_new(model):
    config = dataclasses.replace(BASE, group_size=4)
    questions = ["where is the cat?", "what ran?", "where did the one sleep?", "who sat?", "is the mat red?",
                 "where did the cat sit on the mat?"]
    lengths = {q: len(encode_parts(model.tokenizer, "x", q, config.instruction, config.answer_prefix,
                                   config.chat).question) for q in questions}
    first = questions[0]
    others = [q for q in questions[1:] if question_bucket(lengths[q]) == question_bucket(lengths[first])]
    assert len(others) >= 2 and len({lengths[q] for q in others + [first]}) >= 2  # unequal lengths, one bucket
    answer(model, make_context(120, seed=4), first, config, max_new_tokens=4)
    before = prefill_group._cache_size()
    for seed, (words, question) in enumerate(zip([135, 100, 110], others)):
        answer(model, make_context(words, seed=5 + seed), question, config, max_new_tokens=3 + seed)
    assert prefill_group._cache_size() == before


def test_bad_inputs(model):
    with pytest.raises(pcomp_jax.PcompError, match="context is empty"):
        answer(model, "   ", "q?", BASE)
    with pytest.raises(pcomp_jax.PcompError, match="question is empty"):
        answer(model, "some text", "", BASE)
    with pytest.raises(pcomp_jax.InputTooLongError, match="does not fit in the model's window of 256 tokens"):
        answer(model, make_context(20), "why " * 200, BASE)
    with pytest.raises(pcomp_jax.ConfigError, match="group_size=3 must be a multiple of the number of devices"):
        answer(model, make_context(20), "q?", dataclasses.replace(BASE, group_size=3, num_devices=2))
    with pytest.raises(pcomp_jax.ConfigError, match="must be a pcomp_jax.ParallelCompConfig"):
        answer(model, make_context(20), "q?", {"chunk_len": 4})
    with pytest.raises(pcomp_jax.PcompError, match="max_new_tokens must be a positive integer"):
        answer(model, make_context(20), "q?", BASE, max_new_tokens=0)


@pytest.mark.slow
def test_pcw_never_evicts_and_small_inputs_use_small_groups(model):
    context, question = make_context(60, seed=9), "who ran?"
    pcw = dataclasses.replace(BASE, method="pcw", capacity=16)
    no_cap = dataclasses.replace(BASE, method="pcw", capacity=None)
    a, b = answer(model, context, question, pcw, 5), answer(model, context, question, no_cap, 5)
    assert a.token_ids == b.token_ids and a.selected_chunks == b.selected_chunks == list(range(a.num_chunks))
    big_group = answer(model, context, question, dataclasses.replace(BASE, group_size=64), 5)
    assert big_group.token_ids == answer(model, context, question, BASE, 5).token_ids


def test_device_and_backend_errors_are_config_errors(model):
    with pytest.raises(pcomp_jax.ConfigError, match="num_devices must be between 1 and 4"):
        answer(model, make_context(20), "q?", dataclasses.replace(BASE, num_devices=9, group_size=9))
    with pytest.raises(pcomp_jax.ConfigError, match="cudnn attention backend needs an NVIDIA GPU"):
        answer(model, make_context(20), "q?", dataclasses.replace(BASE, attention="cudnn"))


def test_tasks_accept_several_answers():
    from pcomp_jax.tasks import Task

    task = Task("ctx", "q", ["Paris", "paris"])
    assert task.is_correct("it is paris") and not task.is_correct("Lyon")
    assert not Task("ctx", "q", "").is_correct("anything")
