"""Synthetic task generators: the answer is in the context, at the asked depth, and the
context has the asked length; the same seed gives the same task; bad input is refused."""

import json
import re

import pytest

import tiny
from pcomp_jax.tasks import FILLER_SENTENCES, PASSKEY_INTRO, Task, count_tokens, make_task

TEXT = " ".join(
    f"Sentence number {i} tells of the weather, the road and the people on it." for i in range(3000)
)


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def tokenizer(request):
    if request.param == "tiny":
        return tiny.tiny_hf_tokenizer()
    return request.getfixturevalue("default_tokenizer")  # the real default model's tokenizer


def answer_depth(tok, task) -> tuple[int, float]:
    """(context tokens, fraction of them before the first occurrence of the answer)."""
    n = count_tokens(tok, task.context)
    return n, count_tokens(tok, task.context[: task.context.index(task.answer)]) / n


TEXT_SENTENCE = r"Sentence number \d+ tells of the weather, the road and the people on it\."


def length_bound(tok, kind: str) -> float:
    """How close to the asked length a context is: half a sentence (the module's stated bound),
    of the filler or of ``TEXT`` for the needle."""
    sentences = [TEXT.split(". ")[1000] + "."] if kind == "needle" else FILLER_SENTENCES
    return max(count_tokens(tok, " " + s) for s in sentences) / 2 + 1


@pytest.mark.parametrize("kind", ["passkey", "number_string"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_needle_sits_between_whole_filler_sentences(tokenizer, kind, depth):
    # InfiniteBench's layout: never "... There and back The pass key is ...".
    task = make_task(kind, tokenizer, 1500, depth, seed=3)
    needle_start = task.context.index("The pass key is" if kind == "passkey" else "The sequence of digits is")
    needle_end = task.context.rindex(task.answer) + len(task.answer)
    needle_end = task.context.index(".", needle_end) + 1  # "... is the pass key."
    before, after = task.context[:needle_start], task.context[needle_end:]
    sentences = "|".join(re.escape(s) for s in FILLER_SENTENCES)
    assert re.fullmatch(rf"{re.escape(PASSKEY_INTRO)}(({sentences}) )*", before), before[-80:]
    assert re.fullmatch(rf"( ({sentences}))*", after), after[:80]
    assert all(s in FILLER_SENTENCES for s in re.split(r"(?<=\.) ", after.strip()) if s)


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("seed", [0, 7])
def test_book_needle_sits_between_whole_sentences(tokenizer, depth, seed):
    # The span starts after a sentence end and ends at one, so even at depth 0 and 1 the fact
    # is never glued to half a sentence ("... One could see The secret password ...").
    task = make_task("needle", tokenizer, 1500, depth, seed=seed, text=TEXT)
    fact_end = task.context.index(task.answer) + len(task.answer) + 1
    fact_start = task.context.rindex("The ", 0, fact_end)
    before, after = task.context[:fact_start], task.context[fact_end:]
    assert re.fullmatch(rf"({TEXT_SENTENCE} )*", before), before[-80:]
    assert re.fullmatch(rf"( {TEXT_SENTENCE})* ?", after), after[:80]


@pytest.mark.parametrize("kind", ["passkey", "number_string", "needle"])
@pytest.mark.parametrize("length", [600, 3000])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_hidden_item_at_depth_and_length(tokenizer, kind, length, depth):
    task = make_task(kind, tokenizer, length, depth, seed=5, text=TEXT)
    assert task.answer in task.context and task.is_correct(f"It is {task.answer}.")
    n, where = answer_depth(tokenizer, task)
    assert abs(n - length) <= length_bound(tokenizer, kind), (n, length)
    needle_share = 100 / length  # the hidden sentence's own tokens sit between "before" and "after"
    intro_share = count_tokens(tokenizer, PASSKEY_INTRO) / n if kind != "needle" else 0.0  # the intro comes first
    expected = max(depth * (1 - needle_share), intro_share)
    assert expected - 0.02 <= where <= expected + needle_share + 0.02, (where, depth)


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_needle_depth_in_hard_wrapped_text(tokenizer, depth):
    # Sentences end in ".\n", "!" or '?"' and never in ". ": the fact still lands at the asked depth.
    endings = [".\n", "! ", '?" ']
    wrapped = "".join(f"The {i}th carriage rolled past the gate in the cold morning air{endings[i % 3]}"
                      for i in range(2000))
    task = make_task("needle", tokenizer, 3000, depth, seed=4, text=wrapped)
    fact_start = task.context.rindex("The ", 0, task.context.index(task.answer))  # every fact starts "The "
    n, where = answer_depth(tokenizer, task)
    half_sentence = count_tokens(tokenizer, wrapped.split("\n")[1]) / 2 + 2  # the stated length bound
    assert abs(n - 3000) <= half_sentence and abs(where - depth) <= 0.03, (n, where, depth)
    assert task.context[fact_start - 1] in "\n " and task.context[fact_start - 2] in '.!?"', task.context[fact_start - 3:]


def test_infinitebench_scoring():
    passkey = make_task("passkey", tiny.tiny_hf_tokenizer(), 200, 0.5, seed=0)
    key = passkey.answer
    assert passkey.is_correct(f"The pass key is {key}. Remember it.")
    assert not passkey.is_correct(f"It is 1{key}.") and not passkey.is_correct(f"Maybe 123, or {key}")
    kv = Task("ctx", "q", "ab-12", scoring="word")
    assert kv.is_correct('The value is "ab-12".') and not kv.is_correct("ab-123") and not kv.is_correct("xab-12")
    assert Task("ctx", "q", "Zanzibar").is_correct("the cat was called zanzibar")
    with pytest.raises(ValueError, match="scoring='exact' is not allowed; choose one of: contains, first_integer, word"):
        Task("ctx", "q", "a", scoring="exact")


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_kv_retrieval_asks_a_key_at_depth(tokenizer, depth):
    length = 2000
    task = make_task("kv_retrieval", tokenizer, length, depth, seed=2)
    pairs = json.loads(task.context[task.context.index("{"):])
    key = task.question.split('"')[1]
    assert pairs[key] == task.answer
    keys = list(pairs)
    assert keys.index(key) == round(depth * (len(keys) - 1))
    per_pair = count_tokens(tokenizer, task.context) / len(keys)
    assert abs(count_tokens(tokenizer, task.context) - length) <= per_pair / 2 + 1


@pytest.mark.parametrize("kind", ["passkey", "number_string", "kv_retrieval", "needle"])
def test_same_seed_same_task_other_seed_other_answer(tokenizer, kind):
    a = make_task(kind, tokenizer, 500, 0.5, seed=1, text=TEXT)
    assert a == make_task(kind, tokenizer, 500, 0.5, seed=1, text=TEXT)
    answers = {make_task(kind, tokenizer, 500, 0.5, seed=s, text=TEXT).answer for s in range(4)}
    assert len(answers) > 1


def test_bad_task_inputs():
    tok = tiny.tiny_hf_tokenizer()
    with pytest.raises(ValueError, match="depth must be between 0 and 1"):
        make_task("passkey", tok, 500, 1.5)
    with pytest.raises(ValueError, match="length must be a positive"):
        make_task("number_string", tok, 0, 0.5)
    with pytest.raises(ValueError, match="unknown task 'math'.*passkey"):
        make_task("math", tok, 500, 0.5)
    with pytest.raises(ValueError, match="needs a text"):
        make_task("needle", tok, 500, 0.5)
    with pytest.raises(ValueError, match="fewer than the 5000 asked for"):
        make_task("needle", tok, 5000, 0.5, text="A short text. Only two sentences.")
