"""Prefill benchmark: our full attention, our ParallelComp prefill, and Hugging Face's, side by side.

    python scripts/bench_prefill.py --lengths 4096 8192 16384 32768 --output-dir docs/bench/cpu
    python scripts/bench_prefill.py --shape llama3-8b --dtype bfloat16 --lengths 32768 131072 --no-hf   # on a GPU
    python scripts/bench_prefill.py --dtype float32 bfloat16 --lengths 16384   # both dtypes side by side
    python scripts/bench_prefill.py --shape gemma3-270m --chunk-len 448 --lengths 32768 --no-hf   # the gemma extra

Every (method, length) runs in a fresh subprocess, so peak memory is its own (RSS on the
CPU, ``peak_bytes_in_use`` on an accelerator). Reported per run: median wall time over
``--repeats`` after one compiling call, tokens/s, compile time, number of compilations,
FLOPs counted from the shapes, achieved FLOP/s and MFU against the peak this same run
measures for a large matmul on the same device, and speed-ups with the FLOP ratio beside
them. Writes ``results.json``, ``results.md`` and ``prefill.png`` to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("ours_full", "ours_parallelcomp", "hf_full")


def layer_flops(cfg, tokens: int, row_len: int) -> float:
    """FLOPs of the layer stack for ``tokens`` tokens in causal rows of ``row_len`` (2 per
    multiply-add); a sliding-window layer's queries each see at most its window of keys."""
    e, h, kvh, d, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    linear = 2 * tokens * (e * h * d * 2 + e * kvh * d * 2 + 3 * e * f)
    windows = cfg.sliding_windows or (0,) * cfg.num_layers
    attention = 0.0
    for window in windows:
        # keys seen per query, averaged over a causal row: (row_len + 1) / 2 without a window
        seen = (row_len + 1) / 2 if not window or window >= row_len else window - window * (window - 1) / (2 * row_len)
        attention += 2 * 2 * tokens * seen * h * d  # QK^T and PV
    return cfg.num_layers * linear + attention


def cpu_features() -> str:
    """The CPU's features that decide bfloat16 matmul speed (``pcomp_jax.hardware.cpu_flags``)."""
    from pcomp_jax.hardware import cpu_flags

    flags = cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    return ", ".join(f"{name} {'yes' if name in flags else 'no'}" for name in wanted)


def measure_matmul_peak(dtype_name: str) -> float:
    """FLOP/s of a jitted square matmul of random numbers on the default device (median of 5),
    in the model's dot form (``model.llama.dot``: inputs in ``dtype_name``, float32
    accumulation and result): 4096 on the CPU, 8192 on an accelerator (a smaller one does not
    fill a GPU)."""
    import jax
    import jax.numpy as jnp

    from pcomp_jax.model.llama import dot

    n = 4096 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype_name)
    f = jax.jit(lambda x: dot("ij,jk->ik", x, x))
    f(a).block_until_ready()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def peak_memory_bytes() -> int:
    import jax

    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load(args):
    import pcomp_jax

    if args.shape == "default":
        return pcomp_jax.load_model(None, dtype=args.dtype[0])
    if args.shape == "gemma3-270m":
        return pcomp_jax.load_model("gemma3-270m", dtype=args.dtype[0])
    return random_model(args.shape, args.dtype[0])


def random_model(shape: str, dtype: str):
    """Random weights of a Llama-3-8B-shaped config (no tokenizer needed for timing)."""
    import jax
    import jax.numpy as jnp

    from pcomp_jax.checkpoints import Model
    from pcomp_jax.checkpoints.orbax_dir import weight_shapes
    from pcomp_jax.model.config import ModelConfig, RopeConfig

    if shape != "llama3-8b":
        raise SystemExit(f"unknown --shape {shape!r}; choose default, gemma3-270m or llama3-8b")
    cfg = ModelConfig("LlamaForCausalLM", 128256, 4096, 14336, 32, 32, 8, 128, 8192, 1e-5, RopeConfig(theta=500000.0))
    shapes = weight_shapes(cfg, jnp.dtype(dtype))
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    params = jax.tree.unflatten(tree, [(jax.random.normal(k, s.shape, jnp.float32) * 0.02).astype(s.dtype)
                                       for k, s in zip(keys, leaves)])
    return Model(cfg, params, None, "random llama3-8b shape")


def timed_calls(call, repeats: int, warm_up=None) -> dict:
    """One warm-up call (``warm_up``, or ``call`` itself: it compiles), then ``repeats`` timed
    calls of ``call``: median, all times, and the warm-up's extra time (compile time; None
    when the warm-up was another call)."""
    t = time.perf_counter()
    (warm_up or call)()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    return {"median_s": median, "times_s": times, "compile_s": None if warm_up else first - median}


def run_one(args) -> dict:
    """One (method, length) in this process; prints a JSON record."""
    import numpy as np

    method, length = args.one, args.length
    rng = np.random.default_rng(0)
    if method == "hf_full":
        return run_hf(args, length, rng)
    import jax
    import jax.numpy as jnp

    from pcomp_jax.chunking import PromptParts
    from pcomp_jax.config import ParallelCompConfig
    from pcomp_jax.decode import _prefill_prompt
    from pcomp_jax.pipeline import Decode, run_stage1, run_stage2
    from pcomp_jax.plans import plan
    from pcomp_jax.prefill import prefill_group

    model = load(args)
    cfg = model.config
    vocab = cfg.vocab_size
    if method == "ours_full":
        ids = jnp.asarray(rng.integers(0, vocab, size=(1, length)), jnp.int32)
        call = lambda: jax.block_until_ready(_prefill_prompt(model.params, cfg, ids, jnp.int32(length), 16))
        flops = layer_flops(cfg, length, length)
        compiled = lambda: _prefill_prompt._cache_size()
    else:
        config = ParallelCompConfig(chunk_len=args.chunk_len, top_k_chunks=args.top_k, capacity=args.capacity,
                                    group_size=args.group_size, chat=False, attention=args.attention)
        parts = PromptParts(prefix=rng.integers(0, vocab, 16).astype(np.int32),
                            context=rng.integers(0, vocab, length).astype(np.int32),
                            question=rng.integers(0, vocab, 24).astype(np.int32))

        def call():
            plan_ = plan(model, config)
            return run_stage2(model, plan_, run_stage1(model, plan_, parts), Decode(1))

        rows = math.ceil(length / args.chunk_len)
        row_len = 16 + math.ceil(length / rows) + 24
        flops = layer_flops(cfg, rows * row_len, row_len)
        compiled = lambda: prefill_group._cache_size()
    return {"method": method, "length": length, "dtype": args.dtype[0],
            "attention": args.attention if method == "ours_parallelcomp" else "auto",
            **timed_calls(call, args.repeats), "compilations": compiled(),
            "flops": flops, "peak_memory_bytes": peak_memory_bytes(), "device": str(jax.devices()[0].device_kind)}


def run_hf(args, length, rng) -> dict:
    """transformers' PyTorch LlamaForCausalLM (SDPA), the same GGUF weights, on the CPU in ``--dtype``."""
    import torch
    from transformers import AutoModelForCausalLM

    from pcomp_jax.checkpoints import DEFAULT_GGUF, default_model_path

    if args.shape != "default":
        raise SystemExit("hf_full is measured for the default model only")
    torch.set_num_threads(os.cpu_count())
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(default_model_path()), gguf_file=DEFAULT_GGUF,
                                                 dtype=getattr(torch, args.dtype[0]), attn_implementation="sdpa").eval()
    ids = torch.tensor(rng.integers(0, model.config.vocab_size, size=(1, length)))

    def call(tokens=ids):
        with torch.no_grad():
            model(tokens, logits_to_keep=1, use_cache=True)

    # PyTorch compiles nothing: a short warm-up (threads, allocator) spares a second full-length call.
    timings = timed_calls(call, args.repeats, warm_up=lambda: call(ids[:, :512]))
    import pcomp_jax

    cfg = pcomp_jax.load_model().config
    return {"method": "hf_full", "length": length, "dtype": args.dtype[0], **timings, "compilations": 0,
            "flops": layer_flops(cfg, length, length), "peak_memory_bytes": peak_memory_bytes(), "device": "cpu (torch)"}


def report(records: list[dict], peaks: dict, args) -> str:
    """Markdown tables of ``records``; ``peaks``: dtype -> the matmul FLOP/s measured in this run."""
    dtype_of = lambda r: r.get("dtype", args.dtype[0])
    by = {(r["method"], r["length"], dtype_of(r)): r for r in records}
    lines = [f"CPU features: {cpu_features()}"] if not records or "cpu" in str(records[0].get("device", "cpu")).lower() else []
    lines += [f"matmul peak measured in this run ({d}, the model's dot form): {p / 1e9:.1f} GFLOP/s" for d, p in peaks.items()]
    lines += ["", "| length | method | dtype | median s | tokens/s | GFLOP/s | MFU | peak mem GB | compile s | compilations |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        achieved = r["flops"] / r["median_s"]
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        lines.append(f"| {r['length']} | {r['method']} | {dtype_of(r)} | {r['median_s']:.2f} | "
                     f"{r['length'] / r['median_s']:.0f} | {achieved / 1e9:.1f} | {achieved / peaks[dtype_of(r)]:.0%} | "
                     f"{r['peak_memory_bytes'] / 1e9:.2f} | {compile_s} | {r['compilations']} |")
    cell = lambda a, b: f"{b['median_s'] / a['median_s']:.2f}x" if a and b else "n/a"
    lines += ["", "| length | dtype | ParallelComp vs our full (FLOP ratio) | our full vs HF full | ParallelComp vs HF full |",
              "| --- | --- | --- | --- | --- |"]
    for length in sorted({r["length"] for r in records}):
        for dtype in args.dtype:
            full, pc, hf = (by.get((m, length, dtype)) for m in METHODS)
            ratio = f" ({full['flops'] / pc['flops']:.2f}x)" if full and pc else ""
            lines.append(f"| {length} | {dtype} | {cell(pc, full)}{ratio} | {cell(full, hf)} | {cell(pc, hf)} |")
    if len(args.dtype) > 1:
        lines += ["", "| length | method | bfloat16 vs float32 (time ratio, >1 = bfloat16 faster) |", "| --- | --- | --- |"]
        for length in sorted({r["length"] for r in records}):
            for method in METHODS:
                lines.append(f"| {length} | {method} | {cell(by.get((method, length, 'bfloat16')), by.get((method, length, 'float32')))} |")
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        for dtype in sorted({r.get("dtype", "") for r in records}):
            rs = sorted((r for r in records if r["method"] == method and r.get("dtype", "") == dtype),
                        key=lambda r: r["length"])
            if rs:
                x = [r["length"] for r in rs]
                label = f"{method} {dtype}".strip()
                ax_t.plot(x, [r["median_s"] for r in rs], marker="o", label=label)
                ax_m.plot(x, [r["peak_memory_bytes"] / 1e9 for r in rs], marker="o", label=label)
    for ax, label in ((ax_t, "median prefill time (s)"), (ax_m, "peak memory (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face's prefill")
    p.add_argument("--shape", default="default", choices=("default", "gemma3-270m", "llama3-8b"),
                   help="default (SmolLM2), gemma3-270m (the gemma extra's Gemma 3 270M) or llama3-8b (random weights)")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=("float32", "bfloat16"),
                   help="one dtype, or both to compare them side by side in one run")
    p.add_argument("--chunk-len", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity", type=int, default=None)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--attention", default="auto", help="the ParallelComp prefill's attention backend (pipeline.attention)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=int, default=3600, help="seconds per (method, length) run")
    p.add_argument("--output-dir", default="runs/bench")
    p.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--matmul-peak", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.matmul_peak:
        print(measure_matmul_peak(args.dtype[0]))
        return
    if args.one:
        print("RESULT " + json.dumps(run_one(args)))
        return
    methods = [m for m in args.methods if not (args.no_hf and m == "hf_full")]
    os.makedirs(args.output_dir, exist_ok=True)
    peaks = {}
    for dtype in args.dtype:
        # In a subprocess, like every run: JAX in this process would hold most of an accelerator's memory.
        done = subprocess.run([sys.executable, __file__, "--matmul-peak", "--dtype", dtype], capture_output=True,
                              text=True, timeout=args.timeout)
        if done.returncode:
            raise SystemExit(f"error: measuring the matmul peak failed: {done.stderr.strip()[-400:]}")
        peaks[dtype] = float(done.stdout.strip().splitlines()[-1])
    records = []
    passthrough = ["--shape", args.shape, "--chunk-len", str(args.chunk_len), "--top-k",
                   str(args.top_k), "--group-size", str(args.group_size), "--repeats", str(args.repeats),
                   "--attention", args.attention]
    if args.capacity:
        passthrough += ["--capacity", str(args.capacity)]
    for length in args.lengths:
        for method in methods:
            for dtype in args.dtype:  # the dtypes of one (length, method) back to back: side by side in time
                cmd = [sys.executable, __file__, "--one", method, "--length", str(length), "--dtype", dtype, *passthrough]
                name = f"{method} {dtype} {length}"
                try:
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    print(f"{name}: timed out after {args.timeout}s", flush=True)
                    continue
                result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode or not result:
                    print(f"{name}: failed (exit {done.returncode}): {done.stderr.strip()[-400:]}", flush=True)
                    continue
                records.append(json.loads(result[0][7:]))
                r = records[-1]
                print(f"{name}: {r['median_s']:.2f}s, {r['peak_memory_bytes'] / 1e9:.2f} GB", flush=True)
                write_results(records, peaks, args)  # after every run: a stopped benchmark keeps what it measured
    print(write_results(records, peaks, args))
    plot(records, os.path.join(args.output_dir, "prefill.png"))


def write_results(records, peaks, args) -> str:
    """Writes ``results.json`` and ``results.md`` into the output directory; returns the table."""
    text = report(records, peaks, args)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"matmul_peak_flops": peaks, "cpu_features": cpu_features(), "args": vars(args), "records": records}, f,
                  indent=1)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
