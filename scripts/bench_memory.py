"""Peak memory and time of ParallelComp against input length: flat with streaming.

    python scripts/bench_memory.py --model random-small --lengths 32768 131072 524288 1048576
    python scripts/bench_memory.py --model smollm2-135m-instruct --lengths 32768 131072

Each length runs in a fresh process (so each peak is its own): random context token ids
(the default model: its tokenizer's ids of a random word stream), a 16-token question,
the pipeline of ``--config``'s settings (default configs/demo.yaml) through
``answer_parts``, timed to the last token. Reported per length: wall seconds, the
process's peak resident memory (``ru_maxrss``) and its growth over the memory held right
before the preflight and the run (the model loaded; the growth holds the compilation of
the preflight's and the run's stages), and the preflight's estimated peak
per device (``pcomp_jax.memory``, XLA's buffer plan). ``random-small`` is a 4-layer
Llama (hidden 256, 8 heads, 4 KV heads, vocabulary 32000, window 8192) with random
weights, so that 1M tokens run on a CPU. On the CPU the measured growth also holds XLA's
compiler and host-side buffers, so it bounds the device buffers from above; on an
accelerator the row also holds the device allocator's peak (``peak_bytes_in_use``), the
number the preflight estimates.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_small_model():
    import jax
    import jax.numpy as jnp

    from pcomp_jax.checkpoints import Model
    from pcomp_jax.checkpoints.orbax_dir import weight_shapes
    from pcomp_jax.model.config import ModelConfig

    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=256, intermediate_size=688,
                      num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32, window=8192, eos_token_ids=(2,))
    shapes = weight_shapes(cfg, jnp.float32)
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    params = jax.tree.unflatten(tree, [0.02 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)])
    return Model(cfg, params, None, "random-small")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(length: int, model_name: str, config_path: str, overrides: list[str]) -> dict:
    import jax
    import numpy as np

    from pcomp_jax import load_model
    from pcomp_jax.chunking import PromptParts
    from pcomp_jax.config import load_config
    from pcomp_jax.memory import estimate_memory
    from pcomp_jax.pipeline import answer_parts

    config = load_config(config_path, overrides).pipeline
    model = random_small_model() if model_name == "random-small" else load_model(model_name)
    rng = np.random.default_rng(0)
    low = 100  # clear of special tokens
    parts = PromptParts(prefix=rng.integers(low, model.config.vocab_size, 8).astype(np.int32),
                        context=rng.integers(low, model.config.vocab_size, length).astype(np.int32),
                        question=rng.integers(low, model.config.vocab_size, 16).astype(np.int32))
    jax.block_until_ready(model.params)
    before = rss_bytes()
    estimate = estimate_memory(model, parts, config, 8)
    start = time.perf_counter()
    result = answer_parts(model, parts, config, max_new_tokens=8)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    return {"length": length, "seconds": round(seconds, 1), "peak_rss": peak, "growth": peak - before,
            "device_peak": (stats or {}).get("peak_bytes_in_use"),
            "estimate_peak": estimate.peak, "estimate_weights": estimate.weights, "chunks": result.num_chunks,
            "device": str(jax.devices()[0])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random-small", help="random-small, or any load_model source")
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 524288, 1048576])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--output-json", help="also write the rows as JSON")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one length in this process
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.model, args.config, args.overrides)))
        return 0
    rows = []
    print("| context tokens | chunks | seconds | peak RSS MiB | growth during the run MiB | device peak MiB | "
          "preflight peak MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for length in args.lengths:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", str(length), "--model", args.model,
               "--config", args.config] + [x for o in args.overrides for x in ("--set", o)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            print(f"error: length {length} failed: {last}", file=sys.stderr)
            return 2
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        mib = lambda b: f"{b / 2**20:,.0f}"
        device = mib(row["device_peak"]) if row["device_peak"] else "-"
        print(f"| {length:,} | {row['chunks']} | {row['seconds']} | {mib(row['peak_rss'])} | {mib(row['growth'])} | "
              f"{device} | {mib(row['estimate_peak'])} |", flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
