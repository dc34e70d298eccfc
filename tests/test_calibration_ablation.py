"""scripts/calibration_ablation.py: each preset runs on the config's whole pipeline (its merge
layout included), answering exactly as ``pcomp_jax.answer`` with the preset added."""

import dataclasses
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

import calibration_ablation  # noqa: E402
import pcomp_jax  # noqa: E402
from pcomp_jax import ParallelCompConfig  # noqa: E402
from pcomp_jax.tasks import make_task  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses or whole pipelines: the full suite, not the fast tier

PRESETS = ["none", "remove_shallow_sink", "remove_deep_middle"]


@pytest.fixture(scope="module")
def tiny(hf_checkpoints):
    path, _ = hf_checkpoints("llama_gqa_untied")
    return path, pcomp_jax.load_model(path)


@pytest.mark.parametrize("stage", ["merged", "chunk"])
def test_each_preset_answers_as_the_pipeline_does(tiny, stage):
    _, model = tiny
    task = make_task("passkey", model.tokenizer, 700, 0.5, 0)
    config = ParallelCompConfig(chunk_len=48, top_k_chunks=2, merge_layout="sequential", capacity=16)
    got = calibration_ablation.preset_answers(model, task, config, PRESETS, stage, 6)
    assert list(got) == PRESETS
    for name in PRESETS:
        want = pcomp_jax.answer(model, task.context, task.question,
                                calibration_ablation.preset_config(config, name, stage), 6)
        assert got[name].token_ids == want.token_ids and got[name].selected_chunks == want.selected_chunks, name
    # the layout matters on this input, so an ablation that ignored the config's would show here
    parallel = pcomp_jax.answer(model, task.context, task.question, dataclasses.replace(config, merge_layout="parallel"), 6)
    assert parallel.token_ids != got["none"].token_ids


def test_script_prints_one_line_per_run_and_the_table(tiny, capsys):
    path, _ = tiny
    calibration_ablation.main(["--set", f"model={path}", "--set", "dtype=float32", "--set", "pipeline.chunk_len=48",
                               "--tasks", "passkey", "--lengths", "600", "--depths", "0.2", "0.8",
                               "--presets", "remove_deep_recent"])
    out = capsys.readouterr().out
    assert "merge_layout=sequential" in out  # configs/demo.yaml's layout, not the library's default
    assert sum(line.startswith("passkey 600 depth") for line in out.splitlines()) == 4
    table = [line for line in out.splitlines() if line.startswith("| none |") or line.startswith("| remove_deep_recent |")]
    assert len(table) == 2 and all(line.endswith("/2 |") for line in table)


def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, capsys):
    path, _ = tiny
    assert calibration_ablation.main(["--set", "pipeline.chunk_len=0", "--set", f"model={path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "chunk_len" in err and "\n" not in err and "Traceback" not in err
    missing = str(tmp_path / "no_such_book.txt")
    assert calibration_ablation.main(["--set", f"model={path}", "--tasks", "needle", "--text", missing]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no_such_book.txt" in err and "\n" not in err
