"""Which files of an output directory the evaluation runner may write: its own, never a user's.

The runner names every file it writes at the top of ``output_dir`` in a manifest,
``pcomp_eval_manifest.json``: ``{"files": [...], "summaries": {stem: [method names]}}``.
A sweep's summary files are ``<stem>.md``, ``<stem>.json`` and its figures
(``heatmap_<task><suffix>.png``, ``perplexity<suffix>.png``). The first sweep in a
directory gets the stem ``summary`` (suffix ``""``); a sweep over another set of methods
gets ``summary_<8 hex digits of its method names>`` (suffix ``_<same>``), so it never
replaces another sweep's summary; the same methods again reuse their stem. A file the
runner would write that exists but is not in the manifest is the user's: the run is
refused before anything runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from ..errors import ConfigError

MANIFEST = "pcomp_eval_manifest.json"


@dataclasses.dataclass(frozen=True)
class SummaryNames:
    """File names of one sweep's summary: ``stem`` (``summary``...) and the figures' ``suffix``."""

    stem: str
    suffix: str

    def heatmap(self, task: str) -> str:
        return f"heatmap_{task}{self.suffix}.png"

    @property
    def perplexity(self) -> str:
        return f"perplexity{self.suffix}.png"


def read_manifest(output_dir: str) -> dict:
    """The manifest of ``output_dir`` (empty when there is none yet); ``ConfigError`` when it
    exists but cannot be read."""
    path = os.path.join(output_dir, MANIFEST)
    if not os.path.exists(path):
        return legacy_manifest(output_dir)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if not (isinstance(manifest.get("files"), list) and isinstance(manifest.get("summaries"), dict)):
            raise ValueError("not a manifest")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as err:
        raise ConfigError(f"{path} is damaged ({err}); move it away, or choose another output_dir") from None
    return manifest


def legacy_manifest(output_dir: str) -> dict:
    """The manifest of a directory the runner used before it kept one: its method folders
    (those with the runner's ``settings.json``) and the summary files beside them are its
    own; a directory without such folders has none."""
    try:
        entries = sorted(os.listdir(output_dir))
    except OSError:
        return {"files": [], "summaries": {}}
    methods = [e for e in entries if os.path.isfile(os.path.join(output_dir, e, "settings.json"))]
    if not methods:
        return {"files": [], "summaries": {}}
    files = [e for e in entries if e in ("summary.md", "summary.json", "perplexity.png")
             or (e.startswith("heatmap_") and e.endswith(".png"))]
    return {"files": files, "summaries": {"summary": methods}}


def summary_names(output_dir: str, methods: list[str]) -> SummaryNames:
    """The summary's names for a sweep over ``methods`` in ``output_dir`` (module docstring)."""
    summaries = read_manifest(output_dir)["summaries"]
    for stem, names in summaries.items():
        if sorted(names) == sorted(methods):
            return SummaryNames(stem, stem[len("summary"):])
    if "summary" not in summaries:
        return SummaryNames("summary", "")
    tag = hashlib.sha256("\n".join(sorted(methods)).encode()).hexdigest()[:8]
    return SummaryNames(f"summary_{tag}", f"_{tag}")


def top_level_files(names: SummaryNames, tasks) -> list[str]:
    """The files a sweep writes at the top of its output directory."""
    return [f"{names.stem}.md", f"{names.stem}.json", names.perplexity, *(names.heatmap(t) for t in tasks)]


def check_outputs(output_dir: str, names: SummaryNames, tasks) -> None:
    """Refuses (``ConfigError``) when a file the sweep would write exists and the runner did
    not write it."""
    own = set(read_manifest(output_dir)["files"])
    for name in top_level_files(names, tasks):
        if name not in own and os.path.exists(os.path.join(output_dir, name)):
            raise ConfigError(f"{os.path.join(output_dir, name)} exists and was not written by the evaluation runner; "
                              "move it away or choose another output_dir (nothing of it is replaced)")


def record_outputs(output_dir: str, names: SummaryNames, methods: list[str], written: list[str]) -> None:
    """Adds ``written`` (file names at the top of ``output_dir``) and the sweep's summary to
    the manifest, written whole (a temporary file renamed)."""
    manifest = read_manifest(output_dir)
    manifest["files"] = sorted(set(manifest["files"]) | set(written))
    manifest["summaries"][names.stem] = sorted(methods)
    path = os.path.join(output_dir, MANIFEST)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    os.replace(path + ".tmp", path)
