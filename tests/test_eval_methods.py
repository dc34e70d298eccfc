"""Methods of the evaluation (``MethodSpec``): any pipeline field, None included, from Python
and from the flat YAML entries; errors name the method, the field and what is allowed. No model."""

import dataclasses
import json
import subprocess
import sys

import pytest

from pcomp_jax import ParallelCompConfig
from pcomp_jax.config import ConfigError, load_config, to_dict
from pcomp_jax.eval import DEFAULT_METHODS, EvalConfig, MethodSpec, load_eval_config


def write(tmp_path, text):
    path = tmp_path / "eval.yaml"
    path.write_text(text)
    return str(path)


def test_null_in_a_method_entry_turns_a_base_setting_off(tmp_path):
    config = load_eval_config(write(tmp_path, """
pipeline: {chunk_len: 512, capacity: 128, calibration_preset: remove_shallow_middle}
methods:
  - {name: keep_all, method: parallelcomp, capacity: null}
  - {name: no_preset, method: pcw, calibration_preset: null, max_length: 4096}
  - {name: as_base, method: parallelcomp}
"""))
    keep_all, no_preset, as_base = (spec.pipeline(config.pipeline) for spec in config.methods)
    assert keep_all.capacity is None and keep_all.calibration_preset == "remove_shallow_middle"
    assert no_preset.calibration_preset is None and no_preset.capacity == 128 and no_preset.method == "pcw"
    assert as_base.capacity == 128 and as_base.calibration_preset == "remove_shallow_middle"  # unnamed fields kept
    assert config.methods[1].max_length == 4096


def test_method_specs_from_python_and_yaml_are_the_same():
    spec = MethodSpec.of("pc_evict", method="parallelcomp", capacity=128, max_length=200)
    assert spec == MethodSpec.from_mapping({"name": "pc_evict", "capacity": 128, "method": "parallelcomp",
                                            "max_length": 200})
    assert spec == MethodSpec("pc_evict", 200, {"method": "parallelcomp", "capacity": 128})
    assert spec.changes == (("capacity", 128), ("method", "parallelcomp"))  # sorted by field: deterministic
    assert hash(spec) == hash(dataclasses.replace(spec)) and len(set(DEFAULT_METHODS)) == len(DEFAULT_METHODS)
    base = ParallelCompConfig(chunk_len=256)
    assert spec.pipeline(base) == dataclasses.replace(base, method="parallelcomp", capacity=128)
    rules = MethodSpec.from_mapping({"name": "c", "calibration": [{"layers": [0, 1], "region": "sink"}]})
    assert hash(rules) and to_dict(rules.pipeline(base))["calibration"][0]["layers"] == (0, 1)


def test_a_method_runs_the_lengths_between_its_min_and_max_length(tmp_path):
    from pcomp_jax.eval.items import PerplexityItem, SyntheticItem

    config = load_eval_config(write(tmp_path, "methods:\n  - {name: cut, method: truncate, min_length: 200, max_length: 400}\n"))
    (spec,) = config.methods
    assert spec == MethodSpec.of("cut", method="truncate", min_length=200, max_length=400)
    lengths = [100, 199, 200, 300, 400, 401]
    assert [spec.runs(SyntheticItem(f"passkey/{n}", {"length": n})) for n in lengths] == [False, False, True, True, True, False]
    assert [spec.runs(PerplexityItem(f"ppl/{n}", {"prefix_len": n})) for n in lengths] == [False, False, True, True, True, False]
    with pytest.raises(ConfigError, match="method 'x': min_length=300 is above max_length=200; give min_length <= max_length"):
        MethodSpec.of("x", min_length=300, max_length=200)


def test_unknown_field_in_a_method_entry_names_it_and_the_allowed_fields(tmp_path):
    path = write(tmp_path, "methods:\n  - {name: evict, method: parallelcomp, capcity: 128}\n")
    with pytest.raises(ConfigError, match=r"method 'evict': unknown field 'capcity'; allowed fields: name, "
                                          r"max_length, min_length, method, chunk_len, .*capacity.*kv_budget"):
        load_config(path, cls=EvalConfig)
    with pytest.raises(ConfigError, match="unknown field 'top_k'"):
        MethodSpec.of("x", top_k=3)
    with pytest.raises(ConfigError, match="a method needs a name"):
        load_eval_config(write(tmp_path, "methods:\n  - {method: pcw}\n"))
    with pytest.raises(ConfigError, match="method 'x': capacity=1024 is larger than chunk_len=512"):
        load_eval_config(write(tmp_path, "methods:\n  - {name: x, capacity: 1024}\n"))  # values checked up front


def test_command_line_runs_as_a_package():
    out = subprocess.run([sys.executable, "-m", "pcomp_jax.eval", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: python -m pcomp_jax.eval" in out.stdout and "--output-dir" in out.stdout
    assert "Evaluation runner: every method side by side" in out.stdout and "Warning" not in out.stderr


def test_results_from_before_an_option_existed_resume_only_while_it_is_off(tmp_path):
    import json

    from pcomp_jax.config import ParallelCompConfig, to_dict
    from pcomp_jax.eval.runner import check_or_write_settings

    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "predictions.jsonl").write_text('{"id": "x"}\n')
    old_pipeline = {k: v for k, v in to_dict(ParallelCompConfig()).items() if k not in ("stage_eviction", "merge_layout")}
    (directory / "settings.json").write_text(json.dumps({"model": "m", "pipeline": old_pipeline}))
    check_or_write_settings(str(directory), {"model": "m", "pipeline": to_dict(ParallelCompConfig())})  # resumes
    (directory / "settings.json").write_text(json.dumps({"model": "m", "pipeline": old_pipeline}))
    with pytest.raises(ConfigError, match="pipeline differ"):
        check_or_write_settings(str(directory), {"model": "m", "pipeline": to_dict(
            ParallelCompConfig(merge_layout="sequential"))})
    no_sentences = {k: v for k, v in old_pipeline.items() if k != "sentence_chunks"}
    (directory / "settings.json").write_text(json.dumps({"model": "m", "pipeline": no_sentences}))
    with pytest.raises(ConfigError, match="pipeline differ"):  # sentence chunks changed results: never mixed
        check_or_write_settings(str(directory), {"model": "m", "pipeline": to_dict(ParallelCompConfig())})


def test_the_needle_text_is_compared_by_its_contents_not_its_path(tmp_path):
    """The same book under another path (another machine) resumes; another book, or an edited
    copy under the same path, is refused naming text_sha256."""
    from pcomp_jax.eval.runner import check_or_write_settings, text_digest

    book, moved, other = tmp_path / "book.txt", tmp_path / "moved.txt", tmp_path / "other.txt"
    book.write_text("It was a dark and stormy night. " * 50)
    moved.write_text(book.read_text())
    other.write_text("Call me Ishmael. " * 50)
    assert text_digest(str(book)) == text_digest(str(moved)) != text_digest(str(other)) != text_digest(None)
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "predictions.jsonl").write_text('{"id": "x"}\n')
    settings = lambda path: {"model": "m", "text_file": str(path), "text_sha256": text_digest(str(path))}
    check_or_write_settings(str(directory), settings(book))
    check_or_write_settings(str(directory), settings(moved))  # resumes; the record keeps the new path
    assert json.load(open(directory / "settings.json"))["text_file"] == str(moved)
    with pytest.raises(ConfigError, match=r"\(text_sha256 differ\)"):
        check_or_write_settings(str(directory), settings(other))
    moved.write_text("edited " + book.read_text())
    with pytest.raises(ConfigError, match=r"\(text_sha256 differ\)"):
        check_or_write_settings(str(directory), settings(moved))
    # a record from before the digest: the path decides, as it did
    (directory / "settings.json").write_text(json.dumps({"model": "m", "text_file": str(book)}))
    with pytest.raises(ConfigError, match=r"\(text_file differ\)"):
        check_or_write_settings(str(directory), settings(other))
