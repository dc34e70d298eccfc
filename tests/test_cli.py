"""The command line, run in-process on a tiny checkpoint and once on the default model."""

import json
import subprocess
import sys

import pytest

from pcomp_jax.generate import main

pytestmark = pytest.mark.slow  # subprocesses or whole pipelines: the full suite, not the fast tier


def test_cli_full_method_writes_json(hf_checkpoints, tmp_path, capsys):
    path, _ = hf_checkpoints("llama_gqa_untied")
    out = tmp_path / "result.json"
    rc = main(["--prompt", "the cat", "--model", path, "--method", "full", "--max-new-tokens", "3",
               "--output-json", str(out)])
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["method"] == "full" and 1 <= len(record["token_ids"]) <= 3
    assert capsys.readouterr().out.splitlines()[0] == record["answer"].strip()


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


TINY_SETS = ["--set", "pipeline.chunk_len=48", "--set", "pipeline.capacity=16", "--set", "pipeline.top_k_chunks=2"]


def test_cli_context_file_and_question(hf_checkpoints, tmp_path, capsys):
    path, _ = hf_checkpoints("llama_gqa_untied")
    text = tmp_path / "book.txt"
    text.write_text("the cat sat on the mat. " * 20)
    out = tmp_path / "r.json"
    rc = main(["--config", "configs/demo.yaml", "--model", path, "--context-file", str(text), "--question",
               "where did the cat sit?", "--max-new-tokens", "4", "--output-json", str(out), *TINY_SETS])
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["num_chunks"] >= 2 and len(record["selected_chunks"]) == 2
    assert len(record["chunk_scores"]) == record["num_chunks"] and record["correct"] is None
    assert set(record["timings_s"]) >= {"load", "prefill", "question_prefill", "decode"}
    assert "selected chunks:" in capsys.readouterr().out


def test_cli_jsonl_record_with_answer(hf_checkpoints, tmp_path):
    path, _ = hf_checkpoints("llama_gqa_untied")
    data = tmp_path / "items.jsonl"
    items = [{"context": "the sun is hot. " * 15, "question": "is the sun hot?", "answer": "zzzz-never"}]
    data.write_text("\n".join(json.dumps(i) for i in items) + "\n")
    out = tmp_path / "r.json"
    assert main(["--model", path, "--context-file", str(data), "--output-json", str(out), *TINY_SETS]) == 0
    record = json.loads(out.read_text())
    assert record["question"] == "is the sun hot?" and record["correct"] is False


@pytest.mark.parametrize(
    "content,extra,message",
    [
        (None, [], "cannot read context file"),
        ("just text", [], "no question"),
        ('{"question": "q"}', [], "needs a string field 'context'"),
        ("{not json", [], "is not valid JSON"),
        ('{"context": "a", "question": "q"}', ["--record", "3"], "has 1 records"),
    ],
)
def test_cli_bad_context_files(hf_checkpoints, tmp_path, capsys, content, extra, message):
    path, _ = hf_checkpoints("llama_gqa_untied")
    name = tmp_path / ("in.jsonl" if content and content.startswith("{") else "in.txt")
    if content is not None:
        name.write_text(content)
    assert main(["--model", path, "--context-file", str(name), *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_config_values(capsys, tmp_path):
    assert main(["--set", "pipeline.chunk_size=3"]) == 2
    assert "unknown config field 'pipeline.chunk_size'" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "none.yaml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err
    assert main(["--prompt", "hi", "--method", "parallelcomp"]) == 2
    assert "--prompt runs with full attention only" in capsys.readouterr().err


def test_cli_several_questions_read_once(hf_checkpoints, tmp_path, capsys):
    path, _ = hf_checkpoints("llama_gqa_untied")
    text = tmp_path / "book.txt"
    text.write_text("the cat sat on the mat. the dog ran in the park. " * 12)
    questions = tmp_path / "questions.txt"
    questions.write_text("where did the cat sit?\n\nwhere did the dog run?\n")
    out = tmp_path / "many.json"
    common = ["--config", "configs/demo.yaml", "--model", path, "--context-file", str(text), "--max-new-tokens", "4",
              *TINY_SETS]
    assert main([*common, "--questions-file", str(questions), "--output-json", str(out)]) == 0
    records = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert [r["question"] for r in records] == ["where did the cat sit?", "where did the dog run?"]
    assert "question 2: where did the dog run?" in printed and "read_document" in records[0]["timings_s"]
    for r in records:  # each a full record, as one --question writes
        assert r["num_chunks"] >= 2 and len(r["selected_chunks"]) == 2 and 1 <= len(r["token_ids"]) <= 4
        assert len(r["chunk_scores"]) == r["num_chunks"] and r["correct"] is None


def test_cli_bad_questions_input(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    text = tmp_path / "book.txt"
    text.write_text("the cat sat on the mat.")
    cases = [
        (["--questions-file", str(empty)], "has no questions"),
        (["--questions-file", str(tmp_path / "missing.txt")], "cannot read --questions-file"),
        (["--questions-file", str(empty), "--question", "why?"], "not both"),
        (["--question", "a?", "--question", "b?", "--dry-run"], "single --question"),
    ]
    for flags, message in cases:
        assert main(["--context-file", str(text), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_cli_requests_with_contexts_of_their_own_are_one_batch(hf_checkpoints, tmp_path, capsys):
    """A .jsonl questions file: requests on the common context, on an inline context and on a
    context file of their own, answered as one batch; each record is its own answer()'s."""
    import pcomp_jax
    from pcomp_jax.config import load_config

    path, _ = hf_checkpoints("llama_gqa_untied")
    common_text = "the cat sat on the mat. the dog ran in the park. " * 12
    (tmp_path / "book.txt").write_text(common_text)
    other = "the bird sang in the tree. the fish swam in the lake. " * 10
    (tmp_path / "other.txt").write_text(other)
    inline = "a red fox jumped over the fence. the cow ate the grass. " * 9
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"question": "where did the cat sit?"}) + "\n\n"
                        + json.dumps({"context": inline, "question": "what did the cow eat?"}) + "\n"
                        + json.dumps({"context_file": "other.txt", "question": "where did the fish swim?"}) + "\n")
    out = tmp_path / "batch.json"
    common = ["--config", "configs/demo.yaml", "--model", path, "--context-file", str(tmp_path / "book.txt"),
              "--max-new-tokens", "4", *TINY_SETS]
    assert main([*common, "--questions-file", str(requests), "--output-json", str(out)]) == 0
    assert "question 3: where did the fish swim?" in capsys.readouterr().out
    records = json.loads(out.read_text())
    assert [r["question"] for r in records] == ["where did the cat sit?", "what did the cow eat?",
                                                "where did the fish swim?"]
    overrides = [s for s in TINY_SETS if s != "--set"]
    pipeline = load_config("configs/demo.yaml", overrides).pipeline
    model = pcomp_jax.load_model(path)
    for record, context in zip(records, (common_text, inline, other)):
        reference = pcomp_jax.answer(model, context, record["question"], pipeline, 4)
        assert record["token_ids"] == reference.token_ids and record["selected_chunks"] == reference.selected_chunks
    # --batch-size: the same answers in batches of at most 2; --dry-run estimates the largest batch
    assert main([*common, "--questions-file", str(requests), "--batch-size", "2", "--output-json", str(out)]) == 0
    assert [r["token_ids"] for r in json.loads(out.read_text())] == [r["token_ids"] for r in records]
    peaks = {}
    for size in ("1", "3"):
        assert main([*common, "--questions-file", str(requests), "--batch-size", size, "--dry-run",
                     "--output-json", str(out)]) == 0
        peaks[size] = json.loads(out.read_text())["peak_bytes"]
    assert "phase: batched decoding" in capsys.readouterr().out and peaks["3"] > peaks["1"]
    for extra, message in ((["--batch-size", "0"], "--batch-size must be a whole number >= 1, got 0"),
                           (["--batch-size", "2", "--question", "q?"], "give the questions with --question or")):
        assert main([*common, "--questions-file", str(requests), *extra]) == 2
        assert message in capsys.readouterr().err
    assert main([*common, "--question", "q?", "--batch-size", "2"]) == 2
    assert "--batch-size applies to a .jsonl --questions-file" in capsys.readouterr().err
    bad = [('{"question": 3}', "needs a non-empty string field 'question'"), ("not json", "is not valid JSON"),
           ('{"question": "q?", "context": "c", "context_file": "x"}', "both 'context' and 'context_file'"),
           ('{"question": "q?", "colour": 1}', "unknown field 'colour'"),
           ('{"question": "q?", "context_file": "missing.txt"}', "cannot read context file")]
    for line, message in bad:
        requests.write_text(line + "\n")
        assert main([*common, "--questions-file", str(requests)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
