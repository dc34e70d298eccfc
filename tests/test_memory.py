"""The memory preflight: XLA's buffer plan of the run's compiled stages, per device."""

import dataclasses

import jax
import numpy as np
import pytest

import pcomp_jax
from pcomp_jax import ParallelCompConfig
from pcomp_jax.chunking import encode_parts
from pcomp_jax.errors import PcompError
from pcomp_jax.memory import MemoryEstimate, estimate_memory, per_device_bytes
from pcomp_jax.pipeline import prefill_context

CONTEXT = " ".join(f"The cat sat on mat number {i}." for i in range(60))


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
    pre = prefill_context(model, parts, config)
    held = per_device_bytes(pre.selection)  # k kept chunks; the estimate adds one group of candidates
    assert estimate.selection == held * (2 + 4) // 2
    assert set(estimate.stages) == {"chunk group", "question on the merged cache", "decoding"}
    assert all(size > 0 for size in estimate.stages.values())
    assert estimate.peak == estimate.weights + estimate.selection + max(estimate.stages.values())


@pytest.mark.skipif(len(jax.devices()) < 4, reason="compares 1 and 4 devices (the CPU run has four)")
def test_estimate_follows_the_settings(model):
    base = ParallelCompConfig(chunk_len=48, top_k_chunks=2, group_size=4, num_devices=1, attention="dense")
    parts = parts_of(model, base)
    small = estimate_memory(model, parts, base, 8)
    bigger_group = estimate_memory(model, parts, dataclasses.replace(base, group_size=8), 8)
    assert bigger_group.stages["chunk group"] > 1.5 * small.stages["chunk group"]
    evicting = estimate_memory(model, parts, dataclasses.replace(base, capacity=8), 8)
    assert evicting.selection < small.selection
    split = estimate_memory(model, parts, dataclasses.replace(base, num_devices=4, model_parallel=2), 8)
    assert split.weights < small.weights  # heads and MLP split over two devices (the tiny vocabulary is whole)
    one_row = estimate_memory(model, parts_of(model, base, CONTEXT[:200]), dataclasses.replace(base, method="full"), 8)
    assert set(one_row.stages) == {"one row", "decoding"} and one_row.selection == 0


def test_a_run_that_cannot_fit_is_refused_naming_what_to_change(model):
    config = ParallelCompConfig(chunk_len=48, group_size=4, num_devices=1)
    estimate = estimate_memory(model, parts_of(model, config), config, 8)
    assert estimate.fits() and "estimated peak" in estimate.table()
    tight = dataclasses.replace(estimate, device_limit=estimate.peak - 1)
    with pytest.raises(PcompError, match=r"exceeds the .* available on .*; lower group_size \(now 4\), set or lower "
                                         r"capacity \(now None\), shorten chunk_len \(now 48\), use dtype bfloat16"):
        tight.check(config)
    assert MemoryEstimate(1, 2, {"a": 3}, None, "x").fits()  # an unknown limit refuses nothing


def test_cli_dry_run_prints_the_estimate_and_runs_nothing(model, hf_checkpoints, tmp_path, capsys, monkeypatch):
    from pcomp_jax import generate

    monkeypatch.setattr(generate, "answer_parts", lambda *a, **k: pytest.fail("--dry-run ran the pipeline"))
    book = tmp_path / "book.txt"
    book.write_text(CONTEXT)
    rc = generate.main(["--config", "configs/demo.yaml", "--model", hf_checkpoints("llama_gqa_untied")[0],
                        "--context-file", str(book), "--question", "where?", "--set", "pipeline.chunk_len=48",
                        "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "estimated peak: weights + selection + largest stage" in out and "stage: chunk group" in out
    assert generate.main(["--prompt", "hi", "--dry-run", "--model", hf_checkpoints("llama_gqa_untied")[0]]) == 2
    assert "not with --prompt" in capsys.readouterr().err
