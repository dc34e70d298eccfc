"""A document read once (``read_document``) answers every question as ``answer`` does:
the same chunk scores (to float rounding), selection and tokens, for every method and
option that reuses the chunk caches; what cannot reuse them is refused or re-read."""

import copy
import dataclasses
import math

import numpy as np
import pytest
import tiny
from bounds import assert_within, model_bound, nll_bound, scale_of

import pcomp_jax
from pcomp_jax import CalibrationRule, ParallelCompConfig, answer, document, read_document
from pcomp_jax.chunking import encode_parts
from pcomp_jax.pipeline import run_stage1
from pcomp_jax.plans import plan

WORDS = "the cat sat on a mat and then ran in the sun as the other one slept there".split()
QUESTIONS = ("who slept in the sun?", "where did the cat sit, and what did the other one do?")
READ_GROUP = document.read_group
BASE = ParallelCompConfig(chunk_len=48, top_k_chunks=2, capacity=16, group_size=4, chat=True)


def make_context(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words))


CONTEXT = make_context(150, seed=2)


@pytest.fixture(scope="module")
def model(hf_checkpoints):
    return pcomp_jax.load_model(hf_checkpoints("llama_gqa_untied")[0])


@pytest.fixture(scope="module")
def doc(model):
    return read_document(model, CONTEXT, BASE)


def assert_same(ours, reference, at_least=4):
    assert ours.num_chunks == reference.num_chunks >= at_least
    assert_within(ours.chunk_scores, reference.chunk_scores,
                  nll_bound(tiny.DIMS, reference.chunk_scores, row_len=tiny.DIMS.window), "chunk scores")
    assert ours.selected_chunks == reference.selected_chunks
    assert ours.token_ids == reference.token_ids and ours.text == reference.text


@pytest.mark.parametrize("capacity", [16, None], ids=["evicting", "whole chunks"])
def test_ask_is_answer(model, doc, capacity):
    config = dataclasses.replace(BASE, capacity=capacity)
    question = QUESTIONS[0]
    assert_same(doc.ask(question, 6, config=config), answer(model, CONTEXT, question, config, max_new_tokens=6))
    # Stage 1 itself: the same kept chunks, kept token positions (every layer and KV head) and
    # caches (where a kept slot holds a token: whole chunks keep unused slots apart from answer's).
    parts = encode_parts(model.tokenizer, CONTEXT, question, BASE.instruction, BASE.answer_prefix, BASE.chat)
    reference = run_stage1(model, plan(model, config), parts).context.selection
    ours = doc.score_chunks([doc.question_parts(question, config)], plan(model, config))[0].context.selection
    for field in ("chunk_ids", "chunk_valid", "token_valid", "row_lengths"):
        np.testing.assert_array_equal(np.asarray(getattr(ours, field)), np.asarray(getattr(reference, field)))
    used = np.asarray(reference.token_valid)  # [K, cap]
    ours_slots, reference_slots = np.asarray(ours.kept_positions), np.asarray(reference.kept_positions)
    np.testing.assert_array_equal(np.where(used[None, :, None], ours_slots, -1),
                                  np.where(used[None, :, None], reference_slots, -1))
    for field in ("keys", "values"):
        mine, theirs = (np.where(used[None, :, :, None, None], np.asarray(getattr(s, field)), 0) for s in (ours, reference))
        assert_within(mine, theirs, model_bound(model.config, scale_of(theirs), row_len=model.config.window), field)


def test_fewer_chunks_than_kept(model):
    """A one-chunk document asked with top_k_chunks 2: the second pick is no chunk."""
    context = make_context(8, seed=5)
    short = read_document(model, context, BASE)
    assert short.num_chunks == 1
    for capacity in (16, None):
        config = dataclasses.replace(BASE, capacity=capacity)
        ours = short.ask(QUESTIONS[0], 5, config=config)
        assert_same(ours, answer(model, context, QUESTIONS[0], config, 5), at_least=1)
        assert ours.selected_chunks == [0]


# Options that act after the reading: the same document, asked under each.
MERGED_RULE = CalibrationRule(layers=(0, 1), region="middle", region_size=4, threshold=0.02)
AFTER_READING = [
    dict(capacity=None, score_last_tokens=3, merge_layout="reprefill"),
    dict(top_k_chunks=3, capacity=24, obs_window=4, pool_kernel=3, decode_eviction=True, chunk_answers="each"),
    dict(method="pcw"),
    dict(stage_eviction=True, merge_layout="sequential", calibration=(MERGED_RULE,)),
]


@pytest.mark.slow
@pytest.mark.parametrize("changed", AFTER_READING, ids=lambda c: ",".join(c))
def test_ask_under_options_acting_after_the_reading(model, doc, changed):
    config = dataclasses.replace(BASE, **changed)
    question = QUESTIONS[1]
    assert_same(doc.ask(question, 5, config=config), answer(model, CONTEXT, question, config, 5))


@pytest.mark.slow
def test_other_chunking_and_one_row_methods(model):
    """Overlapping chunks cut at token counts on a 2 x 2 (chunk, model) mesh; one-row methods
    keep only the tokens and re-read them."""
    for changed in (dict(chunk_overlap=8, sentence_chunks=False, num_devices=4, model_parallel=2),
                    dict(method="snapkv", kv_budget=24)):
        config = dataclasses.replace(BASE, **changed)
        doc = read_document(model, CONTEXT, config)
        assert (doc.groups is None) == (config.method != "parallelcomp")
        ours, reference = doc.ask(QUESTIONS[0], 5), answer(model, CONTEXT, QUESTIONS[0], config, 5)
        assert ours.token_ids == reference.token_ids and ours.selected_chunks == reference.selected_chunks
        assert_within(ours.chunk_scores, reference.chunk_scores,
                      nll_bound(tiny.DIMS, reference.chunk_scores, row_len=tiny.DIMS.window), "chunk scores")


@pytest.mark.slow
def test_host_document_saved_and_loaded(model, tmp_path):
    doc = read_document(model, CONTEXT, BASE, host=True)
    assert all(isinstance(g.keys, np.ndarray) for g in doc.groups)
    doc.save(str(tmp_path / "doc"))
    with pytest.raises(pcomp_jax.CheckpointError, match="already exists"):
        doc.save(str(tmp_path / "doc"))
    loaded = read_document(model, config=BASE, load=str(tmp_path / "doc"))
    assert_same(loaded.ask(QUESTIONS[0], 6), answer(model, CONTEXT, QUESTIONS[0], BASE, 6))
    again = read_document(model, CONTEXT, host=True, load=str(tmp_path / "doc"))  # the stored config
    assert_same(again.ask(QUESTIONS[0], 6), doc.ask(QUESTIONS[0], 6))
    with pytest.raises(pcomp_jax.PcompError, match="was read from another context"):
        read_document(model, make_context(150, seed=3), BASE, load=str(tmp_path / "doc"))
    with pytest.raises(pcomp_jax.ConfigError, match=r"read with chunk_len=48 \(asked with 64\)"):
        read_document(model, config=dataclasses.replace(BASE, chunk_len=64), load=str(tmp_path / "doc"))


def test_stored_document_refuses_another_model_or_tokenizer(model, doc, hf_checkpoints, tmp_path):
    doc.save(str(tmp_path / "doc"))
    other = pcomp_jax.load_model(hf_checkpoints("qwen2_bias")[0])
    with pytest.raises(pcomp_jax.PcompError, match=r"another model \(.*qkv_bias.*weights"):
        read_document(other, config=BASE, load=str(tmp_path / "doc"))
    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.add_tokens(["zebra"])
    with pytest.raises(pcomp_jax.PcompError, match=r"another tokenizer \(size, vocabulary differ\)"):
        read_document(dataclasses.replace(model, tokenizer=tokenizer), config=BASE, load=str(tmp_path / "doc"))


@pytest.mark.slow
def test_refusals(model, doc):
    chunk_rule = CalibrationRule(layers=(0, 1), region="middle", region_size=4, threshold=0.02, stage="chunk")
    with pytest.raises(pcomp_jax.ConfigError, match="calibration rules of stage 'chunk'"):
        read_document(model, CONTEXT, dataclasses.replace(BASE, calibration=(chunk_rule,)))
    with pytest.raises(pcomp_jax.ConfigError, match="calibration rules of stage 'chunk'"):
        doc.ask(QUESTIONS[0], config=dataclasses.replace(BASE, calibration_preset="remove_shallow_middle",
                                                         calibration_preset_stage="chunk"))
    with pytest.raises(pcomp_jax.ConfigError, match=r"read with chunk_len=48 \(asked with 32\)"):
        doc.ask(QUESTIONS[0], config=dataclasses.replace(BASE, chunk_len=32))
    with pytest.raises(pcomp_jax.ConfigError, match=r"placed with num_devices=None \(asked with 2\)"):
        doc.ask(QUESTIONS[0], config=dataclasses.replace(BASE, num_devices=2))
    with pytest.raises(pcomp_jax.ConfigError, match=r"method='parallelcomp' \(asked with 'full', which reads"):
        doc.ask(QUESTIONS[0], config=dataclasses.replace(BASE, method="full"))
    # A short question part: SnapKV's observation window would reach back into the chunk.
    short = dataclasses.replace(BASE, chat=False, instruction="", answer_prefix="", capacity=32, obs_window=32)
    with pytest.raises(pcomp_jax.PcompError, match=r"by the row's last 32 queries \(obs_window\)"):
        read_document(model, CONTEXT, short).ask("why?")
    # Every token kept: the scores do not matter, so the short question is answered.
    kept = dataclasses.replace(short, capacity=None)
    assert read_document(model, CONTEXT, kept).ask("why?", 3).token_ids == answer(model, CONTEXT, "why?", kept, 3).token_ids


def test_prefix_that_depends_on_the_question_is_refused(model):
    tokenizer = copy.deepcopy(model.tokenizer)
    # A template that repeats the end of the user turn (the question) before it.
    tokenizer.chat_template = "{{ messages[0]['content'][-4:] }}|{{ messages[0]['content'] }}|"
    asking = dataclasses.replace(model, tokenizer=tokenizer)
    doc = read_document(asking, CONTEXT, BASE)
    with pytest.raises(pcomp_jax.PcompError, match="prompt prefix P differs for this question"):
        doc.ask(QUESTIONS[0])
    # The library's own template keeps the question out of P: the parts agree with answer's.
    parts = encode_parts(model.tokenizer, CONTEXT, QUESTIONS[1], BASE.instruction,
                                            BASE.answer_prefix, BASE.chat)
    np.testing.assert_array_equal(parts.prefix, read_document(model, CONTEXT, BASE).parts.prefix)


@pytest.mark.slow
def test_answer_batch_reads_contexts_in_shared_groups(model, monkeypatch):
    """Three contexts of 9, 6 and 2 chunks, each asked two questions (groups of 4: every last
    group partial), are read in ceil(17 / 4) = 5 shared groups instead of 3 + 2 + 1; a fourth
    context asked one question goes through answer() and is not read ahead; each request's
    answer is answer()'s."""
    contexts = [CONTEXT, make_context(100, seed=5), make_context(20, seed=7), make_context(40, seed=9)]
    inputs = [(contexts[0], QUESTIONS[1]), (contexts[1], QUESTIONS[0]), (contexts[3], QUESTIONS[0]),
              (contexts[0], QUESTIONS[0]), (contexts[2], QUESTIONS[1]), (contexts[1], QUESTIONS[1]),
              (contexts[2], QUESTIONS[0])]
    references = [answer(model, context, question, BASE, max_new_tokens=4) for context, question in inputs]
    calls = []
    monkeypatch.setattr(document.reading, "read_group", lambda *a, **k: calls.append(1) or READ_GROUP(*a, **k))
    batch = pcomp_jax.answer_batch(model, inputs, BASE, max_new_tokens=4)
    for ours, reference in zip(batch, references):
        assert_within(ours.chunk_scores, reference.chunk_scores,
                      nll_bound(tiny.DIMS, reference.chunk_scores, row_len=tiny.DIMS.window), "chunk scores")
        assert ours.selected_chunks == reference.selected_chunks
        assert ours.token_ids == reference.token_ids and ours.text == reference.text
    chunks = [references[0].num_chunks, references[1].num_chunks, references[4].num_chunks]
    assert chunks == [9, 6, 2]
    assert len(calls) == math.ceil(sum(chunks) / BASE.group_size) == 5
    assert len(calls) < sum(math.ceil(n / BASE.group_size) for n in chunks)
    with pytest.raises(pcomp_jax.PcompError, match="list of \\(context, question\\) pairs"):
        pcomp_jax.answer_batch(model, [CONTEXT], BASE)


@pytest.mark.slow
def test_batched_reading_gives_each_context_its_own_document(model):
    """Rows of another length (a short context's rows fit a shorter bucket: padded for the
    shared reading, cut back after it) and a document kept on the host: every document of
    ``read_parts_batch`` has the caches of ``read_document`` of its context alone."""
    config = dataclasses.replace(BASE, chat=False, instruction="", chunk_len=64)
    contexts = [make_context(10, seed=1), CONTEXT, make_context(100, seed=5)]
    parts = [document.context_parts(model, context, config) for context in contexts]
    docs = document.read_parts_batch(model, parts, config, host=True)
    for doc, context in zip(docs, contexts):
        alone = read_document(model, context, config)
        assert doc.bounds == alone.bounds and len(doc.groups) == len(alone.groups)
        for ours, theirs in zip(doc.groups, alone.groups):
            assert isinstance(ours.keys, np.ndarray) and ours.keys.shape == theirs.keys.shape
            for field in ("stored_lengths", "last_tokens", "chunk_lengths", "chunk_ids"):
                np.testing.assert_array_equal(getattr(ours, field), np.asarray(getattr(theirs, field)))
            real = np.asarray(theirs.chunk_lengths) > 0  # empty rows store nothing
            for field in ("keys", "values"):
                want = np.asarray(getattr(theirs, field))[:, real]
                assert_within(getattr(ours, field)[:, real], want,
                              model_bound(model.config, scale_of(want), row_len=model.config.window), field)
        assert_same(doc.ask(QUESTIONS[0], 4), alone.ask(QUESTIONS[0], 4), at_least=1)
    assert {doc.groups[0].keys.shape[2] for doc in docs} == {64, 128}  # row lengths differ


@pytest.mark.slow
@pytest.mark.parametrize("changes", [{}, {"merge_layout": "sequential", "capacity": None},
                                     {"capacity": 8, "stage_eviction": True}],
                         ids=["parallel_evicting", "sequential_whole_chunks", "stage_eviction_one_by_one"])
def test_answer_batch_on_distinct_contexts_is_each_requests_answer(model, changes):
    """Distinct contexts of unequal lengths and unequal questions: stage 2 and decoding run as
    one batch (padded to a bucket of rows and slots), each request's tokens and selection
    are its own answer()'s; a plan whose stage 2 does not batch runs one by one."""
    config = dataclasses.replace(BASE, **changes)
    inputs = [(make_context(150, seed=21), "where did the cat sit?"), (make_context(60, seed=22), QUESTIONS[0]),
              (make_context(110, seed=23), "what did the dog eat at noon?"), (CONTEXT, QUESTIONS[1]),
              (make_context(90, seed=24), "who?")]
    references = [answer(model, context, question, config, max_new_tokens=8) for context, question in inputs]
    batch = pcomp_jax.answer_batch(model, inputs, config, max_new_tokens=8)
    for ours, reference in zip(batch, references):
        assert ours.token_ids == reference.token_ids
        assert ours.selected_chunks == reference.selected_chunks
        assert ours.chunk_scores == reference.chunk_scores  # stage 1 runs as in answer()
    if not changes:  # at most 2 requests at once, a context asked twice kept in one batch: the same answers
        asked = [*inputs, (inputs[1][0], "who sat?")]
        again = pcomp_jax.answer_batch(model, asked, config, max_new_tokens=8, batch_size=2)
        assert [a.token_ids for a in again[:5]] == [r.token_ids for r in references]
        assert again[5].token_ids == answer(model, *asked[5], config, max_new_tokens=8).token_ids


def test_request_batches_keep_a_contexts_questions_together(model):
    from pcomp_jax.document.batch import request_batches

    one, two = make_context(40, seed=1), make_context(40, seed=2)
    asked = [encode_parts(model.tokenizer, c, q, BASE.instruction, BASE.answer_prefix, BASE.chat)
             for c, q in ((one, "a?"), (two, "b?"), (one, "c?"), (two, "d?"), (one, "e?"))]
    assert request_batches(asked, 2) == [[0, 2], [4, 1], [3]]
    assert request_batches(asked, 5) == [[0, 2, 4, 1, 3]]
    for bad in (0, 1.5, True):
        with pytest.raises(pcomp_jax.PcompError, match="batch_size must be a whole number >= 1 or None"):
            pcomp_jax.answer_batch(model, [(one, "a?")], BASE, batch_size=bad)


@pytest.mark.slow
def test_answer_batch_shares_chunk_groups_across_contexts(model, monkeypatch):
    """Three contexts whose rows have the same shapes, 5 chunk rows each: 15 rows run in
    ceil(15 / 4) = 4 shared groups instead of 3 x 2; each request's answer is still its own."""
    from pcomp_jax import pipeline

    contexts = [make_context(80, seed=s) for s in (31, 32, 33)]
    inputs = [(c, q) for c, q in zip(contexts, ("where did the cat sit?", "where did the dog run?", "when did the cow eat?"))]
    references = [answer(model, c, q, BASE, max_new_tokens=6) for c, q in inputs]
    counts = [r.num_chunks for r in references]
    calls, real = [], pipeline.prefill_group
    monkeypatch.setattr(pipeline, "prefill_group", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = pcomp_jax.answer_batch(model, inputs, BASE, max_new_tokens=6)
    for ours, reference in zip(batch, references):
        assert ours.token_ids == reference.token_ids and ours.selected_chunks == reference.selected_chunks
        assert ours.chunk_scores == reference.chunk_scores
    assert len(calls) == math.ceil(sum(counts) / 4) < sum(math.ceil(n / 4) for n in counts), counts
