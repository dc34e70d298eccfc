"""Aggregating a method's prediction records into metrics, and the markdown summary."""

from __future__ import annotations

import numpy as np


def method_metrics(records: list[dict]) -> dict:
    """Aggregates one method's records: synthetic accuracy by task, length and depth; LongBench
    mean score (x100) by dataset; perplexity (exp of the mean token NLL) by prefix length."""
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
    by_prefix: dict = {}
    for r in (r for r in records if r["kind"] == "perplexity" and "error" not in r):
        by_prefix.setdefault(str(r["prefix_len"]), []).append(r["mean_nll"])
    out["perplexity"] = {t: {"mean_nll": float(np.mean(v)), "perplexity": float(np.exp(np.mean(v))), "n": len(v)}
                         for t, v in sorted(by_prefix.items(), key=lambda kv: int(kv[0]))}
    return out


def summary_markdown(metrics: dict[str, dict]) -> str:
    """Markdown tables, methods as rows: accuracy per task and length, LongBench score per
    dataset, perplexity per prefix length."""
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
