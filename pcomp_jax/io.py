"""Reading the text files that the command lines and the evaluation take as input.

``read_text`` reads a plain-text file (a needle haystack, a perplexity text);
``read_context_file`` reads a context and question from plain text or JSONL. Both raise
``PcompError`` naming the file and the problem.
"""

from __future__ import annotations

import json

from .errors import PcompError
from .tasks import Task


def read_text(path: str, purpose: str) -> str:
    """The text of ``path``; ``purpose`` (e.g. "the needle task's") names it in errors."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise PcompError(f"cannot read {purpose} text_file {path!r}: {err}") from err


def read_context_file(path: str, record: int, question: str | None) -> Task:
    """A ``Task`` (expected answer unknown) from a text or JSONL file; errors name the problem."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise PcompError(f"cannot read context file {path!r}: {err}") from err
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
        question = question or item.get("question") or item.get("input")
        expected = item.get("answer", "")
        text = item["context"]
    else:
        expected = ""
    if not question:
        raise PcompError("no question: pass --question (or a 'question' field in the JSONL record)")
    if isinstance(expected, list):
        expected = [str(a) for a in expected]
    return Task(context=text, question=question, answer=expected if isinstance(expected, list) else str(expected or ""))
