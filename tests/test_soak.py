"""scripts/soak.py on a tiny model: its report, its per-request rows, no compilation after
the warm-up (the combinations repeat), and its verdict on the memory limit."""

import csv
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

import soak  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses or whole pipelines: the full suite, not the fast tier


def test_soak_reports_memory_compilations_and_one_row_per_request(hf_checkpoints, tmp_path, capsys):
    path, _ = hf_checkpoints("llama_gqa_untied")
    rows = tmp_path / "rss.csv"
    common = ["--model", path, "--requests", "5", "--lengths", "400", "--chunk-len", "96", "--methods", "parallelcomp", "truncate",
              "--question-lengths", "8", "--rss-csv", str(rows)]
    assert soak.main(common + ["--max-growth-mib", "100000"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| 5 |")]
    assert len(table) == 1
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    assert cells[6] == "0"  # compilations after the warm-up: the 2 combinations were seen in it
    assert "resident set after gc + malloc_trim" in out and "device arrays alive after warm-up" in out
    written = list(csv.DictReader(open(rows)))
    assert [int(r["request"]) for r in written] == [0, 1, 2, 3, 4]
    assert {r["method"] for r in written} == {"parallelcomp", "truncate"} and all(float(r["rss_mib"]) > 0 for r in written)
    # a limit no run can meet: the verdict is a failure, said in one line
    assert soak.main(common + ["--max-growth-mib", "-100000", "--requests", "2"]) == 1  # the warm-up alone
    assert "error: memory grew" in capsys.readouterr().err
