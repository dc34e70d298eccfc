"""Peak device memory of a run, estimated before it runs (``python -m pcomp_jax.generate --dry-run``).

The estimate compiles the run's stages for its exact shapes and shardings without running
them or reading the weights (``jax.jit(...).lower(abstract inputs).compile()``), and reads
XLA's buffer plan (``memory_analysis``), per device: the weights, the running selection
(the kept chunk caches, with one group's candidates beside them while they are merged),
and the largest of the stages: one group of chunk rows through every layer
(``prefill.prefill_group``, with the configured attention backend), the question on the
merged cache (``decode.question_prefill``) and the decoding loop (``decode.greedy_decode``).
A one-row method (``full``, ``truncate``) has the row prefill and decoding. Not counted:
a second chunk group in flight (the loop keeps at most two), the input cache beside the
decoding loop's, and ``merge_layout=reprefill``'s one-row re-read (estimated as the
merged question prefill).
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from .buckets import bucket_length
from .chunking import PromptParts
from .decode import decode_budget, decode_jit, pad_ids, question_prefill
from .errors import PcompError
from .methods import get_method
from .prefill import empty_selection, prefill_group, rows_per_group

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device. stages: name -> the stage's temporaries and outputs."""

    weights: int
    selection: int
    stages: dict
    device_limit: int | None  # what the device offers (None: unknown)
    device: str

    @property
    def peak(self) -> int:
        return self.weights + self.selection + max(self.stages.values())

    def fits(self) -> bool:
        return self.device_limit is None or self.peak <= self.device_limit

    def table(self) -> str:
        rows = [("weights", self.weights), ("kept chunk caches (running selection)", self.selection)]
        rows += [(f"stage: {name}", size) for name, size in self.stages.items()]
        rows.append(("estimated peak: weights + selection + largest stage", self.peak))
        lines = [f"{name:<52} {size / 2**20:12,.1f} MiB" for name, size in rows]
        limit = "unknown" if self.device_limit is None else f"{self.device_limit / 2**20:12,.1f} MiB"
        lines.append(f"{'available on ' + self.device:<52} {limit}")
        return "\n".join(lines)

    def check(self, config) -> None:
        """Raises ``PcompError`` naming what to change when the estimate exceeds the device."""
        if self.fits():
            return
        raise PcompError(
            f"estimated peak memory {self.peak / GIB:.2f} GiB per device exceeds the {self.device_limit / GIB:.2f} GiB "
            f"available on {self.device}; lower group_size (now {config.group_size}), set or lower capacity (now "
            f"{config.capacity}), shorten chunk_len (now {config.chunk_len}), use dtype bfloat16, or spread the run "
            "over more devices (num_devices, model_parallel)")


def device_memory_limit(device) -> int | None:
    """Bytes the device offers: its allocator's limit, or on the CPU the host's available memory."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            return int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def _abstract(tree, shardings):
    """``tree`` as ``jax.ShapeDtypeStruct`` leaves placed by ``shardings`` (nothing is copied)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of ``tree`` (arrays or ``ShapeDtypeStruct`` with shardings)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def _stage_bytes(compiled) -> int:
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise PcompError("this JAX backend gives no memory analysis of compiled programs; no estimate can be made")
    return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def estimate_memory(model, parts: PromptParts, config, max_new_tokens: int) -> MemoryEstimate:
    """The peak device memory of ``answer_parts(model, parts, config, max_new_tokens)``, per device."""
    from .pipeline import (
        calibration_rules, context_rows, merge_layout, model_mesh, stage_rules,
    )
    from .sharding import rules_for, shardings

    cfg = model.config
    method = get_method(config.method)
    mesh = model_mesh(model, config)
    rules = rules_for(cfg, mesh)
    weights = _abstract(model.params, shardings(model.params, mesh, rules))
    parts = method.fit(parts, cfg.window, max_new_tokens)
    steps = decode_budget(max_new_tokens)
    stops = jax.ShapeDtypeStruct((1,), jnp.int32)
    one = jax.ShapeDtypeStruct((1,), jnp.int32)
    device = mesh.local_devices[0]
    if method.plain_row:
        from .decode import _prefill_prompt

        length = len(parts.prefix) + len(parts.context) + len(parts.question)
        tokens = jax.ShapeDtypeStruct((1, bucket_length(length, minimum=64)), jnp.int32)
        prompt = _prefill_prompt.lower(weights, cfg, tokens, jax.ShapeDtypeStruct((), jnp.int32), steps).compile()
        cache = jax.eval_shape(lambda w, t: _prefill_prompt(w, cfg, t, jnp.int32(length), steps)[0], weights, tokens)
        decoding = decode_jit.lower(weights, cfg, cache, one, one, stops, steps, jax.ShapeDtypeStruct((), jnp.int32)
                                    ).compile()
        stages = {"one row": _stage_bytes(prompt), "decoding": _stage_bytes(decoding)}
        return MemoryEstimate(per_device_bytes(weights), 0, stages, device_memory_limit(device), str(device))

    all_rules = calibration_rules(config, cfg.num_layers)
    spec = method.prefill_spec(config, stage_rules(all_rules, "chunk"))
    rows = context_rows(model, parts, config, method)
    group = rows.groups(rows_per_group(config.group_size, rows.num_chunks, mesh))[0]
    chunk = prefill_group.lower(weights, cfg, _abstract(group, shardings(group, mesh)), spec).compile()
    top_k = method.kept_chunks(config, rows.num_chunks)
    kept = spec.kept_tokens(rows)
    selection = jax.eval_shape(lambda: empty_selection(cfg, top_k, kept, model.dtype))
    candidates = jax.eval_shape(lambda: empty_selection(cfg, top_k + group.tokens.shape[0], kept, model.dtype))
    prefix = jax.ShapeDtypeStruct((cfg.num_layers, len(parts.prefix), cfg.num_kv_heads, cfg.head_dim), model.dtype)
    question = jax.ShapeDtypeStruct(pad_ids(parts.question, minimum=16).shape, jnp.int32)
    options = dict(merged_rules=tuple(stage_rules(all_rules, "merged")), layout=merge_layout(model, config),
                   eviction=method.stage_eviction(config), decode_eviction=method.decode_eviction(config))
    length = jax.ShapeDtypeStruct((), jnp.int32)
    merged = question_prefill.lower(weights, cfg, prefix, prefix, selection, question, length, steps,
                                    **options).compile()
    cache = jax.eval_shape(lambda w, p, s, q: question_prefill(w, cfg, p, p, s, q, jnp.int32(1), steps, **options)[0],
                           weights, prefix, selection, question)
    decoding = decode_jit.lower(weights, cfg, cache, one, one, stops, steps, length,
                                options["decode_eviction"]).compile()
    stages = {"chunk group": _stage_bytes(chunk), "question on the merged cache": _stage_bytes(merged),
              "decoding": _stage_bytes(decoding)}
    return MemoryEstimate(per_device_bytes(weights), per_device_bytes(candidates), stages,
                          device_memory_limit(device), str(device))
