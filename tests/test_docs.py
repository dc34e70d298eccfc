"""The documentation (README.md and docs/**/*.md) says only what can be followed.

- Every relative link, and every image, points to a file or directory of the repository;
  a link to a section (``file.md#anchor``) names one of that file's headings.
- Every fenced ```python block compiles.
- Every ```python block marked runnable (``<!-- runnable -->`` on the line before its fence)
  runs, on the tiny random model, in a fresh namespace holding the names of ``SCOPE_NAMES``
  (docs/testing.md, "Code blocks in the documentation").

The blocks after ``<!-- research-api -->`` and ``<!-- custom-scorer -->`` in docs/api.md are
run, and their results checked, by tests/test_methods.py.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from urllib.parse import unquote

import pytest

import pcomp_jax
from test_pipeline import make_context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNABLE = "runnable"
# The names a runnable block finds bound before it runs.
SCOPE_NAMES = ("pcomp_jax", "model", "long_text", "other_text", "config")


def markdown_files() -> list[str]:
    """README.md and every markdown file under docs/, relative to the repository root."""
    found = sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
    return ["README.md"] + [os.path.relpath(p, ROOT) for p in found]


@dataclasses.dataclass
class Block:
    path: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    language: str
    marker: str | None  # the name in an HTML comment on the last non-blank line before the fence
    code: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)")
MARKER = re.compile(r"^\s*<!--\s*([\w-]+)\s*-->\s*$")


def parse(path: str) -> tuple[list[tuple[int, str]], list[Block]]:
    """The prose lines (number, text) outside fenced code, and the fenced blocks, of ``path``."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        lines = f.read().split("\n")
    prose, blocks = [], []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        fence, language = opening.group(1), opening.group(2).lower()
        indent = len(lines[i]) - len(lines[i].lstrip(" "))  # a fence inside a list item: its body is indented too
        previous = next((t for _, t in reversed(prose) if t.strip()), "")
        marker = MARKER.match(previous)
        start, i = i, i + 1
        body = []
        closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        while i < len(lines) and not closing.match(lines[i]):
            body.append(lines[i][min(indent, len(lines[i]) - len(lines[i].lstrip(" "))):])
            i += 1
        assert i < len(lines), f"{path}:{start + 1}: a code fence that is never closed"
        blocks.append(Block(path, start + 1, language, marker.group(1) if marker else None, "\n".join(body) + "\n"))
        i += 1
    return prose, blocks


def all_blocks(language: str = "python") -> list[Block]:
    return [b for path in markdown_files() for b in parse(path)[1] if b.language == language]


INLINE_CODE = re.compile(r"(`+).*?\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def links(path: str) -> list[tuple[int, str]]:
    """(line, target) of every inline link, image and link reference definition in ``path``'s prose."""
    found = []
    for number, text in parse(path)[0]:
        text = INLINE_CODE.sub("", text)
        found += [(number, m.group(1)) for m in LINK.finditer(text)]
        found += [(number, m.group(1)) for m in REFERENCE.finditer(text)]
    return found


def broken_links(path: str) -> list[str]:
    broken = []
    here = os.path.dirname(os.path.join(ROOT, path))
    for number, target in links(path):
        if not target or target.startswith("#") or SCHEME.match(target):  # anchors, http(s), mailto, ...
            continue
        relative = unquote(target.split("#", 1)[0].split("?", 1)[0])
        resolved = os.path.normpath(os.path.join(here, relative))
        if os.path.isabs(relative) or os.path.commonpath([resolved, ROOT]) != ROOT:
            broken.append(f"{path}:{number}: {target} (outside the repository)")
        elif not os.path.exists(resolved):
            broken.append(f"{path}:{number}: {target} (no such file or directory)")
    return broken


HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: str) -> set[str]:
    """The anchors of ``path``'s headings (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    for _, text in parse(path)[0]:
        heading = HEADING.match(text)
        if heading:
            name = slug(heading.group(1))
            found.add(name if name not in seen else f"{name}-{seen[name]}")
            seen[name] = seen.get(name, 0) + 1
    return found


def broken_anchors(path: str) -> list[str]:
    broken = []
    for number, target in links(path):
        if "#" not in target or SCHEME.match(target):
            continue
        relative, fragment = target.split("#", 1)
        destination = os.path.normpath(os.path.join(os.path.dirname(path), unquote(relative))) if relative else path
        if destination.endswith(".md") and os.path.exists(os.path.join(ROOT, destination)) \
                and unquote(fragment) not in anchors(destination):
            broken.append(f"{path}:{number}: {target} (no heading with that anchor in {destination})")
    return broken


def test_the_link_checker_sees_links_and_skips_code():
    assert LINK.findall("see [the API](docs/api.md#loading) and ![fig](figures/a.png \"title\")") == [
        "docs/api.md#loading", "figures/a.png"]
    assert LINK.findall("[`x`](a.md) [a [b] c](b.md)") == ["a.md", "b.md"]
    assert INLINE_CODE.sub("", "`[x](missing.md)` text") == " text"
    prose, blocks = parse("README.md")
    assert blocks and all(not FENCE.match(t) for _, t in prose)
    assert slug("Methods side by side, in the paper's layout") == "methods-side-by-side-in-the-papers-layout"
    assert slug("Memory preflight: `--dry-run`") == "memory-preflight---dry-run"


@pytest.mark.parametrize("path", markdown_files())
def test_relative_links_point_to_files_that_exist(path):
    broken = broken_links(path)
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


@pytest.mark.parametrize("path", markdown_files())
def test_links_to_a_section_name_one_of_its_headings(path):
    broken = broken_anchors(path)
    assert not broken, "links to sections that do not exist:\n" + "\n".join(broken)


def test_every_python_block_compiles():
    blocks = all_blocks()
    assert len(blocks) > 5
    for block in blocks:
        compile(block.code, block.where, "exec")  # a SyntaxError names the file and line


RUNNABLE_BLOCKS = [b for b in all_blocks() if b.marker == RUNNABLE]


def test_runnable_blocks_exist_in_the_readme_and_in_docs():
    assert any(b.path == "README.md" for b in RUNNABLE_BLOCKS)
    assert any(b.path.startswith("docs") for b in RUNNABLE_BLOCKS)


@pytest.fixture(scope="module")
def tiny_model(hf_checkpoints):
    return pcomp_jax.load_model(hf_checkpoints("llama_gqa_untied")[0])


def runnable_scope(model) -> dict:
    """What a runnable block finds bound: the package, the tiny random model (2 layers,
    window 256 tokens), two contexts of a few hundred tokens, and a config sized for them."""
    return {
        "__name__": "__docs__",
        "pcomp_jax": pcomp_jax,
        "model": model,
        "long_text": make_context(150, seed=21),
        "other_text": make_context(120, seed=22),
        "config": pcomp_jax.ParallelCompConfig(chunk_len=40, top_k_chunks=2, group_size=4),
    }


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE_BLOCKS, ids=[b.where for b in RUNNABLE_BLOCKS])
def test_runnable_block_runs(block, tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block may write files (Document.save)
    scope = runnable_scope(tiny_model)
    assert set(SCOPE_NAMES) <= set(scope)
    exec(compile(block.code, block.where, "exec"), scope)
