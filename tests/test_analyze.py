"""The attention analyzer: pattern rule on hand-made profiles, and the command on a tiny model."""

import json

import numpy as np
import pytest

from pcomp_jax.analysis import classify_layer, relative_position_bins
from pcomp_jax.analyze import main, parse_layers


def test_classify_layer_rule():
    u = np.full(50, 0.2 / 40)
    u[:5] = u[-5:] = 0.08
    assert classify_layer(u)["pattern"] == "U-shaped"
    assert classify_layer(np.full(50, 1 / 50))["pattern"] == "uniform"
    mountain = np.full(50, 0.5 / 45)
    mountain[20:25] = 0.1
    result = classify_layer(mountain / mountain.sum())
    assert result["pattern"] == "mountain" and 0.4 < result["peak_position"] < 0.5


def test_relative_position_bins_sum_and_skip_padding():
    att = np.zeros((2, 12))
    att[:, :10] = 0.1
    binned = relative_position_bins(att, 10, 5)
    np.testing.assert_allclose(binned, 0.2)


def test_parse_layers():
    assert parse_layers("0-2,5", 6) == [0, 1, 2, 5]
    with pytest.raises(ValueError, match="must lie in 0..5"):
        parse_layers("4-9", 6)
    with pytest.raises(ValueError, match="ranges like 0-7,12"):
        parse_layers("a-b", 6)


@pytest.mark.slow
def test_analyze_command_on_tiny_model(hf_checkpoints, tmp_path, capsys):
    path, _ = hf_checkpoints("llama_gqa_untied")
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the dog ran in the sun. " * 12)
    out = tmp_path / "out"
    rc = main(["--set", f"model={path}", "--set", "pipeline.chunk_len=64",
               "--set", "pipeline.calibration=[{layers: [0, 1], region: all, threshold: 0.05, stage: chunk}]",
               "--context-file", str(text), "--question", "who ran?", "--bins", "10", "--last-queries", "2",
               "--output-dir", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["methods"]) == 3  # parallel, parallel calibrated, full
    for per_layer in summary["methods"].values():
        assert set(per_layer) == {"0", "1"}
        for layer in per_layer.values():
            assert layer["pattern"] in ("U-shaped", "mountain", "uniform")
            assert abs(sum(layer["profile"]) - 1) < 1e-3 and len(layer["heads"]) == 4
    assert (out / "attention.png").stat().st_size > 10_000
    calibrated = [m for m in summary["methods"] if "calibrated" in m][0]
    plain = [m for m in summary["methods"] if m.startswith("parallel") and m != calibrated][0]
    assert summary["methods"][calibrated]["0"]["profile"] != summary["methods"][plain]["0"]["profile"]


def test_analyze_bad_input(tmp_path, capsys):
    assert main(["--context-file", str(tmp_path / "missing.txt"), "--question", "q"]) == 2
    assert "cannot read context file" in capsys.readouterr().err
