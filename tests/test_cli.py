"""The command line, run in-process on a tiny checkpoint and once on the default model."""

import json
import subprocess
import sys

import pytest

from pcomp_jax.generate import main


def test_cli_full_method_writes_json(hf_checkpoints, tmp_path, capsys):
    path, _ = hf_checkpoints("llama_gqa_untied")
    out = tmp_path / "result.json"
    rc = main(["--prompt", "the cat", "--model", path, "--method", "full", "--max-new-tokens", "3",
               "--output-json", str(out)])
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["method"] == "full" and 1 <= len(record["token_ids"]) <= 3
    assert record["answer"] == capsys.readouterr().out.strip() or record["answer"].strip() == ""


def test_cli_reports_bad_model_without_traceback(tmp_path, capsys):
    assert main(["--prompt", "hi", "--model", str(tmp_path / "missing")]) == 2
    assert "error: model source" in capsys.readouterr().err


def test_cli_rejects_unknown_method():
    with pytest.raises(SystemExit):
        main(["--prompt", "hi", "--method", "bogus"])


@pytest.mark.default_model
def test_cli_default_model_answers():
    done = subprocess.run(
        [sys.executable, "-m", "pcomp_jax.generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "16"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
