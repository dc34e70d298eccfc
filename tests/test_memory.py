"""The memory preflight: XLA's buffer plan of the run's compiled stages, per device, the
buffers alive at once added up per phase, and the check with its safety margin."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pcomp_jax
from pcomp_jax import ParallelCompConfig, memory
from pcomp_jax.buckets import bucket_length
from pcomp_jax.chunking import encode_parts
from pcomp_jax.decode import _prefill_prompt, decode_budget, pad_ids
from pcomp_jax.merge import question_prefill
from pcomp_jax.errors import PcompError
from pcomp_jax.memory import MARGIN_BYTES, MARGIN_FRACTION, MemoryEstimate, estimate_memory, per_device_bytes
from pcomp_jax.pipeline import run_stage1
from pcomp_jax.plans import one_row_ids, plan

CONTEXT = " ".join(f"The cat sat on mat number {i}." for i in range(60))
MIB = 2**20
CHUNK_PHASES = ("chunk group prefill", "running top-k update")
STARTING = "the empty starting selection (held until the loop ends)"
TWO_ROWS = "rows of the running group and the next one (2 x [G, R])"
NEXT_ROWS = "the next group's rows [G, R]"
GROUP = "group prefill: temporaries + its G candidates out"
BEFORE = "the group before's G candidates (released after its top-k update)"
BEFORE_UPDATE = "the group before's top-k update: temporaries + the selection it replaced"
UPDATE = "the group's G candidates (input)"
REREAD = "re-read row (merge_layout=reprefill)"


@pytest.fixture(scope="module")
def model(hf_checkpoints):
    return pcomp_jax.load_model(hf_checkpoints("llama_gqa_untied")[0])


def parts_of(model, config, context=CONTEXT):
    return encode_parts(model.tokenizer, context, "where did the cat sit?", config.instruction, config.answer_prefix,
                        config.chat)


def test_estimate_parts_equal_the_arrays_a_run_holds(model):
    config = ParallelCompConfig(chunk_len=48, top_k_chunks=2, capacity=16, group_size=4, num_devices=1)
    parts = parts_of(model, config)
    estimate = estimate_memory(model, parts, config, 8)
    assert estimate.weights == sum(x.nbytes for x in jax.tree.leaves(model.params))
    pre = run_stage1(model, plan(model, config), parts)
    kept = per_device_bytes(pre.context.selection)
    assert estimate.selection == kept + per_device_bytes((pre.context.prefix_keys, pre.context.prefix_values))
    assert list(estimate.phases) == [*CHUNK_PHASES, "question on the merged cache", "decoding"]
    for name in CHUNK_PHASES:  # select_chunks holds the empty state it started from through the loop
        assert estimate.phases[name][STARTING] == kept
    prefill, update = estimate.phases["chunk group prefill"], estimate.phases["running top-k update"]
    assert prefill[TWO_ROWS] == 2 * update[NEXT_ROWS] and prefill[BEFORE] == update[UPDATE]  # the second group
    assert prefill[BEFORE_UPDATE] == update["top-k update: temporaries + the new selection out"] >= kept
    # the decoding loop's input: the cache the question prefill returns
    question = jnp.asarray(pad_ids(parts.question, minimum=16))
    state = question_prefill(pre.weights, model.config, pre.context, question, jnp.int32(len(parts.question)),
                             plan(model, config).merge, num_steps=decode_budget(8))
    assert estimate.phases["decoding"]["the merged cache (the loop's input)"] == per_device_bytes(state)
    assert all(size > 0 for parts_ in estimate.phases.values() for size in parts_.values())
    assert estimate.peak == estimate.weights + estimate.selection + max(estimate.phase_totals.values())
    assert estimate.phase_totals[estimate.largest_phase] == max(estimate.phase_totals.values())


def test_batch_estimate_holds_every_requests_selection_and_the_batched_stage_2(model):
    """estimate_batch_memory: the selections of every request held at once (each as its own
    run holds it), stage 1's phases of the request with the widest rows, and stage 2 as one
    program for the batch whose decoding input is the state generate_batch decodes from."""
    from pcomp_jax.merge import _merged_into, _question_batch, batch_shapes

    config = ParallelCompConfig(chunk_len=48, top_k_chunks=2, capacity=16, group_size=4, num_devices=1)
    tok = model.tokenizer
    asked = [encode_parts(tok, CONTEXT[: 900 + 300 * i], q, config.instruction, config.answer_prefix, config.chat)
             for i, q in enumerate(["where?", "which mat is it, the one with the cat on it?", "who sat?"])]
    singles = [estimate_memory(model, parts, config, 8) for parts in asked]
    batch = memory.estimate_batch_memory(model, asked, config, 8)
    assert batch.selection == sum(e.selection for e in singles)
    assert list(batch.phases) == [*CHUNK_PHASES, "batched question", "batched decoding"]
    assert batch.phases["chunk group prefill"] == singles[1].phases["chunk group prefill"]  # the longest question
    assert batch.weights == singles[0].weights and batch.peak > max(e.peak for e in singles)
    pres = [run_stage1(model, plan(model, config), plan(model, config).fit(parts, 8)) for parts in asked]
    size, qb, capacity, steps = batch_shapes([p.context for p in pres], [p.question for p in asked], 8)
    caches = [_merged_into(p.context, model.config, plan(model, config).merge, capacity)[0] for p in pres]
    cache = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1 if xs[0].ndim > 1 else 0), *caches, caches[-1])
    state = _question_batch(pres[0].weights, model.config, cache, jnp.zeros(size, jnp.int32),
                            jnp.zeros((size, qb), jnp.int32), jnp.ones(size, jnp.int32), jnp.ones(size, bool),
                            num_steps=steps)
    assert size == 4 and batch.phases["batched decoding"]["the batch's cache (the loop's input)"] == per_device_bytes(state)
    alone = memory.estimate_batch_memory(model, asked[:1], config, 8)  # one request: its own estimate
    assert dataclasses.replace(alone, device_limit=None) == dataclasses.replace(singles[0], device_limit=None)


@pytest.mark.slow
def test_a_larger_group_grows_the_groups_in_flight(model):
    base = ParallelCompConfig(chunk_len=48, top_k_chunks=2, group_size=4, num_devices=1, attention="dense")
    parts = parts_of(model, base)
    small = estimate_memory(model, parts, base, 8)
    bigger = estimate_memory(model, parts, dataclasses.replace(base, group_size=8), 8)
    assert bigger.phases["chunk group prefill"][TWO_ROWS] == 2 * small.phases["chunk group prefill"][TWO_ROWS]
    assert bigger.phases["chunk group prefill"][GROUP] > 1.5 * small.phases["chunk group prefill"][GROUP]
    assert bigger.phases["chunk group prefill"][BEFORE] == 2 * small.phases["chunk group prefill"][BEFORE]
    assert bigger.phases["running top-k update"][UPDATE] == 2 * small.phases["running top-k update"][UPDATE]
    assert bigger.selection == small.selection  # the top-k does not grow with the group
    evicting = estimate_memory(model, parts, dataclasses.replace(base, capacity=8), 8)
    assert evicting.selection < small.selection
    assert evicting.phases["chunk group prefill"][STARTING] < small.phases["chunk group prefill"][STARTING]
    one_group = estimate_memory(model, parts_of(model, base, CONTEXT[:60]), base, 8)  # no second group in flight
    alone = one_group.phases["chunk group prefill"]
    assert alone[BEFORE] == alone[BEFORE_UPDATE] == 0
    assert one_group.phases["running top-k update"][NEXT_ROWS] == 0


@pytest.mark.slow
def test_reprefill_estimates_its_re_read_row_not_the_merged_prefill(model):
    config = ParallelCompConfig(chunk_len=48, top_k_chunks=2, group_size=4, num_devices=1, merge_layout="reprefill")
    parts = parts_of(model, config)
    estimate = estimate_memory(model, parts, config, 8)
    assert list(estimate.phases) == [*CHUNK_PHASES, REREAD, "decoding"]
    plan_ = plan(model, config)
    longest = sorted((e - s for s, e in plan_.chunk_bounds(parts)), reverse=True)[:2]
    row = len(parts.prefix) + sum(longest) + len(parts.question)  # the longest row any selection can re-read
    assert estimate.phases[REREAD]["the row's token ids"] == 4 * bucket_length(row, minimum=64)
    pre = run_stage1(model, plan_, parts)
    ids = one_row_ids(plan_, pre.parts, pre.kept_bounds(plan_.merge.arrangement))
    cache = _prefill_prompt(model.params, model.config, jnp.asarray(pad_ids(ids))[None], jnp.int32(len(ids)),
                            decode_budget(8))[0]
    assert per_device_bytes(cache) <= estimate.phases["decoding"]["the row's cache (the loop's input)"]
    one = estimate_memory(model, parts, dataclasses.replace(config, top_k_chunks=1), 8)
    assert one.phases[REREAD]["row prefill: temporaries + the row's cache out"] < \
        estimate.phases[REREAD]["row prefill: temporaries + the row's cache out"]


@pytest.mark.slow
@pytest.mark.skipif(len(jax.devices()) < 4, reason="compares 1 and 4 devices (the CPU run has four)")
def test_estimate_follows_the_devices_and_the_method(model):
    base = ParallelCompConfig(chunk_len=48, top_k_chunks=2, group_size=4, num_devices=1, attention="dense")
    parts = parts_of(model, base)
    small = estimate_memory(model, parts, base, 8)
    split = estimate_memory(model, parts, dataclasses.replace(base, num_devices=4, model_parallel=2), 8)
    assert split.weights < small.weights  # heads and MLP split over two devices (the tiny vocabulary is whole)
    assert split.selection < small.selection  # KV heads split too
    one_row = estimate_memory(model, parts_of(model, base, CONTEXT[:200]), dataclasses.replace(base, method="full"), 8)
    assert list(one_row.phases) == ["one row", "decoding"] and one_row.selection == 0
    assert one_row.phases["decoding"]["the row's cache (the loop's input)"] > 0


def made(limit, phases=None):
    """An estimate of 100 MiB weights, 10 MiB selection and a 5 MiB largest phase (115 MiB)."""
    phases = {"chunk group prefill": {"a": 5 * MIB}, "decoding": {"b": 1 * MIB, "c": 2 * MIB}} if phases is None \
        else phases
    return MemoryEstimate(100 * MIB, 10 * MIB, phases, limit, "test:0")


def test_the_check_adds_the_stated_margin_and_refuses_within_it():
    bare = made(None)
    assert bare.peak == 115 * MIB and bare.largest_phase == "chunk group prefill"
    assert bare.margin == int(np.ceil(MARGIN_FRACTION * 115 * MIB)) + MARGIN_BYTES and bare.margin > 64 * MIB
    assert bare.checked == bare.peak + bare.margin
    config = ParallelCompConfig(chunk_len=48, group_size=4, num_devices=1)
    just_above = made(bare.peak + 1)  # the bare estimate fits, the estimate with its margin does not
    assert not just_above.fits()
    with pytest.raises(PcompError, match=r"^estimated peak memory 0\.11 GiB per device plus a safety margin of "
                                         r"0\.07 GiB \(0\.19 GiB\) exceeds the 0\.11 GiB available on "
                                         r"test:0; lower group_size \(now 4\), set or lower capacity \(now None\), "
                                         r"shorten chunk_len \(now 48\), use dtype bfloat16"):
        just_above.check(config)
    assert not made(bare.checked - 1).fits() and made(bare.checked).fits()
    made(100 * bare.checked).check(config)  # far above: accepted
    assert made(None).fits()  # an unknown limit refuses nothing
    one_row = made(bare.peak + 1, {"one row": {"a": 5 * MIB}, "decoding": {"b": MIB}})
    with pytest.raises(PcompError, match=r"; use a chunked method \(method=parallelcomp\), a shorter input"):
        one_row.check(config)


def test_the_table_names_every_part_and_the_total_the_check_uses():
    lines = made(200 * MIB).table().splitlines()
    assert lines[0].startswith("weights") and lines[1].startswith("kept chunk caches and P's cache (selection)")
    assert "phase: chunk group prefill (alive at once)" in lines and "phase: decoding (alive at once)" in lines
    assert any(line.strip().startswith("c ") and line.endswith("2.0 MiB") for line in lines)
    assert any(line.strip().startswith("= phase total") and line.endswith("3.0 MiB") for line in lines)
    tail = lines[-4:]
    assert tail[0].startswith("estimated peak: weights + selection + largest phase (chunk group prefill)")
    assert tail[0].endswith(" 115.0 MiB")
    assert tail[1].startswith("safety margin: 10% + 64 MiB") and tail[1].endswith(" 75.5 MiB")
    assert tail[2].startswith("checked against the device: estimated peak + margin") and tail[2].endswith(" 190.5 MiB")
    assert tail[3].startswith("available on test:0") and tail[3].endswith(" 200.0 MiB")


def test_a_real_estimate_is_refused_between_its_bare_peak_and_its_margin(model):
    config = ParallelCompConfig(chunk_len=48, group_size=4, num_devices=1)
    estimate = estimate_memory(model, parts_of(model, config), config, 8)
    assert estimate.fits()
    with pytest.raises(PcompError, match=r"exceeds the .* available on .*; lower group_size \(now 4\), set or lower "
                                         r"capacity \(now None\), shorten chunk_len \(now 48\), use dtype bfloat16"):
        dataclasses.replace(estimate, device_limit=estimate.peak + 1).check(config)
    dataclasses.replace(estimate, device_limit=10 * estimate.checked).check(config)


@pytest.mark.slow
def test_cli_dry_run_prints_the_estimate_and_runs_nothing(model, hf_checkpoints, tmp_path, capsys, monkeypatch):
    from pcomp_jax import generate

    monkeypatch.setattr(generate, "answer_parts", lambda *a, **k: pytest.fail("--dry-run ran the pipeline"))
    book = tmp_path / "book.txt"
    book.write_text(CONTEXT)
    argv = ["--config", "configs/demo.yaml", "--model", hf_checkpoints("llama_gqa_untied")[0],
            "--context-file", str(book), "--question", "where?", "--set", "pipeline.chunk_len=48", "--dry-run"]
    rc = generate.main(argv)
    out = capsys.readouterr().out
    assert rc == 0 and "estimated peak: weights + selection + largest phase" in out
    assert "phase: chunk group prefill (alive at once)" in out and "safety margin: 10% + 64 MiB" in out
    assert "checked against the device: estimated peak + margin" in out
    assert generate.main([*argv, "--output-json", str(tmp_path / "estimate.json")]) == 0  # written, not dropped
    written = json.loads((tmp_path / "estimate.json").read_text())
    assert written["dry_run"] and written["checked_bytes"] > written["peak_bytes"] > written["weights_bytes"] > 0
    assert "chunk group prefill" in written["phase_bytes"]
    monkeypatch.setattr(memory, "device_memory_limit", lambda device, resident=0: 64 * MIB)  # below the margin
    assert generate.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plus a safety margin of" in err[0] and "lower group_size (now 4)" in err[0]
    assert generate.main(["--prompt", "hi", "--dry-run", "--model", hf_checkpoints("llama_gqa_untied")[0]]) == 2
    assert "not with --prompt" in capsys.readouterr().err
