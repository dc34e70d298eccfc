"""Aggregating a method's prediction records into metrics, and the markdown summary."""

from __future__ import annotations

import numpy as np


def ruler_order(tasks) -> list[str]:
    """``tasks`` in RULER's order (``ruler.RULER_TASKS``), any others after them, sorted."""
    from ..ruler import RULER_TASKS

    return [t for t in RULER_TASKS if t in tasks] + sorted(t for t in tasks if t not in RULER_TASKS)


def ruler_metrics(records: list[dict]) -> dict:
    """RULER's scores of one method's RULER records, as RULER reports them: ``tasks`` ->
    task -> length -> ``score`` (the task score: mean x 100, ``ruler.task_score``), ``n``
    (samples) and ``nulls`` (empty predictions, an error counting as one); ``average`` ->
    length -> ``score`` (the mean of the task scores at that length) and ``tasks`` (how
    many). Tasks in RULER's order; empty without records."""
    from ..ruler import postprocess_prediction, task_score

    cells: dict = {}
    for r in records:
        cell = cells.setdefault(r["task"], {}).setdefault(str(r["length"]), {"scores": [], "nulls": 0})
        cell["scores"].append(r["score"])
        cell["nulls"] += not postprocess_prediction(r.get("prediction", ""))
    tasks = {t: {n: {"score": task_score(c["scores"]), "n": len(c["scores"]), "nulls": c["nulls"]}
                 for n, c in sorted(cells[t].items(), key=lambda kv: int(kv[0]))} for t in ruler_order(cells)}
    by_length: dict = {}
    for lengths in tasks.values():
        for n, cell in lengths.items():
            by_length.setdefault(n, []).append(cell["score"])
    average = {n: {"score": round(float(np.mean(v)), 2), "tasks": len(v)}
               for n, v in sorted(by_length.items(), key=lambda kv: int(kv[0]))}
    return {"tasks": tasks, "average": average} if tasks else {}


def method_metrics(records: list[dict]) -> dict:
    """Aggregates one method's records: synthetic accuracy by task, length and depth; LongBench
    mean score (x100) by dataset; RULER's scores of the generated samples (``ruler``) and of
    those read from RULER's files (``ruler_file``), by ``ruler_metrics``; perplexity (exp of
    the mean token NLL) by prefix length."""
    out: dict = {"synthetic": {}, "longbench": {}, "perplexity": {}, "errors": 0}
    for r in records:
        out["errors"] += "error" in r
    for r in (r for r in records if r["kind"] == "synthetic"):
        cell = out["synthetic"].setdefault(r["task"], {}).setdefault(str(r["length"]), {"scores": [], "by_depth": {}})
        cell["scores"].append(r["score"])
        cell["by_depth"].setdefault(f"{r['depth']:g}", []).append(r["score"])
    for lengths in out["synthetic"].values():
        for cell in lengths.values():
            cell["accuracy"] = float(np.mean(cell["scores"]))
            cell["n"] = len(cell["scores"])
            cell["by_depth"] = {d: float(np.mean(s)) for d, s in cell["by_depth"].items()}
            del cell["scores"]
    by_dataset: dict = {}
    for r in (r for r in records if r["kind"] == "longbench"):
        by_dataset.setdefault(r["dataset"], []).append(r["score"])
    out["longbench"] = {d: {"score": 100 * float(np.mean(s)), "n": len(s)} for d, s in by_dataset.items()}
    ruler = [r for r in records if r["kind"] == "ruler"]
    out["ruler"] = ruler_metrics([r for r in ruler if r.get("source") != "file"])
    out["ruler_file"] = ruler_metrics([r for r in ruler if r.get("source") == "file"])
    by_prefix: dict = {}
    for r in (r for r in records if r["kind"] == "perplexity" and "error" not in r):
        by_prefix.setdefault(str(r["prefix_len"]), []).append(r["mean_nll"])
    out["perplexity"] = {t: {"mean_nll": float(np.mean(v)), "perplexity": float(np.exp(np.mean(v))), "n": len(v)}
                         for t, v in sorted(by_prefix.items(), key=lambda kv: int(kv[0]))}
    return out


RULER_TITLES = {"ruler": "RULER", "ruler_file": "RULER, from RULER's data files"}


def ruler_markdown(metrics: dict[str, dict], section: str) -> list[str]:
    """Markdown lines of the RULER ``section`` ("ruler" or "ruler_file") of every method:
    the average over tasks by length, then one table per length of the task scores (x100)
    and their average, as RULER reports them; "-": not run."""
    present = {name: m.get(section) or {} for name, m in metrics.items()}
    if not any(present.values()):
        return []
    lengths = sorted({int(n) for m in present.values() for n in m.get("average", {})})
    cell = lambda entry: "-" if entry is None else f"{entry['score']:.2f}"
    title = RULER_TITLES[section]
    lines = [f"**{title}**, average over tasks (score x100)", "",
             "| method | " + " | ".join(f"{n} tokens" for n in lengths) + " |", "| --- |" + " --- |" * len(lengths)]
    for name, m in present.items():
        lines.append(f"| {name} | " + " | ".join(cell(m.get("average", {}).get(str(n))) for n in lengths) + " |")
    lines.append("")
    for n in lengths:
        tasks = ruler_order({t for m in present.values() for t, by_length in m.get("tasks", {}).items()
                             if str(n) in by_length})
        lines += [f"**{title}, {n} tokens** (score x100)", "",
                  "| method | " + " | ".join(tasks) + " | average |", "| --- |" + " --- |" * (len(tasks) + 1)]
        for name, m in present.items():
            scores = [cell(m.get("tasks", {}).get(t, {}).get(str(n))) for t in tasks]
            lines.append(f"| {name} | " + " | ".join(scores) + f" | {cell(m.get('average', {}).get(str(n)))} |")
        lines.append("")
    return lines


def summary_markdown(metrics: dict[str, dict]) -> str:
    """Markdown tables, methods as rows: accuracy per task and length, LongBench score per
    dataset, RULER's scores (``ruler_markdown``), perplexity per prefix length."""
    lines = []
    tasks = sorted({t for m in metrics.values() for t in m["synthetic"]})
    for task in tasks:
        lengths = sorted({int(n) for m in metrics.values() for n in m["synthetic"].get(task, {})})
        lines += [f"**{task}** (accuracy; right / runs)", "",
                  "| method | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
                  "| --- |" + " --- |" * len(lengths)]
        for name, m in metrics.items():
            cells = []
            for n in lengths:
                c = m["synthetic"].get(task, {}).get(str(n))
                cells.append("-" if c is None else f"{c['accuracy']:.2f} ({round(c['accuracy'] * c['n'])}/{c['n']})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    datasets = sorted({d for m in metrics.values() for d in m["longbench"]})
    if datasets:
        lines += ["**LongBench** (score x100)", "", "| method | " + " | ".join(datasets) + " |",
                  "| --- |" + " --- |" * len(datasets)]
        for name, m in metrics.items():
            cells = [f"{m['longbench'][d]['score']:.1f}" if d in m["longbench"] else "-" for d in datasets]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ruler_markdown(metrics, "ruler") + ruler_markdown(metrics, "ruler_file")
    prefixes = sorted({int(t) for m in metrics.values() for t in m["perplexity"]})
    if prefixes:
        lines += ["**Perplexity** of the continuation, by prefix length", "",
                  "| method | " + " | ".join(f"{t}" for t in prefixes) + " |", "| --- |" + " --- |" * len(prefixes)]
        for name, m in metrics.items():
            cells = [f"{m['perplexity'][str(t)]['perplexity']:.2f}" if str(t) in m["perplexity"] else "-"
                     for t in prefixes]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
