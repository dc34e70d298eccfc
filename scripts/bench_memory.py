"""Peak memory and time of ParallelComp against input length, measured against the preflight.

    python scripts/bench_memory.py --model random-small --lengths 8192 32768
    python scripts/bench_memory.py --model smollm2-135m-instruct --lengths 16384

Each length runs in a fresh process (so each peak is its own): random context token ids
(``[length]``, clear of special tokens), an 8-token P, a 16-token question, the pipeline of
``--config``'s settings (default configs/demo.yaml) through ``answer_parts``, 8 new tokens.
The process first asks the preflight (``pcomp_jax.memory.estimate_memory``) and runs the
pipeline once (compiling every stage), then runs it again and measures that run. With
``--requests N`` (N > 1), N such inputs with distinct contexts run as one batch
(``document.answer_parts_batch``) against ``memory.estimate_batch_memory``:

- on an accelerator, the measured peak is the device allocator's ``peak_bytes_in_use``
  (since the process started: it holds the load, the compilations, where XLA autotunes
  with buffers of the same allocator, and both runs);
- on the CPU (no allocator statistics; the device buffers are host memory) it is the
  process's peak resident memory over the warm run: freed heap is handed back
  (``malloc_trim``), the peak is reset (``5`` into ``/proc/self/clear_refs`` resets
  ``VmHWM``), and measured = ``VmHWM`` after the run - the resident memory right before
  it + the weights' bytes (resident before, so the difference leaves them out). The
  process runs with glibc's mmap threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``,
  ``MALLOC_TRIM_THRESHOLD_``) and one malloc arena (``MALLOC_ARENA_MAX``): every larger
  buffer is mapped when allocated and unmapped when freed, and the smaller ones share one
  heap, so the resident memory follows the live buffers (with malloc's defaults, freed
  buffers stay in per-thread arenas, and the peak overstated what is alive by about 120
  MiB for the default model at 16K tokens). It holds host-side work
  too (the chunk rows, Python), so it bounds the device buffers from above.

Reported per length: chunks, seconds of the warm run, the process's peak RSS
(``ru_maxrss``), the measured peak, the preflight's estimate (weights + selection + the
largest phase), its margin, estimate + margin, and preflight / measured (the bare
estimate over the measured peak). The script exits 1 with one line when a measured peak
exceeds the preflight's estimate + margin (``MemoryEstimate.checked``, the number
``--dry-run`` compares with the device), 2 when a length fails to run. ``random-small``
is a 4-layer Llama (hidden 256, 8 heads, 4 KV heads, vocabulary 32000, window 8192) with
random weights, so that long inputs run on a CPU.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# glibc: buffers over 128 KiB mapped and unmapped one by one (a fixed threshold stops the
# adaptive one), smaller ones in one arena for every thread, so that the resident memory
# follows the live buffers.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "1"}


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
    """The process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_free_heap() -> None:
    """Garbage-collects and hands malloc's free memory back to the system (glibc ``malloc_trim``),
    so that a later run's allocations raise the resident memory instead of reusing it unseen."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def settle() -> int:
    """``release_free_heap`` until the resident memory stops falling (the runtime frees a
    buffer once the programs reading it are done); returns the resident memory then."""
    rss = rss_bytes()
    for _ in range(20):
        release_free_heap()
        time.sleep(0.1)
        now = rss_bytes()
        if now > rss - 2**20:
            return now
        rss = now
    return rss


def reset_peak_rss() -> None:
    """Resets the process's peak resident memory (``VmHWM``) to its resident memory now (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_since_reset() -> int:
    """``VmHWM`` in bytes: the peak resident memory since the last ``reset_peak_rss``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def one(length: int, model_name: str, config_path: str, overrides: list[str], requests: int = 1) -> dict:
    import jax
    import numpy as np

    from pcomp_jax import load_model
    from pcomp_jax.chunking import PromptParts
    from pcomp_jax.config import load_config
    from pcomp_jax.document import answer_parts_batch
    from pcomp_jax.memory import estimate_batch_memory, estimate_memory
    from pcomp_jax.pipeline import answer_parts

    config = load_config(config_path, overrides).pipeline
    model = random_small_model() if model_name == "random-small" else load_model(model_name)
    rng = np.random.default_rng(0)
    low = 100  # clear of special tokens
    prefix = rng.integers(low, model.config.vocab_size, 8).astype(np.int32)
    asked = [PromptParts(prefix=prefix, context=rng.integers(low, model.config.vocab_size, length).astype(np.int32),
                         question=rng.integers(low, model.config.vocab_size, 16).astype(np.int32))
             for _ in range(requests)]
    jax.block_until_ready(model.params)
    if requests == 1:
        estimate = estimate_memory(model, asked[0], config, 8)
        run = lambda: answer_parts(model, asked[0], config, max_new_tokens=8)
    else:  # distinct contexts as one batch
        estimate = estimate_batch_memory(model, asked, config, 8)
        run = lambda: answer_parts_batch(model, asked, config, max_new_tokens=8)[0]
    run()  # compiles every stage
    before = settle()
    reset_peak_rss()
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    hwm = peak_rss_since_reset()
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    device_peak = (stats or {}).get("peak_bytes_in_use")
    measured = device_peak if device_peak else hwm - before + estimate.weights
    return {"length": length, "requests": requests, "seconds": round(seconds, 1), "chunks": result.num_chunks, "device": str(device),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_before": before,
            "hwm": hwm, "device_peak": device_peak, "measured": measured,
            "measured_as": "allocator peak_bytes_in_use" if device_peak else "VmHWM - RSS before + weights",
            "estimate_peak": estimate.peak, "estimate_margin": estimate.margin, "estimate_checked": estimate.checked,
            "estimate_weights": estimate.weights, "estimate_selection": estimate.selection,
            "estimate_phases": estimate.phases, "largest_phase": estimate.largest_phase}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random-small", help="random-small, or any load_model source")
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--requests", type=int, default=1,
                   help="N > 1: N distinct contexts of each length answered as one batch (answer_parts_batch) against "
                        "estimate_batch_memory")
    p.add_argument("--output-json", help="also write the rows as JSON")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one length in this process
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.model, args.config, args.overrides, args.requests)))
        return 0
    rows = []
    print("| context tokens | chunks | seconds | peak RSS MiB | measured peak MiB | preflight estimate MiB | "
          "margin MiB | estimate + margin MiB | preflight / measured |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for length in args.lengths:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", str(length), "--model", args.model,
               "--config", args.config, "--requests", str(args.requests)] + [x for o in args.overrides for x in ("--set", o)]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
        if done.returncode != 0:
            last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            print(f"error: length {length} failed: {last}", file=sys.stderr)
            return 2
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        mib = lambda b: f"{b / 2**20:,.1f}"
        print(f"| {length:,} | {row['chunks']} | {row['seconds']} | {mib(row['peak_rss'])} | {mib(row['measured'])} | "
              f"{mib(row['estimate_peak'])} | {mib(row['estimate_margin'])} | {mib(row['estimate_checked'])} | "
              f"{row['estimate_peak'] / row['measured']:.2f} |", flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(rows, f, indent=1)
    over = [r for r in rows if r["measured"] > r["estimate_checked"]]
    if over:
        r = over[0]
        print(f"error: at {r['length']:,} tokens the measured peak ({r['measured'] / 2**20:,.0f} MiB, "
              f"{r['measured_as']}) exceeds the preflight's estimate + margin ({r['estimate_checked'] / 2**20:,.0f} "
              "MiB); the estimate misses a buffer", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
