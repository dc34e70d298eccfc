"""Attention analyzer: how the last query tokens spread their attention, by layer.

    python -m pcomp_jax.analyze --config configs/demo.yaml --length 4096 --output-dir runs/analyze
    python -m pcomp_jax.analyze --context-file book.txt --question "Who is Ahab?" --layers 0-7 --last-queries 8

Runs the input through parallel chunks (the config's ``chunk_len``) and through full
attention, records per layer and head the attention that the last query tokens give to
each relative position, names each layer's pattern (U-shaped, mountain, uniform; rule in
``analysis.attention_stats.classify_layer``) and writes ``attention.png`` (heatmaps,
layer x relative position, log colour scale), ``summary.json`` and, when the config has
chunk-stage calibration rules or a preset, the same for the calibrated chunks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

from .analysis.attention_stats import attention_profiles, classify_layer
from .calibrate import check_rules_fit, preset_rules
from .checkpoints import load_model
from .chunking import build_rows, encode_parts
from .config import load_config
from .errors import PcompError
from .io import read_context_file
from .tasks import passkey_task


def parse_layers(text: str, num_layers: int) -> list[int]:
    """``"0-7,12"`` -> ``[0, ..., 7, 12]``, checked against the model depth."""
    layers = []
    try:
        for part in text.split(","):
            a, _, b = part.partition("-")
            layers += list(range(int(a), int(b or a) + 1))
    except ValueError as err:
        raise PcompError(f"--layers takes ranges like 0-7,12; got {text!r}") from err
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad or not layers:
        raise PcompError(f"--layers {text!r}: layers must lie in 0..{num_layers - 1}")
    return layers


def build_parser():
    p = argparse.ArgumentParser(prog="python -m pcomp_jax.analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", metavar="YAML", help="run config (model, pipeline incl. calibration)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--context-file", metavar="PATH")
    p.add_argument("--question")
    p.add_argument("--length", type=int, default=4096, help="passkey input length when no context file (default 4096)")
    p.add_argument("--depth", type=float, default=0.5)
    p.add_argument("--methods", nargs="+", choices=("parallel", "full"), default=["parallel", "full"],
                   help="views to compute: the parallel chunk rows and/or the whole input with full attention")
    p.add_argument("--layers", default=None, help="layers to report, e.g. 0-7,12 (default: all)")
    p.add_argument("--last-queries", type=int, default=1, help="query tokens whose attention is averaged")
    p.add_argument("--bins", type=int, default=50, help="relative-position bins")
    p.add_argument("--output-dir", default="runs/analyze")
    return p


def profiles_by_group(model, rows, group: int, r: int, bins: int, rules) -> np.ndarray:
    """``attention_profiles`` over the chunk rows in groups of ``group`` (bounded memory)."""
    total, count = 0.0, 0
    for rows_g in rows.groups(group):
        real = int((rows_g.row_lengths > 0).sum())
        if real:
            prof = attention_profiles(model.params, model.config, rows_g.tokens, rows_g.positions,
                                      rows_g.row_lengths, r, bins, rules)
            total, count = total + prof * real, count + real
    return total / count


def parallel_view(model, parts, pc, args, rules) -> dict:
    """Profiles over the config's parallel chunk rows (and, with chunk-stage rules, calibrated)."""
    parts = parts if pc.sentence_chunks else dataclasses.replace(parts, breaks=None)
    rows = build_rows(parts, pc.chunk_len, model.config.window, overlap=pc.chunk_overlap)
    n = rows.num_chunks
    out = {f"parallel chunks ({n} x {pc.chunk_len})": profiles_by_group(
        model, rows, pc.group_size, args.last_queries, args.bins, ())}
    if rules:
        out["parallel chunks, calibrated"] = profiles_by_group(
            model, rows, pc.group_size, args.last_queries, args.bins, rules)
    return out


def full_view(model, parts, pc, args, rules) -> dict:
    """Profiles over the whole input as one full-attention row."""
    full = build_rows(parts, len(parts.context), 10**9)
    return {f"full attention ({int(full.row_lengths[0])} tokens)": attention_profiles(
        model.params, model.config, full.tokens, full.positions, full.row_lengths, args.last_queries, args.bins)}


VIEWS = {"parallel": parallel_view, "full": full_view}  # --methods: which views to compute


def plot(results: dict, layers: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 0.18 * len(layers) + 2.5), squeeze=False)
    for ax, (name, prof) in zip(axes[0], results.items()):
        mean = prof[layers].mean(axis=1)  # [layers, bins], averaged over heads
        im = ax.imshow(mean, aspect="auto", origin="lower", norm=LogNorm(vmin=max(mean.min(), 1e-5), vmax=mean.max()),
                       extent=(0, 1, -0.5, len(layers) - 0.5), cmap="viridis")
        ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=6)
        ax.set_xlabel("relative key position in the row")
        ax.set_ylabel("layer")
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, label="attention mass (mean over heads)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run = load_config(args.config, args.overrides)
        if args.last_queries < 1 or args.bins < 2:
            raise PcompError("--last-queries must be >= 1 and --bins >= 2")
        if args.context_file:  # read before the model loads: a bad file is reported at once
            task = read_context_file(args.context_file, 0, args.question)
        model = load_model(run.model, dtype=run.dtype)
        cfg, pc = model.config, run.pipeline
        layers = parse_layers(args.layers, cfg.num_layers) if args.layers else list(range(cfg.num_layers))
        if not args.context_file:
            task = passkey_task(model.tokenizer, args.length, args.depth, run.task.seed)
        parts = encode_parts(model.tokenizer, task.context, task.question, pc.instruction, pc.answer_prefix, pc.chat)
        rules = tuple(r for r in pc.calibration if r.stage == "chunk")
        if pc.calibration_preset:
            rules += preset_rules(pc.calibration_preset, cfg.num_layers, "chunk")
        check_rules_fit(rules, cfg.num_layers)
        results = {}
        for view in args.methods:  # in the order asked
            results.update(VIEWS[view](model, parts, pc, args, rules))
    except PcompError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.makedirs(args.output_dir, exist_ok=True)
    summary = {"model": run.model, "context_tokens": len(parts.context), "last_queries": args.last_queries,
               "bins": args.bins, "methods": {}}
    for name, prof in results.items():
        per_layer = {str(l): {**classify_layer(prof[l].mean(axis=0)), "profile": prof[l].mean(axis=0).round(6).tolist(),
                              "heads": [classify_layer(h)["pattern"] for h in prof[l]]} for l in layers}
        summary["methods"][name] = per_layer
        counts = {p: sum(v["pattern"] == p for v in per_layer.values()) for p in ("U-shaped", "mountain", "uniform")}
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + " layers")
        print("  " + " ".join(f"{l}:{per_layer[str(l)]['pattern'][0]}" for l in layers))
    plot(results, layers, os.path.join(args.output_dir, "attention.png"))
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {args.output_dir}/attention.png and summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
