"""Reading the text files that the command lines and the evaluation take as input.

``read_text`` reads a plain-text file (a needle haystack, a perplexity text);
``read_context_file`` reads a context and question from plain text or JSONL. Both raise
``PcompError`` naming the file and the problem.
"""

from __future__ import annotations

import json
import os

from .errors import PcompError
from .tasks import Task

# The text read when a config's text_file is null: the opening of War and Peace (Project
# Gutenberg eBook #2600, public domain), about 52K SmolLM2 tokens, shipped with the package.
BUNDLED_TEXT = os.path.join(os.path.dirname(__file__), "data", "haystack.txt")


def read_text(path: str | None, purpose: str) -> str:
    """The text of ``path`` (None: ``BUNDLED_TEXT``); ``purpose`` (e.g. "the needle task's")
    names it in errors."""
    path = BUNDLED_TEXT if path is None else path
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise PcompError(f"cannot read {purpose} text_file {path!r}: {_reason(err)}; give a plain-text UTF-8 "
                         "file, or text_file: null for the bundled text") from None


def read_context_file(path: str, record: int, question: str | None) -> Task:
    """A ``Task`` (expected answer unknown) from a text or JSONL file; errors name the problem."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise PcompError(f"cannot read context file {path!r}: {_reason(err)}; give a plain-text UTF-8 file "
                         "or a .jsonl file") from None
    if not text.strip():
        raise PcompError(f"context file {path!r} is empty; give a file with the text to read")
    if path.endswith(".jsonl"):
        lines = [line for line in text.splitlines() if line.strip()]
        if not 0 <= record < len(lines):
            raise PcompError(f"{path!r} has {len(lines)} records; --record must be in [0, {len(lines)})")
        try:
            item = json.loads(lines[record])
        except json.JSONDecodeError as err:
            raise PcompError(f"{path!r} record {record} is not valid JSON: {err}") from err
        if not isinstance(item, dict) or not isinstance(item.get("context"), str):
            raise PcompError(f"{path!r} record {record} needs a string field 'context' (and 'question')")
        for field in ("question", "input"):
            if item.get(field) is not None and not isinstance(item[field], str):
                raise PcompError(f"{path!r} record {record}: {field!r} must be a string, got "
                                 f"{type(item[field]).__name__}")
        question = question or item.get("question") or item.get("input")
        expected = item.get("answer", "")
        if not (isinstance(expected, (str, int, float)) or (
                isinstance(expected, list) and all(isinstance(a, (str, int, float)) for a in expected))):
            raise PcompError(f"{path!r} record {record}: 'answer' must be a string, a number or a list of them, got "
                             f"{type(expected).__name__}")
        text = item["context"]
    else:
        if record != 0:
            raise PcompError(f"--record {record} applies to .jsonl files; {path!r} is one plain-text context")
        expected = ""
    if not question:
        raise PcompError("no question: pass --question (or a 'question' field in the JSONL record)")
    if isinstance(expected, list):
        expected = [str(a) for a in expected]
    return Task(context=text, question=question, answer=expected if isinstance(expected, list) else str(expected or ""))


def _reason(err: Exception) -> str:
    """One line for a file that could not be read (missing, a directory, not UTF-8, ...)."""
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err).splitlines()[0]


def check_readable(path: str | None, what: str) -> None:
    """Raises ``PcompError`` unless ``path`` (None: nothing to check) is a readable file."""
    if path is None:
        return
    if os.path.isdir(path):
        raise PcompError(f"{what} {path!r} is a directory; give a file")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise PcompError(f"cannot read {what} {path!r}: {_reason(err)}") from None


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (links and relative paths resolved)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_writable(path: str, what: str, inputs: dict | None = None) -> None:
    """Raises ``PcompError`` unless a file can be written at ``path`` (checked before a run,
    so that a finished run's result is never lost to a bad path) and it is none of the run's
    ``inputs`` (flag or field -> path; None entries are skipped), which it would replace.
    Leaves no file behind."""
    for name, source in (inputs or {}).items():
        if source is not None and same_file(path, source):
            raise PcompError(f"{what} {path!r} is the run's {name}; writing the result there would replace it, "
                             "so give another path")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise PcompError(f"{what} {path!r} is a directory; give a file path")
    if not os.path.isdir(folder):
        raise PcompError(f"{what} {path!r}: the directory {folder!r} does not exist; create it first")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        raise PcompError(f"cannot write {what} {path!r}: {_reason(err)}") from None
    if not existed:
        os.remove(path)
