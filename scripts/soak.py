"""Soak: many varied requests in one process; memory must not grow after warm-up and no
new compilation may happen for shapes already seen.

    python scripts/soak.py --requests 200                       # random-small model (fast)
    python scripts/soak.py --requests 200 --model smollm2-135m-instruct

Each request draws a context length (``--lengths``), a method (``--methods``), a question
length (``--question-lengths``) and fresh token ids, and runs ``answer_parts`` to the last
token. The first pass visits every combination once: the warm-up, which compiles. Then the
remaining requests run in random order over the same combinations, so nothing should compile
again. Reported: the process's resident memory after the warm-up and at the end (and its
largest value after the warm-up), XLA compilations during the warm-up and after it
(``jax.monitoring``'s backend-compile events), and the time per request. Exits 1 when memory
grew by more than ``--max-growth-mib`` after the warm-up or anything compiled after it.

Resident memory also counts memory the C allocator has freed but keeps for reuse. To tell a
leak from that, every request is followed by ``gc.collect()`` and glibc's ``malloc_trim(0)``
(which hands free pages back; skipped where the C library has no such call) before the
resident set is read, and the device arrays still alive (``jax.live_arrays()``) are counted:
a leak keeps growing through both. ``--no-trim`` reads the resident set as it is.
``--rss-csv FILE`` writes one row per request (index, combination, seconds, RSS, live arrays).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def release_free_memory() -> bool:
    """Collects Python garbage and asks glibc to return freed pages to the system; False
    where the C library has no ``malloc_trim``."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--model", default="random-small", help="random-small (see bench_memory.py), or a load_model source")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 3000, 6000])
    p.add_argument("--methods", nargs="+", default=["parallelcomp", "pcw", "truncate"])
    p.add_argument("--question-lengths", type=int, nargs="+", default=[8, 24])
    p.add_argument("--chunk-len", type=int, default=512)
    p.add_argument("--max-growth-mib", type=float, default=32.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-trim", action="store_true", help="read the resident set without gc + malloc_trim first")
    p.add_argument("--rss-csv", default=None, metavar="FILE", help="one row per request")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from bench_memory import random_small_model
    from pcomp_jax import ParallelCompConfig, load_model
    from pcomp_jax.chunking import PromptParts
    from pcomp_jax.pipeline import answer_parts

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: compiles.append(seconds) if event == COMPILE_EVENT else None)
    model = random_small_model() if args.model == "random-small" else load_model(args.model)
    vocab = model.config.vocab_size
    rng = np.random.default_rng(args.seed)
    combos = [(n, m, q) for n in args.lengths for m in args.methods for q in args.question_lengths]
    order = combos + [combos[i] for i in rng.integers(0, len(combos), max(0, args.requests - len(combos)))]
    late, times, rows = [], [], []
    warm_rss = peak_after = None
    trimmed = False
    for i, (length, method, question) in enumerate(order):
        parts = PromptParts(prefix=rng.integers(100, vocab, 8).astype(np.int32),
                            context=rng.integers(100, vocab, length).astype(np.int32),
                            question=rng.integers(100, vocab, question).astype(np.int32))
        config = ParallelCompConfig(method=method, chunk_len=args.chunk_len, top_k_chunks=2, capacity=min(128, args.chunk_len // 2), chat=False)
        before = len(compiles)
        start = time.perf_counter()
        answer_parts(model, parts, config, max_new_tokens=8)  # token ids on the host: the work is finished
        times.append(time.perf_counter() - start)
        if i >= len(combos) and len(compiles) > before:
            late.append((i, (length, method, question), len(compiles) - before))
        trimmed = False if args.no_trim else release_free_memory()
        rss, live = rss_mib(), len(jax.live_arrays())
        rows.append((i, length, method, question, round(times[-1], 3), round(rss, 1), live))
        if i == len(combos) - 1:
            warm_rss, warm_compiles, warm_live = rss, len(compiles), live
        elif warm_rss is not None:
            peak_after = max(peak_after or 0.0, rss)
    end_rss, end_live = rss_mib(), len(jax.live_arrays())
    warm_compiles = warm_compiles if warm_rss is not None else len(compiles)
    growth = end_rss - (warm_rss or end_rss)
    print(f"| requests | warm-up (first {len(combos)}) | RSS after warm-up MiB | RSS at the end MiB | largest RSS "
          f"after warm-up MiB | compilations in warm-up | after warm-up | median s per request |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {len(order)} | {sum(times[:len(combos)]):.1f} s | {warm_rss or end_rss:.0f} | {end_rss:.0f} | "
          f"{peak_after or end_rss:.0f} | {warm_compiles} | {len(compiles) - warm_compiles} | "
          f"{float(np.median(times[len(combos):] or times)):.2f} |")
    after = [r for r in rows if r[0] >= len(combos)]
    half = after[len(after) // 2:]
    slope = float(np.polyfit([r[0] for r in half], [r[5] for r in half], 1)[0]) * 100 if len(half) > 2 else 0.0
    print(f"\nresident set {'after gc + malloc_trim' if trimmed else 'as read (no trim)'}; device arrays alive "
          f"after warm-up {warm_live if warm_rss is not None else end_live}, at the end {end_live}; trend over the "
          f"last {len(half)} requests: {slope:+.1f} MiB per 100 requests")
    if args.rss_csv:
        with open(args.rss_csv, "w") as f:
            f.write("request,length,method,question_length,seconds,rss_mib,live_arrays\n")
            f.writelines(",".join(map(str, r)) + "\n" for r in rows)
    for i, key, n in late:
        print(f"request {i}: {n} compilation(s) for (length, method, question length) {key}, seen in the warm-up",
              file=sys.stderr)
    if growth > args.max_growth_mib or late:
        print(f"error: memory grew {growth:.0f} MiB after the warm-up (allowed {args.max_growth_mib:.0f}) or "
              f"{len(late)} request(s) compiled again", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
