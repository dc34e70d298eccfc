"""RULER (pcomp_jax.ruler): every generated task has RULER's prompt structure and reaches its
length by RULER's rule with the default model's tokenizer; samples are deterministic; the
scoring matches RULER's by hand; RULER's data files load back into the same parts and bad
ones are refused; and a RULER sweep runs through the evaluation runner."""

import collections
import dataclasses
import json
import os
import re
import string

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tiny
from pcomp_jax import ruler
from pcomp_jax.config import ConfigError, load_config
from pcomp_jax.errors import PcompError
from pcomp_jax.io import read_text
from pcomp_jax.tasks import count_tokens

DATA = os.path.join(os.path.dirname(__file__), "data", "ruler")
QA_FILE = os.path.join(DATA, "4096", "data", "qa_2", "validation.jsonl")
LENGTHS = (1024, 2048)
NEEDLE_LINE = re.compile(r"One of the special magic (numbers|words|uuids) for (.+?) is: (.+?)\.")


@pytest.fixture(scope="module")
def tokenizer(default_tokenizer):
    """The default model's tokenizer (SmolLM2-135M-Instruct), without loading its weights."""
    return default_tokenizer


@pytest.fixture(scope="module")
def essay():
    return read_text(None, "the RULER essay haystack's")


@pytest.fixture(scope="module")
def samples(tokenizer, essay):
    """Sample 0 of every generated task at both lengths, made once."""
    return {(name, length): ruler.generate_sample(name, tokenizer, length, 0, text=essay)
            for name in ruler.GENERATED_TASKS for length in LENGTHS}


def test_the_task_table_is_rulers_yaml():
    assert ruler.GENERATED_TASKS == ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                                     "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery",
                                     "vt", "cwe", "fwe")
    niah = {name: task.params for name, task in ruler.RULER_TASKS.items() if task.family == "niah"}
    assert [(p.haystack, p.key_type, p.value_type) for p in niah.values()] == [
        ("noise", "words", "numbers"), ("essay", "words", "numbers"), ("essay", "words", "uuids"),
        ("essay", "words", "numbers"), ("needle", "words", "numbers"), ("needle", "uuids", "uuids"),
        ("essay", "words", "numbers"), ("essay", "words", "numbers")]
    assert [(p.num_keys, p.num_values, p.num_queries) for p in niah.values()] == [
        (1, 1, 1), (1, 1, 1), (1, 1, 1), (4, 1, 1), (1, 1, 1), (1, 1, 1), (1, 4, 1), (1, 1, 4)]
    assert ruler.RULER_TASKS["vt"].params == ruler.VariableTrackingParams(num_chains=1, num_hops=4)
    assert ruler.RULER_TASKS["cwe"].params == ruler.CommonWordsParams(freq_cw=30, freq_ucw=3, num_cw=10)
    assert ruler.RULER_TASKS["fwe"].params.alpha == 2.0
    assert {n: t.text.tokens_to_generate for n, t in ruler.RULER_TASKS.items() if n in ("vt", "cwe", "fwe", "qa_1")} \
        == {"vt": 30, "cwe": 120, "fwe": 50, "qa_1": 32}
    assert ruler.DEPTHS[:4] == (0, 3, 5, 8) and len(ruler.DEPTHS) == 40 and ruler.DEPTHS[-1] == 100


def test_task_text_is_rulers_verbatim():
    niah = ruler.TASK_TEXTS["niah"]
    assert niah.template + niah.answer_prefix == (
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will "
        "quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} "
        "for {query} mentioned in the provided text? The special magic {type_needle_v} for {query} mentioned in the "
        "provided text are")
    assert ruler.singular_text(niah) == (  # "are all" before "are": "What is the", never "What is all the"
        "A special magic {type_needle_v} is hidden within the following text. Make sure to memorize it. I will quiz "
        "you about the {type_needle_v} afterwards.\n{context}\nWhat is the special magic {type_needle_v} for {query} "
        "mentioned in the provided text?", " The special magic {type_needle_v} for {query} mentioned in the provided "
        "text is")
    assert ruler.TASK_TEXTS["variable_tracking"].answer_prefix == (
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned "
        "the value {query}, they are: ")
    assert "Please ignore the dots '....'. What are" in ruler.TASK_TEXTS["freq_words_extraction"].template
    assert ruler.NEEDLE == "One of the special magic {type_needle_v} for {key} is: {value}."


def unit_slack(tokenizer, sample) -> int:
    """The tokens of one unit of the sample's haystack (a line of a line haystack, else a
    word or list entry): one more unit would not have fitted."""
    task = ruler.RULER_TASKS[sample.task]
    if task.family == "variable_tracking" or getattr(task.params, "haystack", "") in ("noise", "needle"):
        return max(count_tokens(tokenizer, line + "\n") for line in sample.context.split("\n")) + 2
    return 24


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("name", ruler.GENERATED_TASKS)
def test_sample_has_rulers_structure_and_length(tokenizer, samples, name, length):
    sample = samples[(name, length)]
    task = ruler.RULER_TASKS[name]
    # RULER's rule: input (template and answer prefix included) + tokens_to_generate <= length,
    # with the most haystack that fits, so within one haystack unit of it.
    assert sample.input_tokens == count_tokens(tokenizer, sample.input + sample.answer_prefix)
    assert sample.tokens_to_generate == task.text.tokens_to_generate
    assert length - unit_slack(tokenizer, sample) < sample.length <= length
    assert sample.input == sample.head + sample.context + sample.question
    template, prefix = task.text.template, task.text.answer_prefix
    if task.family == "niah":
        check_niah(sample, task.params)
    elif task.family == "variable_tracking":
        check_variable_tracking(tokenizer, sample, template, prefix)
    elif task.family == "common_words_extraction":
        check_common_words(sample, template, prefix, length)
    else:
        check_freq_words(sample, template, prefix, length)


def check_niah(sample, p):
    single = p.num_values * p.num_queries == 1
    value = p.value_type[:-1] if single else p.value_type
    text = ruler.TASK_TEXTS["niah"]
    template, prefix = ruler.singular_text(text) if single else (text.template, text.answer_prefix)
    head, question = template.split("{context}")
    assert sample.head == head.format(type_needle_v=value)
    assert sample.head.startswith(f"A special magic {value} is" if single else f"Some special magic {value} are")
    asked = re.fullmatch(re.escape(question.format(type_needle_v=value, query="\x00")).replace("\x00", "(.+)"),
                         sample.question).group(1)
    assert sample.answer_prefix == prefix.format(type_needle_v=value, query=asked)
    keys = asked.replace(", and ", ", ").split(", ")
    assert len(keys) == p.num_queries and len(sample.outputs) == p.num_queries * p.num_values
    hidden = list(NEEDLE_LINE.finditer(sample.context))
    assert {m.group(1) for m in hidden} == {p.value_type}  # the needle says "numbers" even when one is asked for
    assert sorted(m.group(3) for m in hidden if m.group(2) in keys) == sorted(sample.outputs)
    assert all(sample.context.count(answer) == 1 for answer in sample.outputs)
    kinds = {"numbers": r"\d{7}", "words": r"[\w -]+-[\w -]+",
             "uuids": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"}
    for m in hidden:
        assert re.fullmatch(kinds[p.key_type], m.group(2)) and re.fullmatch(kinds[p.value_type], m.group(3))
    needles = max(p.num_keys, p.num_queries) * p.num_values  # RULER hides a key for every query at least
    if p.haystack == "essay":
        assert len(hidden) == needles  # the essay has no needle of its own
        for m in hidden:  # between whole sentences
            before, after = sample.context[:m.start()], sample.context[m.end():]
            assert before.strip() == "" or re.search(r"[.!?][\"'\u2019\u201d)\]]* $", before), before[-40:]
            assert after.strip() == "" or re.match(r" [^a-z]", after), after[:40]
    else:
        lines = sample.context.split("\n")
        others = [line for line in lines if not NEEDLE_LINE.fullmatch(line)]
        assert others == ([ruler.NOISE] * len(others) if p.haystack == "noise" else [])
        assert len(lines) - len(others) == (needles if p.haystack == "noise" else len(lines))


def chain_lines(names, value) -> list[str]:
    """RULER's chain: the value, then each name assigned the one before (a trailing space)."""
    return [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(len(names) - 1)]


def check_variable_tracking(tokenizer, sample, template, prefix):
    head, question = template.split("{context}")
    value = re.search(r"the value (\d{5}) in the text above\.$", sample.question).group(1)
    assert sample.question == question.format(query=value)
    assert sample.answer_prefix == prefix.format(num_v=5, query=value)
    assert len(sample.outputs) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in sample.outputs)
    assert [line for line in sample.context.split("\n") if line != ruler.NOISE] == chain_lines(sample.outputs, value)
    # RULER's one-shot example: the whole template with a chain of 3-letter names, its answer, a line break.
    assert sample.head.endswith("\n" + head)
    example = sample.head[: -len(head) - 1]
    example_value = re.search(r"assigned the value (\d{5}) in the text above\.", example).group(1)
    example_names = example.split()[-5:]
    answer = " " + " ".join(example_names) + "\n"
    tail = question.format(query=example_value) + prefix.format(num_v=5, query=example_value) + answer
    assert example.startswith(head) and example.endswith(tail) and example_value != value
    lines = example[len(head):-len(tail)].split("\n")
    assert [line for line in lines if line != ruler.NOISE] == chain_lines(example_names, example_value)
    assert all(len(n) == 3 for n in example_names)
    assert count_tokens(tokenizer, example[: -len(answer)]) <= ruler.VT_EXAMPLE_TOKENS


def check_common_words(sample, template, prefix, length):
    head, question = template.split("{context}")
    assert sample.question == question and sample.answer_prefix == prefix
    words = re.split(r" ?\d+\. ", " " + sample.context)[1:]
    assert sample.context == ruler.numbered(words)
    counts = collections.Counter(words)
    common, other = (6, 1) if length < 4096 else (30, 3)  # RULER's counts below 4096 tokens
    assert len(sample.outputs) == 10 and {counts[w] for w in sample.outputs} == {common}
    assert {c for w, c in counts.items() if w not in sample.outputs} == {other}
    example = sample.head[: -len(head) - 1]  # one worked example, a line break, the template's head
    assert example.startswith(head) and sample.head.endswith("\n" + head)
    listed, answer = example[len(head):].split(question + prefix + " ")
    example_counts = collections.Counter(re.split(r" ?\d+\. ", " " + listed)[1:])
    answer_words = re.split(r" ?\d+\. ", " " + answer)[1:]
    assert len(example_counts) == 20 and len(answer_words) == 10 and {example_counts[w] for w in answer_words} == {3}


def check_freq_words(sample, template, prefix, length):
    head, question = template.split("{context}")
    assert (sample.head, sample.question, sample.answer_prefix) == (head, question, prefix)
    words = sample.context.split(" ")
    assert all(re.fullmatch(r"[a-z]{6}|\.\.\.", w) for w in words)
    counts = collections.Counter(words)
    ranked = sorted(counts.values(), reverse=True)
    zeta = np.pi ** 2 / 6
    vocab_size = (length - 50) // 50
    laws = [sorted((int(c) for c in ruler.zipf_counts(n, vocab_size, 2.0) if c), reverse=True)
            for n in range(int(counts["..."] * zeta), int((counts["..."] + 1) * zeta) + 1)]
    assert ranked in laws  # the word of rank k floor(N k^-2 / zeta(2)) times, for one N
    assert counts.most_common(1)[0][0] == "..." and [counts[w] for w in sample.outputs] == ranked[1:4]
    assert ranked[3] > ranked[4]  # the third answer is more frequent than any word after it


@pytest.mark.parametrize("name", ["niah_multikey_1", "niah_multikey_2", "vt", "cwe", "fwe"])
def test_samples_are_deterministic_per_seed_and_index(tokenizer, essay, samples, name):
    again = ruler.generate_sample(name, tokenizer, 1024, 0, text=essay)
    assert again == samples[(name, 1024)]
    assert ruler.generate_sample(name, tokenizer, 1024, 1, text=essay).outputs != again.outputs
    assert ruler.generate_sample(name, tokenizer, 1024, 0, seed=7, text=essay).outputs != again.outputs


def test_tasks_draw_apart_and_the_prompt_encodes_to_rulers_string(tokenizer, samples):
    # the same seed and index give other keys and values in another task
    assert samples[("niah_single_1", 1024)].outputs != samples[("niah_single_2", 1024)].outputs
    for name in ("niah_single_2", "vt", "cwe"):
        sample = samples[(name, 1024)]
        parts = sample.prompt_parts(tokenizer, chat=False)
        ids = np.concatenate([parts.prefix, parts.context, parts.question])
        assert tokenizer.decode(ids) == sample.input + sample.answer_prefix  # RULER's base prompt, exactly
        chat = sample.prompt_parts(tokenizer, chat=True)
        assert tokenizer.decode(chat.question).endswith("assistant\n" + sample.answer_prefix)


def test_generator_refusals(tokenizer):
    with pytest.raises(PcompError, match="unknown RULER task 'niah'; choose one of: niah_single_1"):
        ruler.generate_sample("niah", tokenizer, 1024)
    with pytest.raises(PcompError, match="qa_1 asks questions of squad documents, which are not available offline"):
        ruler.generate_sample("qa_1", tokenizer, 1024)
    with pytest.raises(PcompError, match="length 150 is too short for RULER task niah_single_1.*128 tokens"):
        ruler.generate_sample("niah_single_1", tokenizer, 150)
    with pytest.raises(PcompError, match="hides its needles in essay text; give a text"):
        ruler.generate_sample("niah_single_2", tokenizer, 1024)
    with pytest.raises(PcompError, match="seed must be a whole number >= 0, got -1"):
        ruler.generate_sample("vt", tokenizer, 1024, seed=-1)


def test_sentences_are_cut_at_sentence_ends_only():
    text = ('Mr. Smith met Dr. J. Watson in St. Petersburg. "Why?" he asked. "Because!" It rained... '
            "Then it stopped. e.g. this stays. The end")
    assert ruler.split_sentences(text) == [
        'Mr. Smith met Dr. J. Watson in St. Petersburg.', '"Why?" he asked.', '"Because!"',
        "It rained...", "Then it stopped. e.g. this stays.", "The end"]
    words = ruler.essay_words("One.  Two\nthree. Four.")
    assert words == ["One.", "Two", "three.", "Four."]
    context = ruler.essay_with_needles(words, 4, ["N1.", "N2."], [0, 100])
    assert context == " N1. One. Two three. Four. N2. "  # RULER's join: empty spans at depths 0 and 100


ASCII = st.text(alphabet=string.ascii_letters + " -", max_size=12)


@given(ASCII, st.lists(ASCII, min_size=1, max_size=5))
@settings(max_examples=100, deadline=None)
def test_string_match_ignores_case(prediction, references):
    upper = [r.upper() for r in references]
    assert ruler.string_match_all(prediction.lower(), upper) == ruler.string_match_all(prediction.upper(), references)
    assert ruler.string_match_part(prediction.lower(), upper) == ruler.string_match_part(prediction.upper(), references)


@given(st.lists(st.sampled_from(["Dr.", "word", "Word.", "it!", '"Yes?"', "x.", "A.", "(b)", "St."]), max_size=30))
@settings(max_examples=150, deadline=None)
def test_sentences_join_back_into_the_text(words):
    text = " ".join(words).strip()
    sentences = ruler.split_sentences(text)
    assert " ".join(sentences) == text and all(s.strip() == s and s for s in sentences)


@given(st.lists(st.integers(0, 40), min_size=1, max_size=60), st.integers(0, 600), st.integers(0, 5))
@settings(max_examples=200, deadline=None)
def test_largest_fitting_finds_the_most_that_fits(steps, budget, smallest):
    totals = np.cumsum(steps)  # a count that grows (or stays) with n
    largest = len(totals) - 1
    smallest = min(smallest, largest)
    found = ruler.largest_fitting(lambda n: int(totals[n]), budget, smallest, largest)
    fits = [n for n in range(smallest, largest + 1) if totals[n] <= budget]
    assert found == (max(fits) if fits and totals[smallest] <= budget else None)


def test_scores_by_hand():
    assert ruler.postprocess_prediction("  1234\x00567\t89 \n") == "1234\n567\n89"
    assert ruler.string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "7654321", "1111111"]) == 2 / 3
    assert ruler.string_match_all("ALPHA-BETA", ["alpha-beta"]) == 1.0
    assert ruler.string_match_part("It is in Paris.", ["paris", "Lyon"]) == 1.0
    assert ruler.string_match_part("It is in Rome.", ["paris", "Lyon"]) == 0.0
    assert ruler.score_prediction("niah_multivalue", " 1 2\n3", ["1", "3", "4", "5"]) == 0.5
    assert ruler.score_prediction("qa_2", "Answer: the Angara", ["Angara", "Yenisei"]) == 1.0
    assert ruler.task_score([1.0, 0.5, 0.0]) == 50.0 and ruler.task_score([1 / 3]) == 33.33
    with pytest.raises(PcompError, match="at least one reference"):
        ruler.string_match_all("x", [])


@given(st.text(max_size=40), st.lists(st.text(min_size=0, max_size=6), min_size=1, max_size=6))
@settings(max_examples=300, deadline=None)
def test_string_match_properties(prediction, references):
    """Scores lie in [0, 1], the part score never below the all score; a prediction holding
    every reference scores 1; post-processing twice changes nothing."""
    every, some = ruler.string_match_all(prediction, references), ruler.string_match_part(prediction, references)
    assert 0.0 <= every <= some <= 1.0
    assert (every == 1.0) == all(r.lower() in prediction.lower() for r in references)
    assert ruler.string_match_all(prediction + " " + " ".join(references), references) == 1.0
    assert ruler.postprocess_prediction(ruler.postprocess_prediction(prediction)) == \
        ruler.postprocess_prediction(prediction)


def test_data_files_load_back_into_the_same_parts(tmp_path, samples):
    written = {}
    for name in ruler.GENERATED_TASKS:
        made = [samples[(name, 1024)]]
        path = tmp_path / "1024" / "data" / name / "validation.jsonl"
        ruler.write_ruler_file(str(path), made)
        written[name] = made
    files = ruler.find_ruler_files(str(tmp_path))
    assert [os.path.basename(os.path.dirname(f)) for f in files] == sorted(ruler.GENERATED_TASKS)
    for path in files:
        loaded = ruler.load_ruler_file(path)
        assert loaded == written[loaded[0].task]  # task from the folder, length from <length>/data/
    line = json.loads(open(files[0]).readline())
    assert set(line) == {"index", "input", "outputs", "length", "length_w_model_temp", "answer_prefix"}
    # a prediction file of RULER's call_api.py: <task>.jsonl, the answer prefix still in the input
    sample = samples[("vt", 1024)]
    pred = tmp_path / "pred" / "vt.jsonl"
    pred.parent.mkdir()
    pred.write_text(json.dumps({"index": 0, "input": sample.input + sample.answer_prefix, "pred": "",
                                "outputs": list(sample.outputs), "length": sample.length}) + "\n")
    (again,) = ruler.load_ruler_file(str(pred), length=1024)
    assert again == sample


def test_rulers_qa_files_load_and_score_by_part():
    loaded = ruler.load_ruler_file(QA_FILE)
    assert [s.task for s in loaded] == ["qa_2", "qa_2"] and {s.target_length for s in loaded} == {4096}
    first = loaded[0]
    assert first.head.endswith("The following are given documents.\n\n") and first.context.startswith("Document 1:")
    assert first.question.endswith("Question: In which city was the wife of Pierre Curie born?")
    assert first.answer_prefix == " Answer:" and first.tokens_to_generate == 32 and first.input_tokens == 108
    assert loaded[1].score("It is the angara.") == 1.0 and loaded[1].score("Yenisei") == 0.0
    assert len(ruler.load_ruler_file(QA_FILE, limit=1)) == 1


def test_bad_data_files_are_refused_naming_file_and_line(tmp_path, samples):
    good = samples[("niah_single_1", 1024)].to_record()
    folder = tmp_path / "niah_single_1"
    folder.mkdir()
    path = folder / "validation.jsonl"
    cases = [
        ("{not json\n", "line 1: invalid JSON"),
        (json.dumps({**good, "outputs": "5"}) + "\n", "line 1: field 'outputs' must be list"),
        ("\n" + json.dumps({k: v for k, v in good.items() if k != "input"}) + "\n", "line 2: missing field 'input'"),
        (json.dumps({**good, "outputs": []}) + "\n", "non-empty list of strings"),
        (json.dumps({**good, "input": "Tell me.\n" + good["input"]}) + "\n",
         "line 1: the input and answer_prefix do not match the niah_single_1 template of RULER's 'base' model"),
        (json.dumps({**good, "answer_prefix": " Answer:"}) + "\n", "do not match the niah_single_1 template"),
        ("\n\n", "empty file, no RULER samples"),
    ]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(ruler.RulerFormatError, match=re.escape(message)) as err:
            ruler.load_ruler_file(str(path))
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    other = tmp_path / "data.jsonl"
    other.write_text(json.dumps(good) + "\n")
    with pytest.raises(ruler.RulerFormatError, match="cannot tell its RULER task: neither its folder nor its name"):
        ruler.load_ruler_file(str(other))
    with pytest.raises(ruler.RulerFormatError, match="do not match the cwe template"):
        ruler.load_ruler_file(str(other), task="cwe")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PcompError, match="no RULER data files under .*expected <task>/validation.jsonl"):
        ruler.find_ruler_files(str(tmp_path / "empty"))
    with pytest.raises(PcompError, match="does not exist"):
        ruler.find_ruler_files(str(tmp_path / "missing"))
    assert ruler.load_ruler_file(str(other), task="niah_single_1")[0].target_length == good["length"]


def test_eval_config_checks_the_ruler_section(tmp_path):
    from pcomp_jax.eval import EvalConfig, RulerConfig

    config = load_config(None, ["ruler.tasks=[vt, cwe]", "ruler.lengths=[4096]", "ruler.samples=3"], cls=EvalConfig)
    assert config.ruler == RulerConfig(tasks=("vt", "cwe"), lengths=(4096,), samples=3)
    per_length = load_config(None, ["ruler.tasks=[vt]", "ruler.lengths=[4096, 8192]", "ruler.samples=[10, 5]"],
                             cls=EvalConfig)
    assert (per_length.ruler.samples_at(4096), per_length.ruler.samples_at(8192)) == (10, 5)
    from pcomp_jax.eval.items import ruler_items

    assert [item.id for item in ruler_items(per_length)][9:11] == ["ruler/vt/L4096/s9", "ruler/vt/L8192/s0"]
    assert len(ruler_items(per_length)) == 15
    for overrides, message in [
        (["ruler.tasks=[vt]", "ruler.lengths=[4096, 8192]", "ruler.samples=[10]"],
         "ruler.samples gives 1 counts for 2 lengths: give one count for every length, or one per length"),
        (["ruler.tasks=[vt]", "ruler.lengths=[4096]", "ruler.samples=[0]"], "ruler.samples must be >= 1, got 0"),
        (["ruler.tasks=[nope]", "ruler.lengths=[4096]"], "ruler.tasks: unknown task 'nope'; choose from: niah_"),
        (["ruler.tasks=[qa_1]", "ruler.lengths=[4096]"], "qa_1 and qa_2 need SQuAD/HotpotQA data"),
        (["ruler.tasks=[vt]"], "ruler.tasks and ruler.lengths go together"),
        (["ruler.tasks=[vt]", "ruler.lengths=[32]"], "ruler.lengths must be at least 64"),
        (["ruler.tasks=[vt, vt]", "ruler.lengths=[4096]"], "ruler.tasks has repeated values"),
        (["ruler.samples=0"], "ruler.samples must be >= 1"),
        (["ruler.data_limit=0"], "ruler.data_limit must be >= 1"),
        (["ruler.seeds=[1]"], "unknown config field 'ruler.seeds'; allowed fields: tasks, lengths, samples"),
        (["ruler.data=file.jsonl"], "config field 'ruler.data' must be a list of str"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, overrides, cls=EvalConfig)


def test_ruler_metrics_and_summary_by_hand():
    from pcomp_jax.eval import method_metrics, summary_markdown

    records = [
        {"kind": "ruler", "source": "generated", "task": "vt", "length": 4096, "score": 1.0, "prediction": "A B"},
        {"kind": "ruler", "source": "generated", "task": "vt", "length": 4096, "score": 0.4, "prediction": " \n"},
        {"kind": "ruler", "source": "generated", "task": "niah_single_1", "length": 4096, "score": 0.0,
         "error": "InputTooLongError: x"},
        {"kind": "ruler", "source": "generated", "task": "niah_single_1", "length": 8192, "score": 1.0,
         "prediction": "7"},
        {"kind": "ruler", "source": "file", "task": "qa_2", "length": 4096, "score": 1.0, "prediction": "x"},
    ]
    m = method_metrics(records)
    assert m["ruler"]["tasks"] == {"niah_single_1": {"4096": {"score": 0.0, "n": 1, "nulls": 1},
                                                     "8192": {"score": 100.0, "n": 1, "nulls": 0}},
                                   "vt": {"4096": {"score": 70.0, "n": 2, "nulls": 1}}}
    assert m["ruler"]["average"] == {"4096": {"score": 35.0, "tasks": 2}, "8192": {"score": 100.0, "tasks": 1}}
    assert m["ruler_file"]["average"] == {"4096": {"score": 100.0, "tasks": 1}} and m["errors"] == 1
    table = summary_markdown({"a": m, "b": method_metrics(records[:2])})
    assert "| a | 35.00 | 100.00 |" in table and "| b | 70.00 | - |" in table
    assert "| method | niah_single_1 | vt | average |" in table and "| a | 0.00 | 70.00 | 35.00 |" in table
    assert "| b | - | 70.00 | 70.00 |" in table and "RULER, from RULER's data files" in table


@pytest.fixture(scope="module")
def long_window_model(tmp_path_factory):
    """The tiny random model with a 4096-token window (RULER's templates alone are longer
    than its 256 positions in the tiny tokenizer's near byte-level tokens)."""
    import pcomp_jax

    path = str(tmp_path_factory.mktemp("tiny_ruler"))
    tiny.make_hf_checkpoint(path, "llama_gqa_untied")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config, "max_position_embeddings": 4096}, f)
    return pcomp_jax.load_model(path)


@pytest.mark.slow  # a whole sweep through the runner: the full suite, not the fast tier
def test_a_ruler_sweep_runs_through_the_runner(long_window_model, tmp_path, monkeypatch):
    from pcomp_jax import ParallelCompConfig
    from pcomp_jax.eval import EvalConfig, MethodSpec, Runner, evaluate

    tokenizer = long_window_model.tokenizer
    data = tmp_path / "1024" / "data" / "niah_multikey_2" / "validation.jsonl"
    ruler.write_ruler_file(str(data), [ruler.generate_sample("niah_multikey_2", tokenizer, 1024, 0)])
    config = EvalConfig(output_dir=str(tmp_path / "out"), tasks=(), max_new_tokens=3,
                        pipeline=ParallelCompConfig(chunk_len=256, obs_window=4, chat=False),
                        methods=(MethodSpec.of("pc", method="parallelcomp", capacity=32),),
                        ruler=dataclasses.replace(EvalConfig().ruler, tasks=("niah_single_1", "fwe"), lengths=(1024,),
                                                  samples=1, data=(str(tmp_path / "1024"),)))
    metrics = evaluate(config, long_window_model, progress=False)
    out = config.output_dir
    records = [json.loads(line) for line in open(f"{out}/pc/predictions.jsonl")]
    assert sorted(r["id"].split("/")[1] for r in records) == ["fwe", "niah_multikey_2", "niah_single_1"]
    for r in records:
        assert r["kind"] == "ruler" and "error" not in r and 0.0 <= r["score"] <= 1.0
        assert r["length"] == 1024 and r["outputs"] and isinstance(r["prediction"], str)
    assert {r["source"] for r in records} == {"generated", "file"}
    assert set(metrics["pc"]["ruler"]["tasks"]) == {"niah_single_1", "fwe"}
    assert metrics["pc"]["ruler_file"]["average"]["1024"]["tasks"] == 1
    summary = open(f"{out}/summary.md").read()
    assert "**RULER**, average over tasks" in summary and "| method | niah_single_1 | fwe | average |" in summary
    assert os.path.getsize(f"{out}/heatmap_ruler.png") > 0 and os.path.getsize(f"{out}/heatmap_ruler_file.png") > 0
    settings_ = json.load(open(f"{out}/pc/settings.json"))
    assert settings_["ruler_seed"] == 42 and "ruler_text_sha256" not in settings_  # no essay task asked
    calls = []
    monkeypatch.setattr(Runner, "run_batch", lambda self, items, p: calls.append(items) or [])
    evaluate(config, long_window_model, progress=False)  # resumes: nothing runs again
    assert calls == []
