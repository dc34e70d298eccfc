"""Numerical bounds for the suite's comparisons, each derived from a stated rounding model.

Two float32 evaluations of the same function (another device count, blocking, backend,
library, CPU instruction set) differ only in the order and grouping of their sums. In the
probabilistic rounding model (Higham and Mary, "A new approach to probabilistic rounding
error analysis", 2019) a sum of ``n`` products errs by about ``sqrt(n) * u`` relative to
the magnitude of its terms, ``u = 2**-24`` the float32 unit roundoff; a stack of
``depth`` such reductions (layers) adds its errors. So two evaluations differ by at most

    float32_bound(scale, reduction=n, depth=d) = MARGIN * d * sqrt(n) * u * scale

with ``scale`` the magnitude of the compared values (``max |expected|``) and ``n`` the
longest reduction feeding them (hidden width, MLP width or row length). ``MARGIN`` covers
the spread measured across CPUs: every comparison of the suite was logged with XLA at its
native instruction set (AVX-512 with bf16 units) and limited to AVX2
(``XLA_FLAGS=--xla_cpu_max_isa=AVX2``, PyTorch with ``ATEN_CPU_CAPABILITY=avx2``); the
largest measured difference was 2.6 times ``d * sqrt(n) * u * scale`` (the GGUF logits
against transformers', AVX2), and MARGIN = 8 is three times that (docs/testing.md).

``PCOMP_BOUNDS_LOG=<file>`` makes every comparison append its ratio (measured / bound) to
the file, which is how the table in docs/testing.md is made.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

U32 = 2.0**-24  # float32 unit roundoff (half the machine epsilon)
U_BF16 = 2.0**-8  # bfloat16 unit roundoff: 8 significand bits
MARGIN = 8.0


def float32_bound(scale: float, *, reduction: int, depth: int = 1) -> float:
    """The largest difference allowed between two float32 evaluations of one function:
    ``MARGIN * depth * sqrt(reduction) * U32 * scale`` (module docstring)."""
    return MARGIN * depth * math.sqrt(reduction) * U32 * float(scale)


def model_bound(cfg, scale: float, *, row_len: int = 1) -> float:
    """``float32_bound`` for a model's outputs (logits, keys, NLLs): ``depth`` = layers + the
    head, ``reduction`` = the longest of the hidden width, the MLP width and the row."""
    return float32_bound(scale, reduction=max(cfg.hidden_size, cfg.intermediate_size, row_len),
                         depth=cfg.num_layers + 1)


def assert_within(actual, expected, bound: float, what: str = "values") -> None:
    """``max |actual - expected| <= bound`` elementwise (shapes equal; infinities equal where the
    expected values are infinite, such as masked scores), with the measured ratio
    to the bound in the failure message and, with ``PCOMP_BOUNDS_LOG``, appended to that file."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shapes {actual.shape} and {expected.shape}"
    finite = np.isfinite(expected)
    assert np.array_equal(np.isfinite(actual), finite), f"{what}: not finite where the expected values are finite"
    assert (actual[~finite] == expected[~finite]).all(), f"{what}: other infinities or NaNs than expected"
    worst = float(np.abs(actual - expected)[finite].max()) if finite.any() else 0.0
    log = os.environ.get("PCOMP_BOUNDS_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(log, "a") as f:
            f.write(json.dumps({"test": test, "what": what, "diff": worst, "bound": bound,
                                "ratio": worst / bound if bound else None}) + "\n")
    assert worst <= bound, f"{what}: max |difference| {worst:.3g} exceeds the bound {bound:.3g} ({worst / bound:.2f}x)"


def scale_of(values) -> float:
    """``max |values|``: the magnitude a bound is relative to."""
    return float(np.abs(np.asarray(values, np.float64)).max())


def nll_bound(cfg, nll, *, row_len: int = 1) -> float:
    """``model_bound`` for negative log-likelihoods (chunk scores, token NLLs): an NLL is
    ``logsumexp(z) - z_y`` over the logits ``z``, so it errs as the logits do; their magnitude
    is taken as ``max |nll| + log(vocab)`` (the NLL of the largest logit's competitors)."""
    return model_bound(cfg, scale_of(nll) + math.log(cfg.vocab_size), row_len=row_len)


def attention_bound(q, k, v) -> float:
    """``float32_bound`` for causal attention outputs ``softmax(q k^T / sqrt(d)) v`` of
    ``q [B, T, H, d]``, ``k, v [B, T, KVH, d]``: two reductions (the scores over ``d``, the
    weighted sum over ``T``); a relative error ``e`` of a score ``s`` moves its softmax weight
    by about ``e * |s|``, so the scale is ``max |v| * (1 + max |s|)``."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    scores = np.einsum("bthd,bshd->bhts", q, np.repeat(k, group, axis=2)) / math.sqrt(q.shape[-1])
    return float32_bound(scale_of(v) * (1 + scale_of(scores)), reduction=max(q.shape[1], q.shape[-1]), depth=2)


BF16_MARGIN = 8.0


def bfloat16_bound(scale: float, *, depth: int) -> float:
    """The largest difference allowed between a model's bfloat16 (mixed precision: bfloat16
    weights and dot inputs, float32 accumulation) and float32 outputs of magnitude ``scale``:
    ``BF16_MARGIN * sqrt(depth) * U_BF16 * scale``. Each layer's dots take inputs rounded
    to 8 significant bits (relative error ``U_BF16``) and those roundings are independent
    from layer to layer, so over ``depth`` layers they add as a random walk. Applied to mean
    errors with the mean magnitude, and to the largest error with the largest magnitude.
    Measured (docs/testing.md): ratios of at most 2.8 (means, this package's and
    transformers' bfloat16 models) and 4.5 (maxima) to ``sqrt(depth) * U_BF16 * scale`` on
    the tiny models and the default model, the same at both instruction sets."""
    return BF16_MARGIN * math.sqrt(depth) * U_BF16 * float(scale)


def assert_bfloat16_close(bf16, f32, *, depth: int, what: str = "bfloat16 logits") -> None:
    """``bf16`` within ``bfloat16_bound`` of ``f32``: the mean difference against the mean
    magnitude and the largest difference against the largest magnitude."""
    bf16, f32 = np.asarray(bf16, np.float64), np.asarray(f32, np.float64)
    mean_bound = bfloat16_bound(np.abs(f32).mean(), depth=depth)
    mean = float(np.abs(bf16 - f32).mean())
    assert mean <= mean_bound, f"{what}: mean |difference| {mean:.3g} exceeds the bound {mean_bound:.3g}"
    assert_within(bf16, f32, bfloat16_bound(scale_of(f32), depth=depth), what)
