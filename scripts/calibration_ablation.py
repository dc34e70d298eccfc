"""Calibration presets against no calibration: passkey and a needle in a novel, by length.

    python scripts/calibration_ablation.py --lengths 16384 32768 --text war_and_peace.txt

Every preset runs on the config's pipeline (``--config``, default ``configs/demo.yaml``:
its merge layout, evictions and all), with the preset added at ``--stage``. Presets at
the ``merged`` stage (the default) act after the chunk prefill, so each input is read
once (``read_document``) and every preset is asked of it; ``--stage chunk`` answers each
preset from the start. Prints one line per run and a markdown table (found / runs).
"""

import argparse
import dataclasses
import sys

import pcomp_jax
from pcomp_jax.calibrate import PRESETS
from pcomp_jax.config import load_config
from pcomp_jax.errors import PcompError
from pcomp_jax.io import read_text
from pcomp_jax.tasks import make_task


def preset_config(config, preset: str, stage: str):
    """``config`` with the calibration preset ``preset`` at ``stage`` (``none``: unchanged)."""
    if preset == "none":
        return config
    return dataclasses.replace(config, calibration_preset=preset, calibration_preset_stage=stage)


def preset_answers(model, task, config, presets, stage: str, max_new_tokens: int) -> dict:
    """``{preset: pcomp_jax.Answer}`` for ``task`` under ``config`` plus each preset at
    ``stage``: exactly ``pcomp_jax.answer`` with that config, the context read once for
    merged-stage presets."""
    if stage == "merged":
        doc = pcomp_jax.read_document(model, task.context, config)
        return {p: doc.ask(task.question, max_new_tokens, preset_config(config, p, stage)) for p in presets}
    return {p: pcomp_jax.answer(model, task.context, task.question, preset_config(config, p, stage), max_new_tokens)
            for p in presets}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override, as for pcomp_jax.generate")
    p.add_argument("--tasks", nargs="+", choices=("passkey", "needle"), default=["passkey", "needle"])
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--presets", nargs="+", choices=tuple(PRESETS), default=list(PRESETS))
    p.add_argument("--stage", choices=("merged", "chunk"), default="merged")
    p.add_argument("--text", default=None, help="novel for the needle task (default: the bundled haystack, pcomp_jax.io.BUNDLED_TEXT)")
    args = p.parse_args(argv)
    try:
        run_ablation(args)
    except PcompError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run_ablation(args) -> None:
    """Answers every task, length, depth and preset of ``args``; prints each run and the table."""
    run = load_config(args.config, args.set)
    model = pcomp_jax.load_model(run.model, dtype=run.dtype)
    text = read_text(args.text, "the needle task's") if "needle" in args.tasks else None
    names = ["none"] + args.presets
    print(f"pipeline: merge_layout={run.pipeline.merge_layout}, chunk_len={run.pipeline.chunk_len}, "
          f"top_k_chunks={run.pipeline.top_k_chunks}, capacity={run.pipeline.capacity}; presets at stage {args.stage}", flush=True)
    found = {}
    for task_name in args.tasks:
        for length in args.lengths:
            for depth in args.depths:
                task = make_task(task_name, model.tokenizer, length, depth, run.task.seed, text=text)
                answers = preset_answers(model, task, run.pipeline, names, args.stage, run.max_new_tokens)
                for name, ans in answers.items():
                    ok = task.is_correct(ans.text)
                    found.setdefault((name, task_name, length), []).append(ok)
                    print(f"{task_name} {length} depth {depth} {name}: {'right' if ok else 'wrong'} "
                          f"({ans.text.strip()!r}, expected {task.answer!r}, chunks {ans.selected_chunks})", flush=True)
    columns = [(t, n) for t in args.tasks for n in args.lengths]
    print(f"\nstage: {args.stage}\n\n| preset | " + " | ".join(f"{t} {n}" for t, n in columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for name in names:
        cells = [f"{sum(found[(name, t, n)])}/{len(found[(name, t, n)])}" for t, n in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
