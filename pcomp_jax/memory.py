"""Peak device memory of a run, estimated before it runs (``python -m pcomp_jax.generate --dry-run``).

The estimate compiles the run's stages for its exact shapes and shardings without running
them or reading the weights (``jax.jit(...).lower(abstract inputs).compile()``), reads
XLA's buffer plan of each (``memory_analysis``: temporaries + outputs, per device) and adds
up what is alive at once. Three terms:

- the weights, as the run holds them;
- the selection: what the chunk prefill keeps to the end of the run, the running top-k's
  chunk caches (keys and values ``[L, k, cap, KVH, D]``, kept positions ``[L, k, KVH,
  cap]``) and P's cache (keys and values ``[L, P, KVH, D]``); 0 for a one-row method;
- the largest phase: each phase is the combination of buffers alive at once at its worst
  moment, beside the weights and the selection. For a chunked method, in run order:

  * ``chunk group prefill``: one group of G chunk rows through every layer
    (``prefill.prefill_group`` with the configured attention backend: its temporaries and
    its G candidates ``[L, G, cap, KVH, D]``), beside the empty selection the loop started
    from (``prefill.select_chunks`` holds it until the loop ends) and the second group in
    flight: ``prefill.for_each_group`` dispatches group g+1 before it waits for group g,
    and group g+2's rows ``[G, R]`` are placed while g+1 runs; group g's top-k update runs
    just before g+1's prefill, and the runtime releases its buffers (g's candidates, the
    selection it replaced, its temporaries) asynchronously, after g+1's prefill may have
    started (measured on the CPU: the peak exceeds the buffers without them by up to 13
    MiB of their 14 MiB, ``random-small`` at 32K tokens). So: two groups' rows, the group
    before's candidates and top-k update, and this group's prefill (one group: none of
    the group before's);
  * ``running top-k update``: ``prefill.keep_best_chunks`` on a group's candidates (their
    input, its temporaries, the new selection), beside the empty starting selection and
    the next group's rows;
  * ``question on the merged cache``: ``merge.question_prefill`` (temporaries and the
    merged cache it returns, ``[L, 1, S, KVH, D]``, with its entries' positions ``[L, 1, S,
    KVH]`` int32 for a model with sliding-window layers: part of the compiled outputs, so
    counted here and in ``decoding``), or with ``merge_layout=reprefill``
    ``re-read row``: the kept chunks read again as one row P + chunks + Q
    (``decode._prefill_prompt`` on the longest such row, P + the top_k longest chunks + Q,
    bucketed), which returns the row's cache;
  * ``decoding``: the loop (``decode.greedy_decode``: temporaries, the token buffer and
    its own cache) with its input cache beside it (the question prefill's or the re-read
    row's, held by the caller while the loop runs: the loop copies it).

  A one-row method (``full``, ``truncate``) has ``one row`` (its prefill and cache) and
  ``decoding`` (the loop and the row's cache), with the weights as loaded.

What XLA's plan does not see is covered by a stated margin, ``MARGIN_FRACTION`` of the
estimate plus ``MARGIN_BYTES``: the runtime's own scratch (cuBLAS/cuDNN workspaces and
the compiler's autotuning buffers on a GPU; on the CPU about 8 MiB beside the default
model's chunk group prefill), frees that lag behind the last program reading a buffer,
the allocator's rounding and fragmentation, and small arrays (token ids, stop ids, scores).
``fits``/``check`` compare estimate + margin with what the device offers
(``device_memory_limit``: its allocator's limit; on the CPU the host's available memory
plus the loaded weights already in it, when one device runs).
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from .chunking import PromptParts
from .decode import DecodeState, _prefill_prompt, decode_budget, decode_jit, pad_ids
from .errors import PcompError
from .merge import ContextCache, question_prefill
from .plans import plan
from .prefill import empty_selection, keep_best_chunks, prefill_group, rows_per_group

GIB = 2**30
MIB = 2**20

# The margin the check adds to the estimate. 10%: the allocator's rounding and fragmentation
# (a BFC allocator rounds each buffer up and cannot always reuse a freed block for a larger
# one) and buffers freed a little later than XLA's plan assumes (frees wait for the programs
# that read them). 64 MiB: fixed allowances outside any buffer plan (cuBLAS/cuDNN
# workspaces, about 32 MiB on a Hopper GPU; the runtime's scratch; token and stop ids).
MARGIN_FRACTION = 0.10
MARGIN_BYTES = 64 * MIB


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device.

    weights: the weights as the run holds them. selection: the kept chunk caches and P's
    cache, held from the chunk prefill to the end (0 for a one-row method). phases: phase
    name -> {buffer name: bytes}, the buffers alive at once at the phase's worst moment
    beside the weights and the selection (see the module docstring), in run order.
    device_limit: what the device offers (None: unknown); device: its name.
    """

    weights: int
    selection: int
    phases: dict
    device_limit: int | None
    device: str

    @property
    def phase_totals(self) -> dict:
        """Phase name -> bytes of its buffers alive at once."""
        return {name: sum(parts.values()) for name, parts in self.phases.items()}

    @property
    def largest_phase(self) -> str:
        totals = self.phase_totals
        return max(totals, key=totals.get)

    @property
    def peak(self) -> int:
        """The estimate: weights + selection + the largest phase."""
        return self.weights + self.selection + self.phase_totals[self.largest_phase]

    @property
    def margin(self) -> int:
        """The safety margin: ``MARGIN_FRACTION`` of the estimate + ``MARGIN_BYTES``."""
        return math.ceil(MARGIN_FRACTION * self.peak) + MARGIN_BYTES

    @property
    def checked(self) -> int:
        """What the check compares with the device: the estimate + the margin."""
        return self.peak + self.margin

    def fits(self) -> bool:
        return self.device_limit is None or self.checked <= self.device_limit

    def table(self) -> str:
        """The breakdown, one line per term, MiB per device."""
        line = lambda name, size: f"{name:<74} {size / MIB:12,.1f} MiB"
        lines = [line("weights", self.weights), line("kept chunk caches and P's cache (selection)", self.selection)]
        for name, parts in self.phases.items():
            lines.append(f"phase: {name} (alive at once)")
            lines += [line("  " + part, size) for part, size in parts.items()]
            lines.append(line("  = phase total", sum(parts.values())))
        lines.append(line(f"estimated peak: weights + selection + largest phase ({self.largest_phase})", self.peak))
        lines.append(line(f"safety margin: {MARGIN_FRACTION:.0%} + {MARGIN_BYTES / MIB:.0f} MiB "
                          "(allocator, runtime workspaces)", self.margin))
        lines.append(line("checked against the device: estimated peak + margin", self.checked))
        limit = f"{'unknown':>12}" if self.device_limit is None else f"{self.device_limit / MIB:12,.1f} MiB"
        lines.append(f"{'available on ' + self.device:<74} {limit}")
        return "\n".join(lines)

    def check(self, config) -> None:
        """Raises ``PcompError`` naming what to change when estimate + margin exceed the device."""
        if self.fits():
            return
        if "one row" in self.phases:
            change = ("use a chunked method (method=parallelcomp), a shorter input, dtype bfloat16, or a device "
                      "with more memory")
        else:
            change = (f"lower group_size (now {config.group_size}), set or lower capacity (now {config.capacity}), "
                      f"shorten chunk_len (now {config.chunk_len}), use dtype bfloat16, or spread the run over more "
                      "devices (num_devices, model_parallel)")
        raise PcompError(
            f"estimated peak memory {self.peak / GIB:.2f} GiB per device plus a safety margin of "
            f"{self.margin / GIB:.2f} GiB ({self.checked / GIB:.2f} GiB) exceeds the {self.device_limit / GIB:.2f} GiB "
            f"available on {self.device}; {change}")


def device_memory_limit(device, resident: int = 0) -> int | None:
    """Bytes the device offers: its allocator's limit, or on the CPU the host's available
    memory plus ``resident``, the bytes of the estimate already in host memory (the loaded
    weights, which the available memory no longer counts)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            return int(info["MemAvailable"].split()[0]) * 1024 + resident
        except (OSError, KeyError, ValueError):
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def _abstract(tree, shardings):
    """``tree`` as ``jax.ShapeDtypeStruct`` leaves placed by ``shardings`` (nothing is copied)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def _as_placed(tree):
    """Arrays (or ``ShapeDtypeStruct``) as ``ShapeDtypeStruct`` with their own shardings, no layouts."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of ``tree`` (arrays or ``ShapeDtypeStruct`` with shardings)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def _stage_bytes(compiled) -> int:
    """A compiled program's temporaries + outputs, per device (XLA's ``memory_analysis``)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise PcompError("this JAX backend gives no memory analysis of compiled programs; no estimate can be made")
    return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def _row_phases(params, cfg, length: int, steps: int, name: str) -> dict:
    """The phases of one full-attention row of ``length`` tokens (``decode.generate_ids``):
    ``name``, its prefill (tokens ``[1, Tb]``, Tb the bucket of ``length``) returning its
    cache ``[L, 1, Tb + steps, KVH, D]``, and ``decoding`` with that cache as the loop's input."""
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    one = jax.ShapeDtypeStruct((1,), jnp.int32)
    tokens = jax.ShapeDtypeStruct((1, len(pad_ids(np.zeros(length, np.int32)))), jnp.int32)
    prompt = _prefill_prompt.lower(params, cfg, tokens, scalar, steps).compile()
    cache = _as_placed(prompt.out_info[0])
    start = jax.eval_shape(lambda c: DecodeState.start(c, jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32), steps),
                           cache)
    decoding = decode_jit.lower(params, cfg, start, one, scalar).compile()
    return {
        name: {"the row's token ids": per_device_bytes(tokens),
               "row prefill: temporaries + the row's cache out": _stage_bytes(prompt)},
        "decoding": {"the row's cache (the loop's input)": per_device_bytes(cache),
                     "decoding loop: temporaries + tokens and cache out": _stage_bytes(decoding)},
    }


def _abstract_context(model, plan_, parts: PromptParts, rules) -> ContextCache:
    """The abstract ``ContextCache`` stage 1 leaves for ``parts`` (fitted) under ``plan_``:
    P's keys and values and the kept chunks' selection, placed as the run places them."""
    from .sharding import shardings

    cfg, rows = model.config, plan_.rows(parts)
    selection = jax.eval_shape(lambda: empty_selection(cfg, plan_.top_k(rows.num_chunks),
                                                       plan_.prefill.kept_tokens(rows), model.dtype))
    selection = _abstract(selection, shardings(selection, plan_.mesh(), rules))
    prefix = jax.ShapeDtypeStruct((cfg.num_layers, len(parts.prefix), cfg.num_kv_heads, cfg.head_dim), model.dtype)
    return ContextCache(prefix, prefix, selection)


def _held_bytes(context: ContextCache) -> int:
    """Bytes per device held from the chunk prefill to the end: the selection and P's cache."""
    return per_device_bytes(context.selection) + 2 * per_device_bytes(context.prefix_keys)


def estimate_memory(model, parts: PromptParts, config, max_new_tokens: int) -> MemoryEstimate:
    """The peak device memory of ``answer_parts(model, parts, config, max_new_tokens)``, per device."""
    from .sharding import rules_for, shardings

    cfg = model.config
    plan_ = plan(model, config)
    mesh = plan_.mesh()
    device = mesh.local_devices[0]
    parts = plan_.fit(parts, max_new_tokens)
    steps = decode_budget(max_new_tokens)
    if plan_.plain_row:  # the row runs on the weights as loaded (``decode.generate_ids``)
        loaded = _as_placed(model.params)
        length = len(parts.prefix) + len(parts.context) + len(parts.question)
        phases = _row_phases(loaded, cfg, length, steps, "one row")
        weights = per_device_bytes(loaded)
        return MemoryEstimate(weights, 0, phases, device_memory_limit(device, weights), str(device))

    rules = rules_for(cfg, mesh)
    weights = _abstract(model.params, shardings(model.params, mesh, rules))
    spec = plan_.prefill
    rows = plan_.rows(parts)
    groups = rows.groups(rows_per_group(plan_.config.group_size, rows.num_chunks, mesh))
    group = _abstract(groups[0], shardings(groups[0], mesh))
    chunk = prefill_group.lower(weights, cfg, group, spec).compile()
    candidates = _as_placed(chunk.out_info)
    top_k = plan_.top_k(rows.num_chunks)
    context = _abstract_context(model, plan_, parts, rules)
    selection = context.selection
    update = keep_best_chunks.lower(selection, candidates, top_k).compile()
    rows_bytes, selection_bytes = per_device_bytes(group), per_device_bytes(selection)
    candidates_bytes, update_bytes = per_device_bytes(candidates), _stage_bytes(update)
    second = len(groups) > 1  # a second group in flight
    phases = {
        "chunk group prefill": {
            "the empty starting selection (held until the loop ends)": selection_bytes,
            "rows of the running group and the next one (2 x [G, R])": (1 + second) * rows_bytes,
            "the group before's G candidates (released after its top-k update)": second * candidates_bytes,
            "the group before's top-k update: temporaries + the selection it replaced": second * update_bytes,
            "group prefill: temporaries + its G candidates out": _stage_bytes(chunk),
        },
        "running top-k update": {
            "the empty starting selection (held until the loop ends)": selection_bytes,
            "the next group's rows [G, R]": second * rows_bytes,
            "the group's G candidates (input)": candidates_bytes,
            "top-k update: temporaries + the new selection out": update_bytes,
        },
    }
    if plan_.merge.layout.reprefills:  # P + the kept chunks + Q as one row, on the weights as loaded (``generate_ids``)
        longest = sorted((e - s for s, e in plan_.chunk_bounds(parts)), reverse=True)[:top_k]
        length = len(parts.prefix) + sum(longest) + len(parts.question)
        phases.update(_row_phases(_as_placed(model.params), cfg, length, steps, "re-read row (merge_layout=reprefill)"))
    else:
        question = jax.ShapeDtypeStruct(pad_ids(parts.question, minimum=16).shape, jnp.int32)
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        one = jax.ShapeDtypeStruct((1,), jnp.int32)
        merged = question_prefill.lower(weights, cfg, context, question, scalar, plan_.merge, num_steps=steps).compile()
        state = _as_placed(merged.out_info)
        decoding = decode_jit.lower(weights, cfg, state, one, scalar, plan_.merge.decode_eviction).compile()
        phases["question on the merged cache"] = {
            "question prefill: temporaries + the merged cache out": _stage_bytes(merged)}
        phases["decoding"] = {
            "the merged cache (the loop's input)": per_device_bytes(state),
            "decoding loop: temporaries + tokens and cache out": _stage_bytes(decoding)}
    held = _held_bytes(context)
    placed = per_device_bytes(weights)
    resident = placed if mesh.size == 1 else 0  # on one device the run uses the loaded weights as they are
    return MemoryEstimate(placed, held, phases, device_memory_limit(device, resident), str(device))


def estimate_batch_memory(model, inputs: list[PromptParts], config, max_new_tokens: int) -> MemoryEstimate:
    """The peak device memory of ``document.answer_parts_batch(model, inputs, config,
    max_new_tokens)`` (one batch), per device.

    Stage 1 runs request by request (in shared groups): its phases are those of the request
    with the widest chunk rows (``estimate_memory``). What is held grows with the batch:
    every request's kept chunk caches and P's cache stay until the batch's stage 2 (the
    selection term is their sum). Stage 2 is one program for the batch
    (``merge.generate_batch``): ``batched question`` (the requests' merged caches laid into
    a common number of slots, and the question prefill over them) and ``batched decoding``
    (the loop beside its input cache). A one-row method, or a plan whose stage 2 does not
    batch (``merge.batches``), answers one by one: the largest single estimate."""
    from .decode import stop_token_ids
    from .merge import _merged_into, _question_batch, batch_shapes, batches, stack_batch
    from .sharding import rules_for, shardings

    inputs = list(inputs)
    if not inputs:
        raise PcompError("estimate_batch_memory needs at least one request")
    plan_ = plan(model, config)
    if len(inputs) == 1:
        return estimate_memory(model, inputs[0], config, max_new_tokens)
    if plan_.plain_row or not batches(plan_.merge):  # answered one by one
        return max((estimate_memory(model, parts, config, max_new_tokens) for parts in inputs), key=lambda e: e.peak)
    fitted = [plan_.fit(parts, max_new_tokens) for parts in inputs]
    widest = max(range(len(inputs)), key=lambda i: (len(fitted[i].prefix) + len(fitted[i].question), i))
    single = estimate_memory(model, inputs[widest], config, max_new_tokens)
    cfg, mesh = model.config, plan_.mesh()
    rules = rules_for(cfg, mesh)
    weights = _abstract(model.params, shardings(model.params, mesh, rules))
    contexts = [_abstract_context(model, plan_, parts, rules) for parts in fitted]
    held = sum(_held_bytes(context) for context in contexts)
    size, qb, capacity, steps = batch_shapes(contexts, [parts.question for parts in fitted], max_new_tokens)
    merged = [jax.eval_shape(lambda c: _merged_into(c, cfg, plan_.merge, capacity), c) for c in contexts]
    fill = list(range(len(contexts))) + [len(contexts) - 1] * (size - len(contexts))
    cache = jax.eval_shape(lambda *caches: stack_batch(list(caches)), *[merged[i][0] for i in fill])
    rows_of = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype)
    question = _question_batch.lower(weights, cfg, cache, rows_of((size,)), rows_of((size, qb)), rows_of((size,)),
                                     rows_of((size,), jnp.bool_), num_steps=steps).compile()
    state = _as_placed(question.out_info)
    stops = rows_of((max(1, len(stop_token_ids(model))),))
    decoding = decode_jit.lower(weights, cfg, state, stops, rows_of(()), None).compile()
    phases = {name: parts for name, parts in single.phases.items()
              if name in ("chunk group prefill", "running top-k update")}
    phases["batched question"] = {
        f"the requests' merged caches and the {size}-row batch laid out from them (both held)":
            2 * per_device_bytes(cache),
        "question prefill of the batch: temporaries + the caches out": _stage_bytes(question)}
    phases["batched decoding"] = {
        "the batch's cache (the loop's input)": per_device_bytes(state),
        "decoding loop: temporaries + tokens and cache out": _stage_bytes(decoding)}
    return MemoryEstimate(single.weights, held, phases, single.device_limit, single.device)
