"""Passkey accuracy of ParallelComp for several chunk lengths and k (how the defaults were chosen).

    python scripts/sweep_defaults.py --length 4000 --settings 256:1 256:2 512:1 512:2 512:3 1024:1

Prints one line per (setting, depth) and a summary line per setting.
"""

import argparse

import pcomp_jax
from pcomp_jax.config import ParallelCompConfig
from pcomp_jax.tasks import passkey_task


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=4000, help="context tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--settings", nargs="+", default=["256:1", "256:2", "512:1", "512:2", "512:3", "1024:1"],
                   help="chunk_len:top_k pairs")
    args = p.parse_args()
    model = pcomp_jax.load_model()
    for setting in args.settings:
        chunk_len, k = (int(x) for x in setting.split(":"))
        right = 0
        for depth in args.depths:
            task = passkey_task(model.tokenizer, args.length, depth, seed=int(depth * 10))
            config = ParallelCompConfig(chunk_len=chunk_len, top_k_chunks=k)
            result = pcomp_jax.answer(model, task.context, task.question, config, max_new_tokens=12)
            right += task.is_correct(result.text)
            print(f"length {args.length} chunk_len {chunk_len} k {k} depth {depth}: expected {task.answer}, "
                  f"got {result.text!r}, chunks {result.selected_chunks}", flush=True)
        print(f"== chunk_len {chunk_len} k {k}: {right}/{len(args.depths)}", flush=True)


if __name__ == "__main__":
    main()
