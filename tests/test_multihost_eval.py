"""The evaluation runner on two processes (jax.distributed, two local CPU processes): every
process runs the sweep, process 0 writes each record once, and a second run resumes from
process 0's files. Its own module so that the test runner can balance it against the other
multi-process tests (test_multihost.py)."""

import json
import sys

import pytest

from test_multihost import cpu_env, free_port, launch

pytestmark = pytest.mark.slow  # subprocesses or whole pipelines: the full suite, not the fast tier


def test_eval_on_two_processes_writes_once_and_resumes(hf_checkpoints, tmp_path):
    path, _ = hf_checkpoints("llama_gqa_untied")

    def eval_cmd(out_dir):
        config = tmp_path / "eval.yaml"
        config.write_text(
            f"model: {path}\ntasks: [passkey]\nlengths: [300]\ndepths: [0.5]\nmax_new_tokens: 4\n"
            "pipeline: {chunk_len: 48, top_k_chunks: 2, group_size: 4}\n"
            "methods: [{name: pc_seq, method: parallelcomp, merge_layout: sequential}]\n")
        return [sys.executable, "-m", "pcomp_jax.eval", "--config", str(config), "--output-dir", str(out_dir),
                "--no-progress"]

    from pcomp_jax.eval import evaluate
    from pcomp_jax.eval.config import load_eval_config

    eval_cmd(tmp_path / "one")  # writes the config; the reference runs it in this process (four CPU devices)
    evaluate(load_eval_config(str(tmp_path / "eval.yaml"), [f"output_dir={tmp_path / 'one'}"]), progress=False)
    for attempt in range(2):  # the second run finds everything done (process 0's files decide)
        port = free_port()
        results = launch([(eval_cmd(tmp_path / "two") + ["--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                                         "2", "--process-id", str(i)], cpu_env(2)) for i in range(2)])
        for rc, _, err in results:
            assert rc == 0, err
        assert "resuming: 1 finished predictions kept, 0 to run" in results[0][2] or attempt == 0
    for method in ("pc_seq",):
        one = [json.loads(line) for line in open(tmp_path / "one" / method / "predictions.jsonl")]
        two = [json.loads(line) for line in open(tmp_path / "two" / method / "predictions.jsonl")]
        assert len(two) == 1  # written once, not once per process nor again on resume
        assert [(r["prediction"], r["selected_chunks"]) for r in one] == [(r["prediction"], r["selected_chunks"]) for r in two]
