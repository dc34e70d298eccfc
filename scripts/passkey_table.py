"""Passkey accuracy by method, context length and depth with the default model.

    python scripts/passkey_table.py --lengths 16384 32768 --methods parallelcomp truncate

Prints one line per run and a markdown table (found / runs per method and length).
"""

import argparse
import dataclasses
import time

import pcomp_jax
from pcomp_jax.config import load_config
from pcomp_jax.tasks import passkey_task


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--methods", nargs="+", default=["parallelcomp", "pcw", "truncate", "full"])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override, as for pcomp_jax.generate")
    args = p.parse_args()
    run = load_config(args.config, args.overrides)
    model = pcomp_jax.load_model(run.model, dtype=run.dtype)
    found = {}
    for method in args.methods:
        for length in args.lengths:
            for depth in args.depths:
                task = passkey_task(model.tokenizer, length, depth, seed=run.task.seed)
                config = dataclasses.replace(run.pipeline, method=method)
                start = time.perf_counter()
                result = pcomp_jax.answer(model, task.context, task.question, config, run.max_new_tokens)
                ok = task.is_correct(result.text)
                found.setdefault((method, length), []).append(ok)
                print(f"{method} {length} depth {depth}: {'right' if ok else 'wrong'} ({result.text.strip()!r}, "
                      f"expected {task.answer}, chunks {result.selected_chunks}, {time.perf_counter() - start:.0f}s)",
                      flush=True)
    print("\n| method | " + " | ".join(f"{n} tokens" for n in args.lengths) + " |")
    print("| --- |" + " --- |" * len(args.lengths))
    for method in args.methods:
        cells = [f"{sum(found[(method, n)])}/{len(found[(method, n)])}" for n in args.lengths]
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
