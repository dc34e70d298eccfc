"""LongBench loader, templates and metrics: hand-computed metric values, the fixture, and bad files."""

from __future__ import annotations

import json
import os

import pytest

from pcomp_jax.longbench import (
    MAX_NEW_TOKENS,
    PROMPT_TEMPLATES,
    LongBenchExample,
    load_longbench,
    score_example,
    split_prompt,
)
from pcomp_jax.metrics import (
    DATASET_METRICS,
    classification_accuracy,
    code_edit_similarity,
    count_accuracy,
    qa_f1,
    retrieval_accuracy,
    rouge_l,
    score_prediction,
)

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "longbench_fixture.jsonl")
TREC_CLASSES = ["Other location", "Other", "City", "Country"]


def _write(tmp_path, name: str, lines: list[str]) -> str:
    """A file under tmp_path with these lines; its path."""
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def _record(**overrides) -> dict:
    """A valid hotpotqa record with some fields replaced (a value of ... drops the field)."""
    record = {
        "context": "Passage 1:\nParis is in France.",
        "input": "Where is Paris?",
        "answers": ["France"],
        "all_classes": None,
        "length": 5,
        "dataset": "hotpotqa",
        "_id": "x1",
    }
    record.update(overrides)
    return {k: v for k, v in record.items() if v is not ...}


# --- metrics, against values worked out by hand ---


def test_qa_f1():
    # "The cat sat" -> "cat sat" (2 tokens); "a cat sat down" -> "cat sat down" (3). Common: 2.
    # precision 2/2, recall 2/3, F1 = 2 * 1 * 2/3 / (1 + 2/3) = (4/3) / (5/3) = 0.8
    assert qa_f1("The cat sat", "a cat sat down") == pytest.approx(0.8)
    # Punctuation and case go; tokens count with multiplicity: [paris, paris] vs [paris] -> common 1,
    # precision 1/2, recall 1, F1 = 2 * 1/2 / (3/2) = 2/3
    assert qa_f1("Paris, PARIS!", "paris") == pytest.approx(2 / 3)
    assert qa_f1("An apple.", "apple") == 1.0
    assert qa_f1("London", "Paris") == 0.0
    assert qa_f1("the", "Paris") == 0.0  # nothing left after dropping the article


def test_rouge_l():
    # pred [police killed the gunman] (4), ref [the gunman was killed by police] (6): the longest common
    # subsequence is "the gunman" (2). P = 2/4, R = 2/6, F = 2 * 1/2 * 1/3 / (1/2 + 1/3) = (1/3) / (5/6) = 0.4
    assert rouge_l("police killed the gunman", "the gunman was killed by police") == pytest.approx(0.4)
    # Lowercased, punctuation dropped: [the cat sat on the mat] vs [the cat lay on the mat]:
    # LCS "the cat on the mat" = 5 of 6 each side -> P = R = F = 5/6
    assert rouge_l("The cat sat on the mat.", "the cat lay on the mat") == pytest.approx(5 / 6)
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("   ", "the cat") == 0.0


def test_classification_accuracy_substring_rule():
    assert classification_accuracy("City", "City", TREC_CLASSES) == 1.0
    # Two classes named: the credit is shared, 1/2.
    assert classification_accuracy("City or Country", "City", TREC_CLASSES) == 0.5
    # Matched {Other location, Other}; "Other" is a proper substring of the truth and is dropped -> 1/1.
    assert classification_accuracy("Other location", "Other location", TREC_CLASSES) == 1.0
    # Matched {Other}, dropped for the same reason -> nothing left, the truth is not matched -> 0.
    assert classification_accuracy("Other", "Other location", TREC_CLASSES) == 0.0
    # Matched {Other location, Other, City}; truth "Other" is not a *proper* substring of itself: 1/3.
    assert classification_accuracy("Other location, Other or City", "Other", TREC_CLASSES) == pytest.approx(1 / 3)
    assert classification_accuracy("Country", "City", TREC_CLASSES) == 0.0
    assert classification_accuracy("no idea", "City", TREC_CLASSES) == 0.0
    with pytest.raises(ValueError, match="all_classes"):
        classification_accuracy("City", "City", None)


def test_retrieval_accuracy():
    assert retrieval_accuracy("Paragraph 12", "Paragraph 12") == 1.0
    # numbers [12, 3, 12]: two of three are 12 -> 2/3
    assert retrieval_accuracy("Paragraph 12 or Paragraph 3, probably 12", "Paragraph 12") == pytest.approx(2 / 3)
    # "1" is not "12": whole numbers are compared, not prefixes
    assert retrieval_accuracy("Paragraph 1", "Paragraph 12") == 0.0
    assert retrieval_accuracy("I cannot tell.", "Paragraph 12") == 0.0
    with pytest.raises(ValueError, match="Paragraph N"):
        retrieval_accuracy("Paragraph 1", "the first one")


def test_count_accuracy():
    # numbers [4, 6, 4]: two of three equal 4 -> 2/3
    assert count_accuracy("There are 4 unique paragraphs out of 6, so 4.", "4") == pytest.approx(2 / 3)
    assert count_accuracy("17", "17") == 1.0
    assert count_accuracy("seventeen", "17") == 0.0


def test_code_edit_similarity():
    assert code_edit_similarity("    return a - b", "    return a - b") == 1.0
    # Comment lines (after indentation), blank lines and Markdown fences are skipped.
    assert code_edit_similarity("    # the difference\n    return a - b\n", "    return a - b") == 1.0
    assert code_edit_similarity("```python\n\n// note\nreturn a - b\n```", "return a - b") == 1.0
    # Only the first code line counts. Indel similarity = 2 * LCS / (len1 + len2):
    # "x = 1" vs "x = 2": LCS "x = " = 4 chars, lengths 5 + 5 -> 8/10 = 0.8
    assert code_edit_similarity("x = 1\ny = 2", "x = 2") == pytest.approx(0.8)
    assert code_edit_similarity("# only a comment\n\n", "x = 2") == 0.0


def test_score_prediction_takes_the_best_answer():
    # qa_f1("Paris", "London") = 0; qa_f1("Paris", "Paris, France"): P = 1/1, R = 1/2 -> F1 = 2/3
    assert score_prediction("hotpotqa", "Paris", ["London", "Paris, France"]) == pytest.approx(2 / 3)


def test_score_prediction_cuts_few_shot_replies_at_the_first_line():
    reply = "\nCity\nQuestion: Which country borders France?\nType: Country"
    # Cut to "City" -> 1.0; uncut it would match City and Country -> 0.5.
    assert score_prediction("trec", reply, ["City"], TREC_CLASSES) == 1.0
    assert classification_accuracy(reply, "City", TREC_CLASSES) == 0.5
    # passage_count is not cut: numbers [4, 6] -> 1/2
    assert score_prediction("passage_count", "4\n6", ["4"]) == 0.5


def test_score_prediction_unknown_dataset():
    with pytest.raises(ValueError, match=r"'dureader'.*Chinese.*supported: narrativeqa, qasper"):
        score_prediction("dureader", "x", ["x"])
    with pytest.raises(ValueError, match=r"unknown LongBench dataset 'squad'.*supported: .*repobench-p"):
        score_prediction("squad", "x", ["x"])


# --- templates ---


def test_templates_cover_every_metric_dataset():
    assert set(PROMPT_TEMPLATES) == set(DATASET_METRICS) == set(MAX_NEW_TOKENS)
    for name, template in PROMPT_TEMPLATES.items():
        assert template.count("{context}") == 1, name
        assert template.count("{input}") <= 1, name
        assert "{input}" not in template.split("{context}")[0], name
    assert PROMPT_TEMPLATES["lcc"] == "Please complete the code given below. \n{context}Next line of code:\n"
    assert PROMPT_TEMPLATES["passage_count"].endswith("The final answer is: ")
    assert (MAX_NEW_TOKENS["hotpotqa"], MAX_NEW_TOKENS["gov_report"], MAX_NEW_TOKENS["samsum"]) == (32, 512, 128)


# --- the loader on the fixture ---


def test_load_fixture():
    examples = load_longbench(FIXTURE)
    assert [e.dataset for e in examples] == ["hotpotqa", "trec", "passage_count", "passage_retrieval_en", "lcc"]
    first = examples[0]
    assert first == LongBenchExample(
        context="Passage 1:\nThe Blue Owl is a bakery in Lyon founded by Marie Duval.\n"
        "Passage 2:\nMarie Duval was born in Grenoble in 1961 and moved to Lyon in 1985.",
        input="In which city was the founder of the Blue Owl bakery born?",
        answers=["Grenoble"],
        all_classes=None,
        length=33,
        dataset="hotpotqa",
        id="hotpotqa-0001",
    )
    assert examples[1].all_classes == ["City", "Country", "Other location", "Distance, linear measure", "Date"]
    assert examples[4].answers == ["    return a - b"]


def test_load_limit_and_dataset_filter():
    assert [e.id for e in load_longbench(FIXTURE, limit=2)] == ["hotpotqa-0001", "trec-0001"]
    only = load_longbench(FIXTURE, dataset="passage_count")
    assert [e.id for e in only] == ["passage_count-0001"]
    assert load_longbench(FIXTURE, dataset="lcc", limit=1)[0].dataset == "lcc"
    assert load_longbench(FIXTURE, dataset="hotpotqa_e")[0].dataset == "hotpotqa"  # LongBench-E name
    with pytest.raises(ValueError, match=r"no qasper examples \(datasets in the file: hotpotqa, lcc"):
        load_longbench(FIXTURE, dataset="qasper")
    with pytest.raises(ValueError, match="limit"):
        load_longbench(FIXTURE, limit=0)


def test_fixture_scores_its_own_answers():
    for example in load_longbench(FIXTURE):
        assert score_example(example, example.answers[0]) == 1.0, example.dataset
    trec = load_longbench(FIXTURE, dataset="trec")[0]
    assert score_example(trec, "Distance, linear measure\nQuestion: Who?") == 1.0
    assert score_example(trec, "City") == 0.0


def test_split_prompt():
    example = load_longbench(FIXTURE, dataset="hotpotqa")[0]
    prompt = split_prompt(example)
    template = PROMPT_TEMPLATES["hotpotqa"]
    assert prompt.context == example.context
    assert prompt.instruction == template[: template.index("{context}")]
    assert prompt.instruction.startswith("Answer the question based on the given passages.")
    assert example.input in prompt.question
    assert prompt.question.endswith(f"Question: {example.input}\nAnswer:")
    for ex in load_longbench(FIXTURE):
        # The three parts make LongBench's prompt exactly.
        assert split_prompt(ex).text == PROMPT_TEMPLATES[ex.dataset].format(context=ex.context, input=ex.input)
    lcc = load_longbench(FIXTURE, dataset="lcc")[0]
    assert split_prompt(lcc).question == "Next line of code:\n"


def test_split_prompt_keeps_braces_in_the_input():
    example = LongBenchExample("ctx {x}", "What is {input}?", ["a"], None, 2, "qasper", "1")
    assert split_prompt(example).question.endswith("Question: What is {input}?\n\nAnswer:")


# --- bad files ---


def test_missing_field(tmp_path):
    path = _write(tmp_path, "missing.jsonl", [json.dumps(_record()), json.dumps(_record(context=...))])
    with pytest.raises(ValueError, match=r"missing\.jsonl, line 2: missing field 'context'"):
        load_longbench(path)
    path = _write(tmp_path, "noinput.jsonl", [json.dumps(_record(input=...))])
    with pytest.raises(ValueError, match=r"line 1: missing field 'input'"):
        load_longbench(path)


def test_bad_json(tmp_path):
    path = _write(tmp_path, "bad.jsonl", ['{"context": "a", "input": '])
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 1: invalid JSON"):
        load_longbench(path)
    path = _write(tmp_path, "list.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=r"line 1: expected a JSON object, got list"):
        load_longbench(path)


def test_answers_not_a_list_of_strings(tmp_path):
    for i, answers in enumerate(["France", [1, 2], []]):
        path = _write(tmp_path, f"answers{i}.jsonl", [json.dumps(_record(answers=answers))])
        with pytest.raises(ValueError, match=r"line 1: field 'answers' must be a non-empty list of strings"):
            load_longbench(path)


def test_ill_typed_fields(tmp_path):
    path = _write(tmp_path, "ctx.jsonl", [json.dumps(_record(context=3))])
    with pytest.raises(ValueError, match=r"field 'context' must be a string, got int"):
        load_longbench(path)
    path = _write(tmp_path, "len.jsonl", [json.dumps(_record(length="long"))])
    with pytest.raises(ValueError, match=r"field 'length' must be an integer"):
        load_longbench(path)
    path = _write(tmp_path, "trec.jsonl", [json.dumps(_record(dataset="trec"))])
    with pytest.raises(ValueError, match=r"a trec example needs 'all_classes'"):
        load_longbench(path)


def test_unknown_dataset(tmp_path):
    path = _write(tmp_path, "zh.jsonl", [json.dumps(_record(dataset="dureader"))])
    with pytest.raises(ValueError, match=r"line 1: unknown LongBench dataset 'dureader'.*Chinese.*supported: "):
        load_longbench(path)
    with pytest.raises(ValueError, match=r"unknown LongBench dataset 'nq'.*supported: narrativeqa"):
        load_longbench(FIXTURE, dataset="nq")
    path = _write(tmp_path, "nodataset.jsonl", [json.dumps(_record(dataset=...))])
    with pytest.raises(ValueError, match=r"line 1: missing field 'dataset'"):
        load_longbench(path)
    assert load_longbench(path, dataset="qasper")[0].dataset == "qasper"  # given dataset for unnamed lines


def test_empty_file(tmp_path):
    for name, lines in (("empty.jsonl", []), ("blank.jsonl", ["", "   "])):
        path = _write(tmp_path, name, lines)
        with pytest.raises(ValueError, match="empty file"):
            load_longbench(path)


def test_defaults_for_id_and_length(tmp_path):
    path = _write(tmp_path, "defaults.jsonl", ["", json.dumps(_record(_id=..., length=...))])
    [example] = load_longbench(path)
    assert example.id == "2"  # the line number, blank line 1 included
    assert example.length == 6  # words of "Passage 1:\nParis is in France.": Passage, 1:, Paris, is, in, France.


def test_a_repeated_id_is_refused_naming_both_lines(tmp_path):
    line = {"input": "q", "context": "c", "answers": ["a"], "dataset": "hotpotqa", "_id": "x1"}
    path = tmp_path / "dup.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (line, {**line, "_id": "x2"}, line)) + "\n")
    with pytest.raises(ValueError, match=r"line 3: '_id' 'x1' of dataset hotpotqa repeats line 1"):
        load_longbench(path)
    other = {**line, "dataset": "passage_count", "answers": ["3"]}
    path.write_text("\n".join(json.dumps(r) for r in (line, other)) + "\n")  # the same id in another dataset: fine
    assert [e.dataset for e in load_longbench(path)] == ["hotpotqa", "passage_count"]
