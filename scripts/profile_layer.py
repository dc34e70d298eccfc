"""Where a full-attention prefill layer spends its time: ours (JAX) against PyTorch's, per part.

    python scripts/profile_layer.py --lengths 8192 16384 32768

For one decoder layer of SmolLM2's shape (float32, random weights, one row of T tokens)
it times, side by side in one process: causal attention (our ``blockwise`` backend and
``torch.nn.functional.scaled_dot_product_attention(is_causal=True, enable_gqa=True)``, the
kernel behind transformers' SDPA attention) and the linear part (Q/K/V/O projections and
the SwiGLU MLP, jitted in JAX and run in torch). The best of ``--repeats`` calls after a
warm-up; prints seconds and achieved GFLOP/s per part.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from pcomp_jax.attention import blockwise_causal_attention

SMOLLM2 = dict(hidden=576, heads=9, kv_heads=3, head_dim=64, mlp=1536)


def best_time(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    e, h, kvh, d, f = (SMOLLM2[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "mlp"))
    rng = np.random.default_rng(0)
    w = {name: (rng.normal(size=shape) * 0.02).astype(np.float32) for name, shape in
         [("q", (e, h * d)), ("k", (e, kvh * d)), ("v", (e, kvh * d)), ("o", (h * d, e)),
          ("gate", (e, f)), ("up", (e, f)), ("down", (f, e))]}
    wj = {k: jnp.asarray(v) for k, v in w.items()}
    wt = {k: torch.from_numpy(v) for k, v in w.items()}

    @jax.jit
    def linear_jax(x, attn_out):
        qkv = (x @ wj["q"], x @ wj["k"], x @ wj["v"])
        y = x + attn_out @ wj["o"]
        return qkv, y + (jax.nn.silu(y @ wj["gate"]) * (y @ wj["up"])) @ wj["down"]

    def linear_torch(x, attn_out):
        with torch.no_grad():
            qkv = (x @ wt["q"], x @ wt["k"], x @ wt["v"])
            y = x + attn_out @ wt["o"]
            return qkv, y + (torch.nn.functional.silu(y @ wt["gate"]) * (y @ wt["up"])) @ wt["down"]

    attention_jax = jax.jit(blockwise_causal_attention)
    print("| T | part | ours s | torch s | ours GFLOP/s | torch GFLOP/s | torch / ours |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for t in args.lengths:
        x = rng.normal(size=(t, e)).astype(np.float32)
        a = rng.normal(size=(t, h * d)).astype(np.float32)
        q, k, v = (rng.normal(size=(1, t, n, d)).astype(np.float32) for n in (h, kvh, kvh))
        xj, aj, qj, kj, vj = map(jnp.asarray, (x, a, q, k, v))
        xt, at = torch.from_numpy(x), torch.from_numpy(a)
        qt, kt, vt = (torch.from_numpy(z).transpose(1, 2).contiguous() for z in (q, k, v))  # [1, heads, T, D]

        def torch_attention():
            with torch.no_grad():
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

        parts = {
            "attention": (2 * 2 * t * (t + 1) / 2 * h * d,
                          lambda: attention_jax(qj, kj, vj).block_until_ready(), torch_attention),
            "linear": (2 * t * (e * h * d * 2 + e * kvh * d * 2 + 3 * e * f),
                       lambda: jax.block_until_ready(linear_jax(xj, aj)), lambda: linear_torch(xt, at)),
        }
        for name, (flops, ours, theirs) in parts.items():
            t_ours, t_theirs = best_time(ours, args.repeats), best_time(theirs, args.repeats)
            print(f"| {t} | {name} | {t_ours:.3f} | {t_theirs:.3f} | {flops / t_ours / 1e9:.0f} | "
                  f"{flops / t_theirs / 1e9:.0f} | {t_theirs / t_ours:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
