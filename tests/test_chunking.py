"""Chunk boundaries at sentence ends: properties over widely varying inputs (hypothesis), and
the break flags on the real tokenizer."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pcomp_jax
from pcomp_jax.chunking import LINE_END, NO_BREAK, SENTENCE_BREAK, chunk_bounds, encode_parts, question_bucket, \
    text_breaks


@st.composite
def contexts(draw):
    """(breaks, chunk_len, overlap): a context of 1..3000 tokens with sentence ends, line ends
    or nothing at random places and densities."""
    n = draw(st.integers(1, 3000))
    chunk_len = draw(st.integers(2, 700))
    density = draw(st.sampled_from([0.0, 0.001, 0.02, 0.2, 0.9]))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    breaks = rng.choice([NO_BREAK, LINE_END, SENTENCE_BREAK], size=n, p=[1 - density, density / 3, 2 * density / 3])
    overlap = draw(st.integers(0, chunk_len - 1)) if draw(st.booleans()) else 0
    return breaks.astype(np.int8), chunk_len, overlap


@settings(max_examples=150, deadline=None)
@given(contexts())
def test_chunks_cover_the_context_and_never_exceed_chunk_len(case):
    breaks, chunk_len, overlap = case
    bounds = chunk_bounds(len(breaks), chunk_len, breaks, overlap)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(breaks)
    for (s0, e0), (s1, e1) in zip(bounds, bounds[1:]):
        assert s0 < s1 <= e0 < e1 and e0 - s1 <= overlap  # in order, overlapping by at most `overlap`
    if overlap == 0:
        assert all(e0 == s1 for (_, e0), (s1, _) in zip(bounds, bounds[1:]))  # every token once
    assert all(0 < e - s <= chunk_len for s, e in bounds)


@settings(max_examples=150, deadline=None)
@given(contexts())
def test_no_sentence_shorter_than_a_chunk_straddles_a_boundary(case):
    breaks, chunk_len, overlap = case
    bounds = chunk_bounds(len(breaks), chunk_len, breaks, overlap)
    sentence_ends = [0, *(np.flatnonzero(breaks == SENTENCE_BREAK) + 1), len(breaks)]
    for start, end in zip(sentence_ends, sentence_ends[1:]):
        if 0 < end - start <= chunk_len - overlap:
            assert any(s <= start and end <= e for s, e in bounds), (start, end, bounds)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 900))
def test_without_breaks_chunks_are_near_equal(n, chunk_len):
    sizes = [e - s for s, e in chunk_bounds(n, chunk_len)]
    assert len(sizes) == -(-n // chunk_len) and max(sizes) - min(sizes) <= 1 and sum(sizes) == n
    assert chunk_bounds(n, chunk_len, np.zeros(n, np.int8)) == chunk_bounds(n, chunk_len)


def test_bad_overlap_is_refused():
    with pytest.raises(pcomp_jax.PcompError, match=r"chunk overlap must be in \[0, chunk_len=8\)"):
        chunk_bounds(100, 8, overlap=8)
    with pytest.raises(pcomp_jax.ConfigError, match="chunk_overlap=512 must be smaller than chunk_len=512"):
        pcomp_jax.ParallelCompConfig(chunk_overlap=512)


@pytest.mark.default_model
def test_breaks_on_the_default_tokenizer(default_tokenizer):
    tok = default_tokenizer
    text = 'He said "Stop!" and left. Then\nshe waited... It was 3.5 km away? Yes. {"a": 1, "b": 2}'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    breaks = text_breaks(tok, ids)
    cut = lambda kind: [tok.decode(ids[: i + 1]) for i in np.flatnonzero(breaks == kind)]
    assert cut(SENTENCE_BREAK) == ['He said "Stop!"', 'He said "Stop!" and left.', *[
        t for t in cut(SENTENCE_BREAK)[2:]]]  # the first two, exactly
    sentence_texts = [t.rstrip() for t in cut(SENTENCE_BREAK)]
    assert "He said \"Stop!\" and left. Then\nshe waited..." in sentence_texts
    assert any(t.endswith("away?") for t in sentence_texts) and not any(t.endswith("3.") for t in sentence_texts)
    assert any(t.endswith("Then") for t in cut(LINE_END))  # a line break
    assert breaks[-1] == NO_BREAK or tok.decode(ids).endswith("}")
    parts = encode_parts(tok, text, "Where?", "Read.", "Answer:", True)
    np.testing.assert_array_equal(parts.breaks, breaks)


@given(st.integers(0, 5000))
def test_question_buckets_are_fine_for_short_questions(n):
    """A document's question pass costs in proportion to the bucket: at most 7 padding
    tokens up to 64, at most 12.5% beyond, always a multiple of 8 and at least 16."""
    bucket = question_bucket(n)
    assert bucket >= max(n, 16) and bucket % 8 == 0
    assert bucket - max(n, 16) < 8 if n <= 64 else bucket <= n * 1.125
    assert question_bucket(bucket) == bucket  # a bucket is its own bucket
    assert question_bucket(19) == 24 and question_bucket(65) == 72
