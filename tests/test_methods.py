"""Methods as registered objects, the research API as docs/api.md shows it, and the pytrees'
declared axes: the two code blocks of docs/api.md run as written on the tiny model."""

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pcomp_jax
from pcomp_jax import ParallelCompConfig, answer, methods
from pcomp_jax.axes import logical_axes
from pcomp_jax.cache import cache_from_prefill
from pcomp_jax.chunking import build_rows, encode_parts
from pcomp_jax.compress import ConfigSnapKV, RecentTokens, SnapKV
from pcomp_jax.eval import EvalConfig, MethodSpec, evaluate
from pcomp_jax.prefill import PrefillSpec, empty_selection, prefill_group
from pcomp_jax.sharding import make_mesh, shard, shardings
from test_pipeline import make_context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILT_IN = ("parallelcomp", "pcw", "full", "truncate", "snapkv", "streaming")


@pytest.fixture(scope="module")
def model(hf_checkpoints):
    return pcomp_jax.load_model(hf_checkpoints("llama_gqa_untied")[0])


def docs_block(marker: str) -> str:
    """The ```python block that follows ``<!-- marker -->`` in docs/api.md (the Python API's page)."""
    with open(os.path.join(ROOT, "docs", "api.md"), encoding="utf-8") as f:
        text = f.read()
    found = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, re.S)
    assert found, f"docs/api.md has no python block after <!-- {marker} -->"
    return found.group(1)


def test_no_module_outside_the_registry_tests_a_method_name():
    names = "|".join(BUILT_IN)
    compares = [
        re.compile(rf"""["']({names})["']\s*(==|!=|\bin\b|\bnot in\b)"""),  # "full" == x, "pcw" in ...
        re.compile(rf"""(==|!=|\bin\b)\s*[(\[{{]?\s*["']({names})["']"""),  # x == "full", x in ("full", ...)
    ]
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "pcomp_jax")):
        for name in files:
            path = os.path.join(folder, name)
            if not name.endswith(".py") or path.endswith(os.path.join("pcomp_jax", "methods.py")):
                continue
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if any(p.search(line) for p in compares):
                        offenders.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not offenders, "method names tested outside pcomp_jax/methods.py:\n" + "\n".join(offenders)


def test_registry_resolves_refuses_and_registers():
    assert methods.method_names()[: len(BUILT_IN)] == BUILT_IN
    pc = methods.get_method("parallelcomp")
    assert pc.chunked and pc.top_k and isinstance(pc.token_scorer, ConfigSnapKV) and pc.calibration
    assert methods.get_method("full").plain_row and not methods.get_method("snapkv").plain_row
    with pytest.raises(pcomp_jax.ConfigError, match="method='sparse' is not allowed; choose one of: parallelcomp"):
        ParallelCompConfig(method="sparse")
    with pytest.raises(pcomp_jax.ConfigError, match="registered already"):
        pcomp_jax.register_method(pcomp_jax.Method("pcw"))
    with pytest.raises(pcomp_jax.ConfigError, match="takes a pcomp_jax.Method"):
        pcomp_jax.register_method("mine")
    mine = pcomp_jax.register_method(pcomp_jax.Method("recent_chunks", token_scorer=RecentTokens()))
    try:
        assert ParallelCompConfig(method="recent_chunks").method == "recent_chunks"
        spec = mine.prefill_spec(ParallelCompConfig(method="recent_chunks", capacity=16, obs_window=4))
        assert spec == PrefillSpec(capacity=16, token_scorer=RecentTokens())
        hash(spec)  # a static argument of jit
    finally:
        methods.unregister_method("recent_chunks")
    with pytest.raises(pcomp_jax.ConfigError, match="not allowed"):
        ParallelCompConfig(method="recent_chunks")


def test_method_prefill_specs_follow_the_config():
    config = ParallelCompConfig(capacity=32, obs_window=4, pool_kernel=3, top_k_chunks=3, kv_budget=100)
    spec = methods.get_method("parallelcomp").prefill_spec(config)
    assert spec.capacity == 32 and spec.token_scorer == SnapKV(4, 3)
    assert methods.get_method("pcw").prefill_spec(config).capacity is None  # pcw never evicts
    assert methods.get_method("snapkv").prefill_spec(config).capacity == 100  # one row, kv_budget
    assert methods.get_method("streaming").prefill_spec(config).token_scorer == RecentTokens()
    assert methods.get_method("parallelcomp").kept_chunks(config, 40) == 3
    assert methods.get_method("pcw").kept_chunks(config, 37) == 40  # every chunk, rounded up to a bucket


def test_calibration_is_refused_for_methods_that_do_not_take_it(model):
    config = ParallelCompConfig(method="truncate", calibration_preset="remove_shallow_middle")
    with pytest.raises(pcomp_jax.ConfigError, match=r"calibration applies to the chunked methods \(parallelcomp, pcw"):
        answer(model, make_context(30), "q?", config, 4)


def shipped_pipeline(name: str) -> ParallelCompConfig:
    """The pipeline section of ``configs/<name>.yaml`` with chunks sized for the tiny model's
    256-token window (40 tokens instead of 512; every other setting as shipped)."""
    pipeline = pcomp_jax.load_config(os.path.join(ROOT, "configs", f"{name}.yaml")).pipeline
    return dataclasses.replace(pipeline, chunk_len=40, group_size=min(pipeline.group_size, 4))


SNIPPET_CONFIGS = {
    "demo": lambda: shipped_pipeline("demo"),
    "128k": lambda: shipped_pipeline("128k"),
    "stage_eviction": lambda: dataclasses.replace(shipped_pipeline("demo"), capacity=12, obs_window=4,
                                                  stage_eviction=True),
    "evict_and_decode_eviction": lambda: ParallelCompConfig(chunk_len=40, capacity=12, obs_window=4,
                                                            decode_eviction=True),
    "merged_calibration": lambda: dataclasses.replace(shipped_pipeline("demo"),
                                                      calibration_preset="remove_shallow_middle"),
    "chunk_calibration": lambda: ParallelCompConfig(chunk_len=40, calibration_preset="remove_shallow_middle",
                                                    calibration_preset_stage="chunk"),
    "scored_tail_overlap": lambda: ParallelCompConfig(chunk_len=40, score_last_tokens=4, chunk_overlap=8,
                                                      sentence_chunks=False, top_k_chunks=3),
}


@pytest.mark.parametrize("name", [name if name == "demo" else pytest.param(name, marks=pytest.mark.slow)
                                  for name in SNIPPET_CONFIGS])  # the fast tier runs the demo config's
def test_research_snippet_runs_and_equals_answer(model, name):
    """The docs' "Composing the pipeline yourself" block, run as written, gives answer()'s
    tokens and selection under the shipped configs and eviction and calibration settings."""
    config = SNIPPET_CONFIGS[name]()
    context, question = make_context(150, seed=11), "where did the cat sit?"
    scope = {"model": model, "context": context, "question": question, "config": config}
    exec(compile(docs_block("research-api"), "docs/api.md:research-api", "exec"), scope)
    expected = answer(model, context, question, config, max_new_tokens=16)
    assert len(scope["rows"].groups(config.group_size)) > 1, "the snippet must run several chunk groups"
    assert scope["reply"].token_ids == expected.token_ids
    selected = np.asarray(scope["state"].chunk_ids)[np.asarray(scope["state"].chunk_valid)]
    assert sorted(selected.tolist()) == expected.selected_chunks


@pytest.mark.slow
def test_custom_scorer_from_the_docs_runs_through_answer_and_the_eval_runner(model, tmp_path):
    context, question = make_context(40, seed=12), "who ran?"  # one 512-token chunk fits the window
    scope = {"model": model, "context": context, "question": question}
    exec(compile(docs_block("custom-scorer"), "docs/api.md:custom-scorer", "exec"), scope)
    try:
        assert isinstance(scope["result"], pcomp_jax.pipeline.Answer) and scope["result"].method == "parallelcomp_keynorm"
        key_norm = scope["KeyNorm"]()

        # It really decides what is kept: the smallest-norm keys of every layer and KV head.
        parts = encode_parts(model.tokenizer, context, question, "Read.", "Answer:", True)
        rows = build_rows(parts, 40, model.config.window)
        kept = prefill_group(model.params, model.config, rows, PrefillSpec(capacity=8, token_scorer=key_norm))
        _, (keys, _) = jax.jit(pcomp_jax.model.llama.prefill_forward, static_argnums=1)(
            model.params, model.config, jnp.asarray(rows.tokens), jnp.asarray(rows.positions))
        p = rows.prefix_len
        for row in range(rows.num_chunks):
            c = int(rows.chunk_lengths[row])
            norms = np.linalg.norm(np.asarray(keys[:, row, p : p + c]), axis=-1)  # [L, c, KVH]
            for layer in range(model.config.num_layers):
                for head in range(model.config.num_kv_heads):
                    got = np.asarray(kept.kept_positions[layer, row, head]) - p
                    dropped = np.setdiff1d(np.arange(c), got)
                    assert len(set(got.tolist())) == 8 and got.min() >= 0 and got.max() < c
                    # Rotation keeps norms, so a repeated word ties with itself: compare norms, not positions.
                    assert norms[layer, got, head].max() <= norms[layer, dropped, head].min() + 1e-5, (row, layer, head)

        # Through answer() with eviction, and as a column of the evaluation runner.
        config = ParallelCompConfig(method="parallelcomp_keynorm", chunk_len=40, capacity=8, obs_window=4)
        ours = answer(model, context, question, config, 6)
        snap = answer(model, context, question, dataclasses.replace(config, method="parallelcomp"), 6)
        assert ours.selected_chunks == snap.selected_chunks  # the chunk scores do not depend on eviction
        eval_config = EvalConfig(
            output_dir=str(tmp_path / "out"), pipeline=ParallelCompConfig(chunk_len=48, obs_window=4),
            methods=(MethodSpec.of("keynorm", method="parallelcomp_keynorm", capacity=16),),
            tasks=("passkey",), lengths=(150,), depths=(0.5,), max_new_tokens=4,
        )
        metrics = evaluate(eval_config, model, progress=False)
        assert metrics["keynorm"]["synthetic"]["passkey"]["150"]["n"] == 1
        with open(tmp_path / "out" / "keynorm" / "settings.json", encoding="utf-8") as f:
            assert '"parallelcomp_keynorm"' in f.read()
    finally:
        methods.unregister_method("parallelcomp_keynorm")


def test_every_pipeline_pytree_declares_one_axis_name_per_dimension(model):
    parts = encode_parts(model.tokenizer, make_context(80), "where?", "Read.", "Answer:", True)
    rows = build_rows(parts, 40, model.config.window)
    selection = empty_selection(model.config, 2, 12, model.dtype)
    keys = jnp.zeros((model.config.num_layers, 1, 10, model.config.num_kv_heads, model.config.head_dim))
    cache = cache_from_prefill(keys, keys, jnp.array([7]), 16)
    for tree in (rows, selection, cache):
        leaves = jax.tree.leaves(tree)
        specs = jax.tree.leaves(logical_axes(tree), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        assert len(leaves) == len(specs) > 0
        for leaf, spec in zip(leaves, specs):
            assert len(spec) == np.ndim(leaf), (type(tree).__name__, spec, np.shape(leaf))
    mesh = make_mesh(4)
    group = rows.groups(4)[0]
    placed = shard(group, mesh)
    assert placed.tokens.sharding.spec == jax.sharding.PartitionSpec("chunk", None)
    assert len(placed.tokens.sharding.device_set) == 4 and placed.prefix_len == rows.prefix_len
    kept = shardings(selection, mesh).keys  # KV heads on the model axis (size 1 here: whole on every device)
    assert kept.spec == jax.sharding.PartitionSpec(None, None, None, "model", None) and kept.is_fully_replicated


def test_rows_groups_pad_with_empty_rows_that_continue_the_chunk_ids(model):
    parts = encode_parts(model.tokenizer, make_context(120), "where?", "Read.", "Answer:", True)
    rows = build_rows(parts, 40, model.config.window)
    n = rows.num_chunks
    groups = rows.groups(4)
    assert len(groups) == -(-n // 4) and all(g.tokens.shape[0] == 4 for g in groups)
    ids = np.concatenate([g.chunk_ids for g in groups])
    np.testing.assert_array_equal(ids, np.arange(len(ids)))
    lengths = np.concatenate([g.chunk_lengths for g in groups])
    assert (lengths[:n] > 0).all() and (lengths[n:] == 0).all()
    with pytest.raises(pcomp_jax.PcompError, match="num_rows=2 is fewer than the"):
        build_rows(parts, 40, model.config.window, num_rows=2)
    with pytest.raises(pcomp_jax.PcompError, match="group_size must be >= 1"):
        rows.groups(0)
