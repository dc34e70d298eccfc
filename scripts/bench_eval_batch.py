"""The evaluation runner one item at a time against items in batches (``batch_size``).

    python scripts/bench_eval_batch.py --output docs/bench/eval_batch_cpu.md

Runs one sweep (``--config``, default ``configs/eval_retrieval.yaml``, narrowed by the
``--set`` overrides below) with each ``--batch-sizes`` value, side by side in one process
on one loaded model, each into a fresh directory, twice: the first run compiles its
shapes, the second is timed as the steady state. The predictions (text, selected chunks,
score) of every run are asserted equal to the first batch size's. Prints a markdown table
(and writes it to ``--output``). A run's records are on disk when ``evaluate`` returns
(every answer's tokens reached the host), so the wall time counts finished work.

Default sweep: passkey and the book needle at 1024 tokens, depths 0.1/0.5/0.9, seeds 0 and
1 (12 items), ParallelComp with the config's pipeline.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time

import jax

import pcomp_jax
from bench_batch import report  # scripts/: the table printed and written
from pcomp_jax.eval import evaluate
from pcomp_jax.eval.config import load_eval_config

DEFAULT_SETS = ["tasks=[passkey, needle]", "lengths=[1024]", "depths=[0.1, 0.5, 0.9]", "seeds=[0, 1]",
                "methods=[{name: parallelcomp, method: parallelcomp}]"]


def predictions(directory: str, methods) -> dict:
    """(method, id) -> (prediction, selected chunks, score) of a finished run."""
    out = {}
    for spec in methods:
        with open(os.path.join(directory, spec.name, "predictions.jsonl"), encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                out[(spec.name, r["id"])] = (r.get("prediction"), r.get("selected_chunks"), r.get("score"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/eval_retrieval.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=None, metavar="FIELD=VALUE",
                   help="override a field of the sweep (repeatable); default: the small sweep in the docstring")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--output", help="also write the markdown here")
    args = p.parse_args()
    overrides = DEFAULT_SETS if args.overrides is None else args.overrides
    base = load_eval_config(args.config, overrides)
    model = pcomp_jax.load_model(base.model, dtype=base.dtype)
    rows, first = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.batch_sizes:
            seconds = []
            for attempt in ("compile", "steady"):
                out = os.path.join(tmp, f"b{size}_{attempt}")
                config = load_eval_config(args.config, [*overrides, f"batch_size={size}", f"output_dir={out}"])
                t = time.perf_counter()
                evaluate(config, model, progress=False)
                seconds.append(time.perf_counter() - t)
                got = predictions(out, config.methods)
                first = got if first is None else first
                assert got == first, f"batch_size={size}: predictions differ from batch_size={args.batch_sizes[0]}"
            rows.append((size, len(got), *seconds))
            print(f"batch_size={size}: {seconds[0]:.1f} s with compilation, {seconds[1]:.1f} s steady", flush=True)
    lines = [
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {jax.device_count()} "
        f"{jax.default_backend()} device(s), JAX {jax.__version__}; {args.config} with {'; '.join(overrides)}",
        "",
        "| batch_size | predictions | first run, compiling (s) | second run (s) | speed-up (second runs) | "
        "same predictions |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for size, n, compiling, steady in rows:
        lines.append(f"| {size} | {n} | {compiling:.1f} | {steady:.1f} | {rows[0][3] / steady:.2f}x | yes |")
    report("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
