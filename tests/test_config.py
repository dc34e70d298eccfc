"""The typed config tree: YAML, --set overrides, validation messages."""

import pytest

from pcomp_jax.config import ConfigError, ParallelCompConfig, RunConfig, load_config


def test_defaults_and_shipped_configs():
    assert load_config() == RunConfig()
    demo = load_config("configs/demo.yaml")
    assert demo.task.length == 16384 and demo.pipeline.method == "parallelcomp"
    assert load_config("configs/128k.yaml").task.length == 131072


def test_overrides_parse_yaml_values():
    cfg = load_config("configs/demo.yaml", ["pipeline.capacity=64", "pipeline.chat=false", "task.depth=0.25"])
    assert cfg.pipeline.capacity == 64 and cfg.pipeline.chat is False and cfg.task.depth == 0.25
    assert load_config(overrides=["pipeline.capacity=null"]).pipeline.capacity is None


@pytest.mark.parametrize(
    "override,message",
    [
        ("pipeline.top_k_chunks=0", "top_k_chunks must be >= 1, got 0"),
        ("pipeline.capacity=100000", "capacity=100000 is larger than chunk_len=512"),
        ("pipeline.chunk_size=3", "unknown config field 'pipeline.chunk_size'; allowed fields: method, chunk_len"),
        ("pipeline.chunk_len=abc", "config field 'pipeline.chunk_len' must be int, got 'abc'"),
        ("pipeline.chat=3", "config field 'pipeline.chat' must be bool, got 3"),
        ("pipeline.method=magic", "method='magic' is not allowed; choose one of: parallelcomp, pcw, full, truncate"),
        ("pipeline.pool_kernel=4", "pool_kernel must be odd"),
        ("task.depth=1.5", "task.depth must be between 0 and 1"),
        ("colour=red", "unknown config field 'colour'"),
        ("pipeline=3", "pipeline must be a mapping"),
        ("nonsense", "--set takes field=value"),
        ("pipeline.preset=paper", "config field 'pipeline.preset': 'paper' is not allowed; allowed: paper_llama2"),
        ("pipeline.preset=[a]", "config field 'pipeline.preset': \\['a'\\] is not allowed; allowed: paper_llama2"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("'", "'")):
        load_config(overrides=[override])


def test_paper_presets_are_the_reference_defaults(tmp_path):
    """docs/algorithm.md's reference defaults: k = 3 by query NLL, calibration and eviction off in
    the quick start (eviction: capacity 512, w = 8, kernel 7), chunk length per model family."""
    for name, chunk_len in {"paper_llama2": 3600, "paper_llama3": 7600, "paper_llama3_1": 6000,
                            "paper_qwen2": 6000}.items():
        cfg = ParallelCompConfig.preset(name)
        assert (cfg.chunk_len, cfg.top_k_chunks, cfg.capacity, cfg.obs_window, cfg.pool_kernel) == (chunk_len, 3, None, 8, 7)
        assert (cfg.method, cfg.sentence_chunks, cfg.merge_layout, cfg.calibration, cfg.calibration_preset) == (
            "parallelcomp", False, "parallel", (), None)
        assert not (cfg.stage_eviction or cfg.decode_eviction)
    assert ParallelCompConfig.preset("paper_llama3", capacity=512).capacity == 512
    path = tmp_path / "paper.yaml"
    path.write_text("pipeline:\n  preset: paper_llama3\n  top_k_chunks: 4\n")
    cfg = load_config(str(path), ["pipeline.capacity=512"]).pipeline
    assert cfg == ParallelCompConfig.preset("paper_llama3", top_k_chunks=4, capacity=512)
    with pytest.raises(ConfigError, match="preset='x' is not allowed; allowed: paper_llama2"):
        ParallelCompConfig.preset("x")


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline: [unclosed")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(bad))


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match="chunk_len must be >= 1"):
        ParallelCompConfig(chunk_len=0)


def test_calibration_rules_from_yaml_and_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "pipeline:\n  calibration:\n    - {layers: [1, 8], region: middle, stage: chunk}\n"
        "    - {layers: [0, 3], region: sink, threshold: 0.2, last_queries: 4}\n"
    )
    rules = load_config(str(path)).pipeline.calibration
    assert [r.layers for r in rules] == [(1, 8), (0, 3)]
    assert rules[1].threshold == 0.2 and rules[1].stage == "merged" and rules[1].region_size == 100
    cfg = load_config(overrides=["pipeline.calibration_preset=remove_shallow_middle"])
    assert cfg.pipeline.calibration_preset == "remove_shallow_middle"


@pytest.mark.parametrize(
    "value,message",
    [
        ("[{layers: [1], region: middle}]", r"pipeline.calibration\[0\].layers must be \[first, last\]"),
        ("[{layers: [1, 2], region: top}]", r"region 'top' is not allowed; choose one of: sink, recent, middle, all"),
        ("[{layers: [1, 2], threshold: -1}]", "threshold must be >= 0"),
        ("[{layers: [3, 2]}]", "must satisfy 0 <= first <= last"),
        ("[{layers: [1, 2], stage: later}]", "stage 'later' is not allowed; choose one of: chunk, merged"),
        ("[{layers: [1, 2], colour: 1}]", r"unknown config field 'pipeline.calibration\[0\].colour'"),
        ("3", "must be a list of mappings"),
    ],
)
def test_bad_calibration_rules(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[f"pipeline.calibration={value}"])
    with pytest.raises(ConfigError, match="calibration_preset='magic' is not allowed"):
        load_config(overrides=["pipeline.calibration_preset=magic"])


def test_python_api_checks_types_and_builds_rules():
    with pytest.raises(ConfigError, match="config field 'chunk_len' must be int, got '512'"):
        ParallelCompConfig(chunk_len="512")
    with pytest.raises(ConfigError, match="config field 'chat' must be bool"):
        ParallelCompConfig(chat="yes")
    cfg = ParallelCompConfig(calibration=[{"layers": [1, 2], "region": "sink"}])
    assert cfg.calibration[0].layers == (1, 2) and cfg.calibration[0].region == "sink"
    with pytest.raises(ConfigError, match=r"calibration\[0\].region 'x' is not allowed"):
        ParallelCompConfig(calibration=[{"layers": [1, 2], "region": "x"}])


def test_the_config_names_agree_with_the_tables_that_implement_them():
    """The config module is a leaf: it names the attention backends, merge layouts and dtypes
    itself; the modules that implement them key their tables by the same names."""
    from pcomp_jax import attention, checkpoints, config, prefill

    assert tuple(attention.CAUSAL_BACKENDS) == config.CAUSAL_BACKEND_NAMES
    assert set(config.SINGLE_DEVICE_KERNELS) == {"pallas", *attention.NO_KEY_MASK}
    assert tuple(prefill.MERGE_LAYOUTS) == config.MERGE_LAYOUT_NAMES
    assert prefill.CHUNK_ORDERS == config.CHUNK_ORDER_NAMES
    assert prefill.CHUNK_ANSWERS == config.CHUNK_ANSWER_NAMES
    assert [n for n, layout in prefill.MERGE_LAYOUTS.items() if layout.reprefills] == [config.REPREFILL]
    assert tuple(checkpoints.DTYPES) == config.DTYPE_NAMES


def test_the_config_module_imports_no_pipeline_module():
    import ast
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pcomp_jax", "config.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and not node.level
                 and node.module.startswith("pcomp_jax")}
    assert imported <= {"cli", "errors", "registry", "typed"}, imported


def test_capacity_below_the_scorers_window_is_refused_before_a_model_loads():
    from pcomp_jax import methods
    from pcomp_jax.compress import SnapKV
    from pcomp_jax.plans import check_settings

    with pytest.raises(ConfigError, match="capacity=4 is smaller than obs_window=8"):
        check_settings(load_config(overrides=["pipeline.capacity=4"]).pipeline)
    check_settings(load_config(overrides=["pipeline.capacity=4", "pipeline.obs_window=4"]).pipeline)
    methods.register_method(methods.Method("snap32", token_scorer=SnapKV(obs_window=32)))
    try:  # a registered scorer's own window counts, not the config's
        with pytest.raises(ConfigError, match="capacity=16 is smaller than obs_window=32"):
            check_settings(ParallelCompConfig(method="snap32", capacity=16, obs_window=4))
        check_settings(ParallelCompConfig(method="snap32", capacity=32, obs_window=64))
    finally:
        methods.unregister_method("snap32")
