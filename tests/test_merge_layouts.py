"""Where the kept chunks sit for the question: the paper's parallel layout, sequential (keys
rotated on, exact for linear-angle ropes) and reprefill (the kept chunks run again as one row)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from bounds import assert_within, float32_bound, scale_of

import pcomp_jax
from pcomp_jax import ParallelCompConfig, answer
from pcomp_jax.chunking import build_rows, encode_parts
from pcomp_jax.compress import SnapKV
from pcomp_jax.model.llama import rms_norm
from pcomp_jax.model.rope import apply_rope, rope_tables
from pcomp_jax.perplexity import continuation_nll
from pcomp_jax.prefill import (
    ParallelLayout,
    PrefillSpec,
    SequentialLayout,
    empty_selection,
    keep_best_chunks,
    merge_selection,
    prefill_group,
    prefill_prefix,
    rope_shift_is_exact,
    shift_keys,
)
from test_against_reference import make_sentences

BASE = ParallelCompConfig(chunk_len=40, top_k_chunks=2, capacity=None, obs_window=4, group_size=4)


@pytest.fixture(scope="module")
def model(hf_checkpoints):
    return pcomp_jax.load_model(hf_checkpoints("llama_gqa_untied")[0])


@pytest.mark.parametrize("variant", ["llama_gqa_untied", "llama3_rope", "linear_rope"])
def test_rotating_a_key_by_d_equals_computing_it_at_position_plus_d(hf_checkpoints, variant):
    cfg = pcomp_jax.load_model(hf_checkpoints(variant)[0]).config
    assert rope_shift_is_exact(cfg)
    rng = np.random.default_rng(0)
    raw = jnp.asarray(rng.normal(size=(1, 6, cfg.num_kv_heads, cfg.head_dim)), jnp.float32)  # [1, T, KVH, D]
    positions = jnp.asarray([[0, 3, 17, 40, 100, 255]])
    for d in (1, 37, 1000):
        at_p = apply_rope(raw, *rope_tables(cfg, positions))
        shifted = shift_keys(cfg, at_p[:, None], jnp.asarray([d]))[:, 0]  # as [L=1, K=1, cap, KVH, D]
        at_p_plus_d = apply_rope(raw, *rope_tables(cfg, positions + d))
        # float32 angles: position x frequency rounds to ~1e-7 relative, ~1e-4 rad past 1000
        np.testing.assert_allclose(np.asarray(shifted), np.asarray(at_p_plus_d), atol=3e-7 * (256 + d))


def test_dynamic_rope_refuses_the_sequential_layout(hf_checkpoints):
    model = pcomp_jax.load_model(hf_checkpoints("dynamic_rope")[0])
    assert not rope_shift_is_exact(model.config)
    with pytest.raises(pcomp_jax.ConfigError, match="not exact with 'dynamic' rope"):
        answer(model, make_sentences(30, 1), "who ran?", dataclasses.replace(BASE, merge_layout="sequential"), 4)


@pytest.mark.slow
def test_sequential_layout_puts_each_kept_chunk_after_the_previous_one(model):
    """Layer 0's keys depend on the token and position alone: in the sequential cache, the
    second kept chunk's keys are the raw keys rotated at row position + the first's length."""
    cfg, w = model.config, model.params
    parts = encode_parts(model.tokenizer, make_sentences(80, 2), "where did the cat sit?", "Read.", "Answer:", True)
    rows = build_rows(parts, 40, cfg.window)
    spec = PrefillSpec(capacity=None, token_scorer=SnapKV(4, 7))
    state = empty_selection(cfg, 2, spec.kept_tokens(rows), model.dtype)
    for group in rows.groups(4):
        state = keep_best_chunks(state, prefill_group(w, cfg, group, spec), 2)
    prefix_k, prefix_v = prefill_prefix(w, cfg, jnp.asarray(parts.prefix))
    parallel, start_par = merge_selection(prefix_k, prefix_v, state, 16, ParallelLayout(), cfg)
    sequential, start_seq = merge_selection(prefix_k, prefix_v, state, 16, SequentialLayout(), cfg)
    p = len(parts.prefix)
    ids = sorted(np.asarray(state.chunk_ids)[np.asarray(state.chunk_valid)].tolist())
    lengths = [int(rows.chunk_lengths[i]) for i in ids]
    assert int(start_par) == p + max(lengths) and int(start_seq) == p + sum(lengths)
    cap = spec.kept_tokens(rows)
    for slot, (chunk, shift) in enumerate(zip(ids, [0, lengths[0]])):
        tokens = rows.tokens[chunk, p : p + lengths[slot]]
        h = rms_norm(w.embed[tokens][None], w.layers.attn_norm[0], cfg.rms_norm_eps)
        raw = jnp.einsum("bte,ehd->bthd", h, w.layers.wk[0])
        want = apply_rope(raw, *rope_tables(cfg, (jnp.arange(p, p + lengths[slot]) + shift)[None]))[0]
        got = sequential.keys[0, 0, p + slot * cap : p + slot * cap + lengths[slot]]
        # one projection (a hidden-width reduction) and one rotation, from the same float32 inputs
        assert_within(got, want, float32_bound(scale_of(want), reduction=cfg.hidden_size, depth=2), "rotated keys")
        np.testing.assert_array_equal(np.asarray(sequential.values), np.asarray(parallel.values))


@pytest.mark.slow
def test_reprefill_of_every_chunk_is_full_attention(model):
    context, question = make_sentences(40, 3), "what did the cat do?"  # P + context + Q fit the window
    every = dataclasses.replace(BASE, top_k_chunks=16, merge_layout="reprefill")
    ours = answer(model, context, question, every, 6)
    assert ours.num_chunks > 2 and ours.selected_chunks == list(range(ours.num_chunks))
    assert ours.token_ids == answer(model, context, question, dataclasses.replace(BASE, method="full"), 6).token_ids


@pytest.mark.slow
def test_layouts_run_through_answer_and_perplexity(model):
    context, question = make_sentences(90, 4), "where did the cat sit?"
    results = {layout: answer(model, context, question, dataclasses.replace(BASE, merge_layout=layout), 6)
               for layout in ("parallel", "sequential", "reprefill")}
    assert len({tuple(r.selected_chunks) for r in results.values()}) == 1  # stage 1 is the same
    assert all(r.token_ids for r in results.values())
    ids = np.asarray(model.tokenizer(make_sentences(120, 5), add_special_tokens=False)["input_ids"], np.int32)
    for layout in ("parallel", "sequential", "reprefill"):
        scored = continuation_nll(model, ids[:150], ids[150:160], dataclasses.replace(BASE, merge_layout=layout), 8)
        assert scored.token_nll.shape == (10,) and np.isfinite(scored.token_nll).all()


@pytest.mark.slow
def test_chunk_order_and_score_margin_choose_what_stage_2_reads(model):
    """relevance: the best chunk laid last; the parallel layout does not see the order; a zero
    margin reads the best chunk alone, as top_k_chunks=1 does; a wide one reads all top k.
    The settings act after stage 1, so one stage 1 serves them all."""
    from pcomp_jax.pipeline import Decode, run_stage1, run_stage2
    from pcomp_jax.plans import plan
    from pcomp_jax.prefill import ChunkArrangement

    context, question = make_sentences(90, 4), "where did the cat sit?"
    seq = dataclasses.replace(BASE, merge_layout="sequential", top_k_chunks=3)
    parts = encode_parts(model.tokenizer, context, question, BASE.instruction, BASE.answer_prefix, BASE.chat)
    by_relevance = plan(model, dataclasses.replace(seq, chunk_order="relevance"))
    pre = run_stage1(model, by_relevance, by_relevance.fit(parts, 6))
    stage2 = lambda config: run_stage2(model, plan(model, config), pre, Decode(6)).token_ids

    laid = by_relevance.merge.arrangement.read_chunks(pre.context.selection)  # in laying order
    scores = [pre.chunk_scores[c] for c in laid]
    assert len(laid) == 3 and scores == sorted(scores, reverse=True)  # the most relevant chunk nearest Q
    assert pre.kept_bounds(by_relevance.merge.arrangement) == [pre.bounds[c] for c in laid]
    assert pre.kept_bounds() == [pre.bounds[c] for c in sorted(laid)]  # the paper's: document order
    assert pre.read_chunks(by_relevance.merge.arrangement) == sorted(laid)

    # the parallel layout lays every chunk at its own positions: by relevance, the merged
    # cache holds the same entries in another slot order, and the question starts at the same place
    ctx = pre.context
    merged = [merge_selection(ctx.prefix_keys, ctx.prefix_values, ctx.selection, 8, ParallelLayout(), model.config,
                              ChunkArrangement(order)) for order in ("document", "relevance")]
    assert int(merged[0][1]) == int(merged[1][1])
    # each slot's first key component in every layer and KV head, with its validity
    slots = lambda c: np.concatenate([np.moveaxis(np.asarray(c.keys[:, 0, :, :, 0]), 1, 0).reshape(c.capacity, -1),
                                      np.moveaxis(np.asarray(c.valid[:, 0]), 1, 0).reshape(c.capacity, -1)], axis=1)
    entries = lambda cache: sorted(map(tuple, slots(cache).tolist()))
    assert entries(merged[0][0]) == entries(merged[1][0])

    best_only = plan(model, dataclasses.replace(seq, chunk_score_margin=0.0)).merge.arrangement
    assert best_only.read_chunks(pre.context.selection) == [laid[-1]]
    assert stage2(dataclasses.replace(seq, chunk_score_margin=0.0)) == \
        answer(model, context, question, dataclasses.replace(seq, top_k_chunks=1), 6).token_ids
    assert stage2(dataclasses.replace(seq, chunk_score_margin=1e6)) == stage2(seq)
    for bad, message in (({"chunk_order": "random"}, "chunk_order='random' is not allowed; choose one of: document, relevance"),
                         ({"chunk_score_margin": -1.0}, "chunk_score_margin=-1.0 must be >= 0")):
        with pytest.raises(pcomp_jax.ConfigError, match=message):
            ParallelCompConfig(**bad)


@pytest.mark.slow
def test_answering_from_each_chunk_keeps_the_most_likely_answer(model):
    """chunk_answers=each: every read chunk alone gives the answer that full attention over
    P + that chunk + Q gives; the answer kept is the one whose tokens have the lowest mean NLL
    there (both computed here on plain rows, not through the merged cache)."""
    from pcomp_jax.decode import generate_ids
    from pcomp_jax.pipeline import run_stage1
    from pcomp_jax.plans import plan

    context, question = make_sentences(90, 4), "where did the cat sit?"
    each = dataclasses.replace(BASE, merge_layout="sequential", top_k_chunks=3, chunk_answers="each")
    ours = answer(model, context, question, each, 6)
    parts = encode_parts(model.tokenizer, context, question, BASE.instruction, BASE.answer_prefix, BASE.chat)
    each_plan = plan(model, each)
    pre = run_stage1(model, each_plan, each_plan.fit(parts, 6))
    assert ours.selected_chunks == pre.selected_chunks and len(ours.selected_chunks) == 3  # every chunk is read
    candidates = []
    for s, e in pre.kept_bounds(each_plan.merge.arrangement):
        row = np.concatenate([parts.prefix, parts.context[s:e], parts.question])
        tokens = generate_ids(model, row, 6).token_ids
        assert tokens  # the tiny model never stops at once on these inputs
        full = dataclasses.replace(BASE, method="full")
        nll = continuation_nll(model, row, np.asarray(tokens), full, query_len=len(parts.question)).token_nll
        candidates.append((float(np.mean(nll)), tokens))
    assert len({tuple(t) for _, t in candidates}) > 1  # the chunks disagree: the choice matters
    lowest = min(n for n, _ in candidates)
    # float32 NLLs of one model on the same tokens agree to ~1e-5 between the plain row and the
    # merged cache; where two answers are closer than 1e-3, either may be kept
    most_likely = [t for n, t in candidates if n - lowest < 1e-3]
    assert ours.token_ids in most_likely
    # the answer does not depend on where the lone chunk sits: every layout reads P + chunk + Q
    for layout in ("parallel", "reprefill"):
        assert answer(model, context, question, dataclasses.replace(each, merge_layout=layout), 6).token_ids \
            in most_likely
    # a zero margin reads the best chunk alone: the same answer as top_k_chunks=1
    assert answer(model, context, question, dataclasses.replace(each, chunk_score_margin=0.0), 6).token_ids == \
        answer(model, context, question, dataclasses.replace(each, top_k_chunks=1, chunk_answers="together"), 6).token_ids
    with pytest.raises(pcomp_jax.ConfigError, match="chunk_answers=each chooses among the answers"):
        continuation_nll(model, row, np.asarray(tokens), each, query_len=len(parts.question))
    with pytest.raises(pcomp_jax.ConfigError, match="chunk_answers='best' is not allowed; choose one of: together, each"):
        ParallelCompConfig(chunk_answers="best")


@pytest.mark.slow
def test_layout_refusals(model, monkeypatch):
    with pytest.raises(pcomp_jax.ConfigError, match="merge_layout='diagonal' is not allowed"):
        ParallelCompConfig(merge_layout="diagonal")
    with pytest.raises(pcomp_jax.ConfigError, match="merged-stage calibration .* merge_layout=reprefill does not build"):
        ParallelCompConfig(merge_layout="reprefill", calibration_preset="remove_shallow_middle")
    for option in ({"stage_eviction": True, "capacity": 8}, {"decode_eviction": True}):
        with pytest.raises(pcomp_jax.ConfigError, match=f"{next(iter(option))} acts on the merged cache"):
            ParallelCompConfig(merge_layout="reprefill", **option)
    window = model.config.window
    too_long = dataclasses.replace(BASE, chunk_len=window // 2, top_k_chunks=2, merge_layout="sequential")
    from pcomp_jax import pipeline

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "run_stage1", lambda *a, **k: pytest.fail("the prefill ran before the refusal"))
        with pytest.raises(pcomp_jax.InputTooLongError, match="even the 2 shortest chunks laid end to end"):
            answer(model, make_sentences(150, 6), "who ran?", too_long, 8)  # refused before any prefill
    pcw = dataclasses.replace(BASE, method="pcw", chunk_len=window // 2, merge_layout="sequential")
    assert answer(model, make_sentences(150, 6), "who ran?", pcw, 4).token_ids == answer(
        model, make_sentences(150, 6), "who ran?", dataclasses.replace(pcw, merge_layout="parallel"), 4).token_ids
    long_chunks = dataclasses.replace(BASE, chunk_len=120, top_k_chunks=2, merge_layout="sequential")
    with pytest.raises(pcomp_jax.InputTooLongError, match="laid end to end"):
        answer(model, make_sentences(150, 6), "who ran?", long_chunks, 8)


@pytest.mark.slow
def test_eval_columns_that_differ_after_the_prefill_share_it(model, monkeypatch, tmp_path):
    from pcomp_jax import pipeline
    from pcomp_jax.eval import EvalConfig, MethodSpec, evaluate

    from pcomp_jax import document

    calls, reads = [], []
    real, real_read = pipeline.run_stage1, document.read_parts
    monkeypatch.setattr(pipeline, "run_stage1", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(document, "read_parts", lambda *a, **k: reads.append(1) or real_read(*a, **k))
    methods = (MethodSpec.of("parallel"), MethodSpec.of("sequential", merge_layout="sequential"),
               MethodSpec.of("calibrated", calibration_preset="remove_shallow_middle"),
               MethodSpec.of("stage_evict", capacity=6, stage_eviction=True),  # chunks kept whole: shares
               MethodSpec.of("decode_evict", decode_eviction=True),
               MethodSpec.of("evict", capacity=16), MethodSpec.of("each", chunk_answers="each"))
    config = EvalConfig(
        output_dir=str(tmp_path / "out"), pipeline=dataclasses.replace(BASE, chunk_len=48),
        methods=methods, tasks=("passkey",), lengths=(150, 200), depths=(0.5,), max_new_tokens=4,
    )
    evaluate(config, model, progress=False)
    # per input, one reading of the chunks (a document, read_parts) shared by all seven columns:
    # capacity, eviction, layout, merged-stage calibration and answering each chunk act after it
    assert (len(reads), len(calls)) == (2, 0)
    for spec in methods:  # each column as if run alone
        alone = answer(model, *_passkey(model, 200), spec.pipeline(config.pipeline), 4)
        with open(tmp_path / "out" / spec.name / "predictions.jsonl", encoding="utf-8") as f:
            records = {r["length"]: r for r in map(__import__("json").loads, f)}
        assert (records[200]["prediction"], records[200]["selected_chunks"]) == (alone.text, alone.selected_chunks)


def _passkey(model, length):
    from pcomp_jax.tasks import make_task

    task = make_task("passkey", model.tokenizer, length, 0.5, 0)
    return task.context, task.question
