"""One layer's causal attention at SmolLM2's shape: blockwise block sizes against dense.

    python scripts/bench_attention_blocks.py --lengths 8192 16384 --blocks 128 256 512 1024 2048
    python scripts/bench_attention_blocks.py --lengths 1088 --batch 4 --blocks 512   # ParallelComp rows

Prints, per length and variant, the time of one jitted call (after a warm-up) and the
FLOP/s of its matmul work over the causal half (QK^T and PV; exp not counted).
Dense runs only up to --dense-max tokens (its scores grow as T^2).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from pcomp_jax.attention import blockwise_causal_attention, dense_causal_attention


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--blocks", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--dense-max", type=int, default=8192)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1, help="rows per call")
    args = p.parse_args()
    for t in args.lengths:
        rng = np.random.default_rng(0)
        q = jnp.asarray(rng.normal(size=(args.batch, t, args.heads, args.head_dim)), jnp.float32)
        k = jnp.asarray(rng.normal(size=(args.batch, t, args.kv_heads, args.head_dim)), jnp.float32)
        v = jnp.asarray(rng.normal(size=(args.batch, t, args.kv_heads, args.head_dim)), jnp.float32)
        flops = args.batch * 2 * 2 * t * t / 2 * args.heads * args.head_dim
        variants = [(f"blockwise {b}", lambda q, k, v, b=b: blockwise_causal_attention(q, k, v, None, b))
                    for b in args.blocks]
        if t <= args.dense_max:
            variants.append(("dense", dense_causal_attention))
        for name, fn in variants:
            f = jax.jit(fn)
            f(q, k, v).block_until_ready()
            start = time.perf_counter()
            f(q, k, v).block_until_ready()
            dt = time.perf_counter() - start
            print(f"T={t} {name}: {dt:.2f} s, {flops / dt / 1e9:.1f} GFLOP/s", flush=True)


if __name__ == "__main__":
    main()
