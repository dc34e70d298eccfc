"""Calibration presets against no calibration: passkey and a needle in a novel, by length.

    python scripts/calibration_ablation.py --lengths 16384 32768 --text war_and_peace.txt

Presets act at ``--stage merged`` by default: the chunk prefill is then the same for
every preset and runs once per input; ``--stage chunk`` re-runs it per preset. Prints
one line per run and a markdown table (found / runs).
"""

import argparse

import pcomp_jax
from pcomp_jax.calibrate import PRESETS, preset_rules
from pcomp_jax.chunking import encode_parts
from pcomp_jax.config import load_config
from pcomp_jax.io import read_text
from pcomp_jax.pipeline import answer_from_prefill, prefill_context
from pcomp_jax.tasks import needle_task, passkey_task


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--tasks", nargs="+", choices=("passkey", "needle"), default=["passkey", "needle"])
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--presets", nargs="+", choices=tuple(PRESETS), default=list(PRESETS))
    p.add_argument("--stage", choices=("merged", "chunk"), default="merged")
    p.add_argument("--text", default=None, help="novel for the needle task (default: the bundled haystack, pcomp_jax.io.BUNDLED_TEXT)")
    args = p.parse_args()
    run = load_config(args.config)
    pc = run.pipeline
    model = pcomp_jax.load_model(run.model, dtype=run.dtype)
    text = read_text(args.text, "the needle task's") if "needle" in args.tasks else ""
    names = ["none"] + args.presets
    found = {}
    for task_name in args.tasks:
        for length in args.lengths:
            for depth in args.depths:
                if task_name == "passkey":
                    task = passkey_task(model.tokenizer, length, depth, seed=run.task.seed)
                else:
                    task = needle_task(text, model.tokenizer, length, depth, seed=run.task.seed)
                parts = encode_parts(model.tokenizer, task.context, task.question, pc.instruction, pc.answer_prefix, pc.chat)
                shared = prefill_context(model, parts, pc) if args.stage == "merged" else None
                for name in names:
                    rules = () if name == "none" else preset_rules(name, model.config.num_layers, args.stage)
                    pre = shared if shared is not None else prefill_context(model, parts, pc, rules)
                    merged = rules if args.stage == "merged" else ()
                    gen = answer_from_prefill(model, pre, run.max_new_tokens, merged)
                    ok = task.is_correct(gen.text)
                    found.setdefault((name, task_name, length), []).append(ok)
                    print(f"{task_name} {length} depth {depth} {name}: {'right' if ok else 'wrong'} "
                          f"({gen.text.strip()!r}, expected {task.answer!r}, chunks {pre.selected_chunks})", flush=True)
    columns = [(t, n) for t in args.tasks for n in args.lengths]
    print(f"\nstage: {args.stage}\n\n| preset | " + " | ".join(f"{t} {n}" for t, n in columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for name in names:
        cells = [f"{sum(found[(name, t, n)])}/{len(found[(name, t, n)])}" for t, n in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
