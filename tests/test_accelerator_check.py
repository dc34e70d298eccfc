"""scripts/accelerator_check.py: the dry run lists every step on any machine; the summary
is rendered from the step files a run left (the H100 run's, in docs/bench/gpu)."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "accelerator_check.py")


def test_dry_run_lists_every_step_and_exits_0(tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for step in ("tests", "parity", "prefill", "memory"):
        assert f"- {step} (at most" in done.stdout
    assert "bench_prefill.py --shape llama3-8b --dtype bfloat16" in done.stdout
    assert os.listdir(tmp_path) == []  # ran nothing, wrote nothing


def test_summary_is_rendered_from_the_step_files(tmp_path):
    out = tmp_path / "gpu"
    shutil.copytree(os.path.join(ROOT, "docs", "bench", "gpu"), out)
    os.remove(out / "summary.md")
    done = subprocess.run([sys.executable, SCRIPT, "--summary-only", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = (out / "summary.md").read_text()
    assert "NVIDIA H100" in summary and "| bfloat16 | False | cudnn | ran |" in summary
    assert "| 131,072 | 256 |" in summary and "| 131072 | ours_parallelcomp |" in summary
