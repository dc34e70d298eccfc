"""Slow, plain-NumPy reference of the ParallelComp inference pipeline (float64).

Independent of the ``pcomp_jax`` package: it reads a Hugging Face Llama-family
checkpoint (Llama, Qwen2, Qwen3, Gemma 3) directly and follows the method (ParallelComp, arXiv 2502.14317, as the
package's docstrings describe its stages) step by step, with loops where that keeps it
obvious. Used by tests to check the JAX implementation.

Shape letters: T tokens, E hidden size, V vocabulary, H query heads, KVH KV heads,
D head dim, G = H // KVH query heads per KV head, M cached tokens.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from safetensors.numpy import load_file


# ----------------------------------------------------------------------------
# Model loading
# ----------------------------------------------------------------------------


def load_reference_model(hf_dir):
    """Load ``hf_dir/config.json`` and ``hf_dir/model.safetensors`` as float64.

    Returns a dict with the hyper-parameters (E, H, KVH, D, L, eps, theta) and
    ``weights``: name -> float64 array, in the Hugging Face names and layouts
    (linear weights [out, in], applied as ``x @ W.T``); and the family's features:
    ``gemma`` (norms scale by 1 + w, norms after attention and MLP, embeddings times
    sqrt(E), a GELU-tanh MLP), ``qk_norm`` (an RMSNorm over each query and key head
    before RoPE), ``scale`` (the attention's score scale), ``windows`` (per layer: 0 for a
    global layer, w for a local one: a query sees a key iff causal and their positions
    differ by less than w) and ``ropes`` (per layer: (theta, linear factor)).
    """
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    raw = load_file(os.path.join(hf_dir, "model.safetensors"))
    weights = {name: np.asarray(t, dtype=np.float64) for name, t in raw.items()}
    if "lm_head.weight" not in weights:
        # Tied embeddings (or a checkpoint that just leaves lm_head out).
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]

    num_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        theta = rope["rope_theta"]
    else:
        theta = cfg.get("rope_theta", 10000.0)
    arch = (cfg.get("architectures") or ["?"])[0]
    gemma = arch == "Gemma3ForCausalLM"
    n_layers = cfg["num_hidden_layers"]
    ropes = [(float(theta), 1.0)] * n_layers
    windows = [0] * n_layers
    if gemma:
        params = cfg.get("rope_parameters") or {}
        full, local = params["full_attention"], params["sliding_attention"]
        types = cfg["layer_types"]
        windows = [cfg["sliding_window"] if t == "sliding_attention" else 0 for t in types]
        as_rope = lambda r: (float(r["rope_theta"]), float(r.get("factor", 1.0)) if r.get("rope_type") == "linear" else 1.0)
        ropes = [as_rope(local) if t == "sliding_attention" else as_rope(full) for t in types]
        for name in list(weights):  # Gemma's RMSNorm scales by 1 + w
            if name.endswith("norm.weight"):
                weights[name] = weights[name] + 1.0
    return {
        "config": cfg,
        "gemma": gemma,
        "qk_norm": arch in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"),
        "scale": cfg["query_pre_attn_scalar"] ** -0.5 if gemma else head_dim**-0.5,
        "windows": windows,
        "ropes": ropes,
        "E": cfg["hidden_size"],
        "H": num_heads,
        "KVH": cfg.get("num_key_value_heads") or num_heads,
        "D": head_dim,
        "L": cfg["num_hidden_layers"],
        "eps": cfg["rms_norm_eps"],
        "theta": float(theta),
        "weights": weights,
    }


# ----------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------


def linear(model, x, name):
    """x [T, in] -> [T, out] with weight ``name.weight`` [out, in] and optional bias."""
    w = model["weights"]
    y = x @ w[name + ".weight"].T
    if name + ".bias" in w:
        y = y + w[name + ".bias"]
    return y


def rms_norm(x, weight, eps):
    """x [T, E], weight [E] -> [T, E]: x / sqrt(mean(x^2) + eps) * weight."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x):
    """Elementwise x * sigmoid(x)."""
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x):
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def log_softmax(x):
    """Log-softmax over the last axis."""
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def softmax(x):
    """Softmax over the last axis (entries equal to -inf get probability 0)."""
    return np.exp(log_softmax(x))


def rotate_half(x):
    """x [..., D] -> concat(-x[..., D/2:], x[..., :D/2])."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, positions, theta, factor=1.0):
    """Hugging Face half-split RoPE.

    x [T, n_heads, D], positions [T] int -> [T, n_heads, D], rotated per position.
    factor: linear scaling (every frequency divided by it).
    """
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim) / factor  # [D/2]
    angle = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = np.concatenate([angle, angle], axis=-1)  # [T, D]
    cos = np.cos(emb)[:, None, :]
    sin = np.sin(emb)[:, None, :]
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------
# Forward pass with an optional per-layer KV cache
# ----------------------------------------------------------------------------


def attention(q, k_all, v_all, n_past, group, keep=None, window_ok=None):
    """Causal attention of T new queries over M = n_past + T keys.

    q [T, H, D] (rotated); k_all, v_all [KVH, M, D] (keys rotated), the first
    n_past entries being the cache, the last T the new tokens themselves.
    New token j sees every cache entry and new tokens 0..j.
    keep: None, or bool [KVH, M] per-KV-head key keep-mask (calibration): with it,
    new token j of a query head in group g sees key m only when m is causally visible
    and (keep[g, m] or m is j's own key n_past + j); a query always sees itself.
    window_ok: None, or bool [KVH, T, M]: in a local layer, which keys each query's
    sliding window shows (``window_visibility``); the others are not seen.
    Returns [T, H, D].
    """
    t_new, num_heads, dim = q.shape
    total = k_all.shape[1]
    # allowed[j, m]: query j may look at key m.
    allowed = np.arange(total)[None, :] <= (n_past + np.arange(t_new))[:, None]  # [T, M]
    if keep is not None:
        is_self = np.arange(total)[None, :] == (n_past + np.arange(t_new))[:, None]  # [T, M]
    out = np.zeros_like(q)
    for h in range(num_heads):
        g = h // group
        scores = q[:, h, :] @ k_all[g].T / math.sqrt(dim)  # [T, M]
        seen = allowed if window_ok is None else allowed & window_ok[g]
        if keep is None:
            scores = np.where(seen, scores, -np.inf)
        else:
            scores = np.where(seen & (keep[g][None, :] | is_self), scores, -np.inf)
        out[:, h, :] = softmax(scores) @ v_all[g]
    return out


def window_visibility(query_positions, key_positions, window):
    """bool [KVH, T, M]: key m is inside query j's sliding window, q_pos[j] - k_pos[g, m] < window
    (causality apart); key_positions [KVH, M]; None when window is 0 (a global layer)."""
    if not window:
        return None
    q_pos = np.asarray(query_positions)[None, :, None]
    return (q_pos - np.asarray(key_positions)[:, None, :]) < window


# ----------------------------------------------------------------------------
# Stage 1c: attention-bias calibration
# ----------------------------------------------------------------------------

CALIBRATION_REGIONS = ("sink", "recent", "middle", "all")
CALIBRATION_STAGES = ("chunk", "merged")
CALIBRATION_KEYS = ("first", "last", "region", "size", "threshold", "last_queries", "stage")


def check_calibration(calibration, n_layers):
    """Validate a calibration rule list (None or list of dicts); raises ValueError.

    Each rule: first, last (0 <= first <= last < n_layers, inclusive 0-based layers),
    region in CALIBRATION_REGIONS, size >= 0 (tokens), threshold (float, tau),
    last_queries >= 1 (r), stage in CALIBRATION_STAGES.
    """
    if calibration is None:
        return
    for i, rule in enumerate(calibration):
        missing = [key for key in CALIBRATION_KEYS if key not in rule]
        if missing:
            raise ValueError(f"calibration rule {i} lacks {missing}")
        if not 0 <= int(rule["first"]) <= int(rule["last"]) < n_layers:
            raise ValueError(f"calibration rule {i}: layers [{rule['first']}, {rule['last']}] outside 0..{n_layers - 1}")
        if rule["region"] not in CALIBRATION_REGIONS:
            raise ValueError(f"calibration rule {i}: region {rule['region']!r} not in {CALIBRATION_REGIONS}")
        if rule["stage"] not in CALIBRATION_STAGES:
            raise ValueError(f"calibration rule {i}: stage {rule['stage']!r} not in {CALIBRATION_STAGES}")
        if int(rule["size"]) < 0:
            raise ValueError(f"calibration rule {i}: size must be >= 0")
        if int(rule["last_queries"]) < 1:
            raise ValueError(f"calibration rule {i}: last_queries must be >= 1")


def calibration_rules_for(calibration, layer, stage):
    """The rules of ``calibration`` (None or list of dicts) with first <= layer <= last and this stage."""
    if not calibration:
        return []
    return [r for r in calibration if r["stage"] == stage and int(r["first"]) <= layer <= int(r["last"])]


def region_members(n, region, size):
    """bool [n]: which ranks t = 0..n-1 of an n-token sequence lie in the region.

    sink: t < size; recent: t >= n - size; middle: size <= t < n - size; all: every t.
    """
    t = np.arange(n)
    if region == "sink":
        return t < size
    if region == "recent":
        return t >= n - size
    if region == "middle":
        return (t >= size) & (t < n - size)
    if region == "all":
        return np.ones(n, dtype=bool)
    raise ValueError(f"unknown calibration region {region!r}")


def calibration_masked(probs_mean, region, size, threshold, n):
    """bool [n]: the ranks 0..n-1 masked by one rule for one KV head.

    probs_mean [>= n] float: mean attention per key (only the first n entries, the
    sequence's ranks, are looked at; later entries, e.g. question tokens in the merged
    stage, can never be masked). Masked: rank in the region of an n-token sequence and
    probs_mean[rank] > threshold (strictly).
    """
    probs_mean = np.asarray(probs_mean, dtype=np.float64)
    return region_members(n, region, size) & (probs_mean[:n] > threshold)


def last_queries_mean(q, k_all, n_past, group, r, window_ok=None):
    """Mean attention of the last r new queries, per KV head, before any calibration.

    q [T, H, D] rotated new queries; k_all [KVH, M, D] rotated keys (M = n_past + T,
    the first n_past a cache, the last T the new tokens). Queries: new tokens
    T - r' .. T - 1 with r' = min(r, T); new token j sees keys 0..n_past + j.
    Returns mean [KVH, M]: for KV head g, sum over those queries and the query heads h
    with h // group == g of softmax(q . k / sqrt(D)) over visible keys (0 for keys it
    cannot see, also outside its window: ``window_ok`` as in ``attention``), divided by
    r' * group.
    """
    t_new, num_heads, dim = q.shape
    kv_heads, total, _ = k_all.shape
    r_eff = min(int(r), t_new)
    mean = np.zeros((kv_heads, total))
    for j in range(t_new - r_eff, t_new):
        visible = n_past + j + 1
        for h in range(num_heads):
            g = h // group
            scores = k_all[g, :visible] @ q[j, h] / math.sqrt(dim)
            if window_ok is not None:
                scores = np.where(window_ok[g, j, :visible], scores, -np.inf)
            mean[g, :visible] += softmax(scores)
    return mean / (r_eff * group)


def layer_calibration_mask(q, k_all, n_past, group, rules, n_seq, window_ok=None):
    """bool [KVH, n_seq]: keys masked in one layer by the union of ``rules``.

    q, k_all, n_past, group as in ``last_queries_mean`` (unmasked rotated q/k of the
    layer). The sequence is the first n_seq keys (rank = key index): the whole row in
    the chunk stage (n_past = 0, n_seq = T), the merged cache in the merged stage
    (n_seq = n_past). Each rule computes its own mean with its own r and masks
    ``calibration_masked(mean[g], region, size, threshold, n_seq)``; results are OR-ed.
    """
    kv_heads = k_all.shape[0]
    masked = np.zeros((kv_heads, n_seq), dtype=bool)
    for rule in rules:
        mean = last_queries_mean(q, k_all, n_past, group, rule["last_queries"], window_ok)
        for g in range(kv_heads):
            masked[g] |= calibration_masked(
                mean[g], rule["region"], int(rule["size"]), float(rule["threshold"]), n_seq
            )
    return masked


def stage_eviction_kept(q, k_all, n_past, group, keep, eviction, window_ok=None):
    """bool [KVH, n_past]: the merged cache entries stage eviction keeps in one layer.

    eviction: {"budget", "obs_window", "pool_kernel", "prefix_len"}. The observation queries
    are the last min(obs_window, T) new (question) tokens; each sees what ``attention`` lets
    it see (causal, ``keep``). For KV head g, s[m] = the softmax probability of key m summed
    over those queries and g's query heads. Chunk entries are cache entries prefix_len..
    n_past-1 still kept by ``keep``; s is max-pooled over them in order (``max_pool_1d``),
    and the ``budget`` best stay (ties: lower index first). Prefix entries always stay;
    entries not kept by ``keep`` stay as they are (masked). In a local layer a query sees
    only what its window shows (``window_ok``), so entries no question token sees score 0.
    """
    t_new, num_heads, dim = q.shape
    kv_heads, total = k_all.shape[0], k_all.shape[1]
    allowed = np.arange(total)[None, :] <= (n_past + np.arange(t_new))[:, None]  # [T, M]
    is_self = np.arange(total)[None, :] == (n_past + np.arange(t_new))[:, None]
    obs = range(max(0, t_new - eviction["obs_window"]), t_new)
    kept = np.ones((kv_heads, n_past), dtype=bool)
    for g in range(kv_heads):
        seen = allowed if window_ok is None else allowed & window_ok[g]
        visible = seen if keep is None else seen & (keep[g][None, :] | is_self)
        s = np.zeros(total)
        for h in range(g * group, (g + 1) * group):
            for j in obs:
                scores = np.where(visible[j], q[j, h] @ k_all[g].T / math.sqrt(dim), -np.inf)
                s += softmax(scores)
        chunk = [m for m in range(eviction["prefix_len"], n_past) if keep is None or keep[g, m]]
        pooled = max_pool_1d(s[chunk], eviction["pool_kernel"]) if chunk else np.zeros(0)
        ranked = sorted(range(len(chunk)), key=lambda i: (-pooled[i], i))
        for i in ranked[eviction["budget"]:]:
            kept[g, chunk[i]] = False
    return kept


def attention_probs(q, k_all, n_past, group, keep=None, window_ok=None):
    """[KVH, T, M]: the softmax probabilities ``attention`` gives each new query over the M
    keys (zero where not visible), summed over each KV head's query heads."""
    t_new, num_heads, dim = q.shape
    kv_heads, total = k_all.shape[0], k_all.shape[1]
    allowed = np.arange(total)[None, :] <= (n_past + np.arange(t_new))[:, None]
    is_self = np.arange(total)[None, :] == (n_past + np.arange(t_new))[:, None]
    out = np.zeros((kv_heads, t_new, total))
    for h in range(num_heads):
        g = h // group
        seen = allowed if window_ok is None else allowed & window_ok[g]
        visible = seen if keep is None else seen & (keep[g][None, :] | is_self)
        scores = np.where(visible, q[:, h, :] @ k_all[g].T / math.sqrt(dim), -np.inf)
        out[g] += softmax(scores)
    return out


def decode_evict_one(window, keep, obs_window, pool_kernel):
    """One decode-time eviction in one layer (docs/algorithm.md stage 3, dynamic eviction).

    window: [KVH, w', M] attention rows of the last queries (summed over query heads);
    keep: bool [KVH, M], the entries held. For each KV head: the held entries but the last
    ``obs_window`` held are scored by the column sums of ``window``, max-pooled over them in
    order, and the lowest (first on ties) is no longer held. Returns the evicted index per
    KV head (None where nothing could go); ``keep`` is updated in place."""
    evicted = []
    for g in range(keep.shape[0]):
        held = np.flatnonzero(keep[g])
        older = held[: max(0, len(held) - obs_window)]
        if len(older) == 0:
            evicted.append(None)
            continue
        pooled = max_pool_1d(window[g].sum(axis=0)[older], pool_kernel)
        m = int(older[int(np.argmin(pooled))])
        keep[g, m] = False
        evicted.append(m)
    return evicted


def forward(model, ids, positions, cache=None, calibration=None, stage=None, cache_keep=None, eviction=None,
            cache_positions=None):
    """Run the model on new tokens on top of an optional cache.

    ids [T] int; positions [T] int; cache: None or a list over layers of
    (k [KVH, M, D] rotated, v [KVH, M, D]). cache_positions: None (entry m sits at
    position m), or a list over layers of int [KVH, M], each entry's RoPE position, which a
    local layer's window compares with the new tokens' positions.
    calibration: None, or a list of calibration rule dicts (see ``check_calibration``);
    only the rules whose stage equals ``stage`` are applied:
      stage "chunk" (no cache; the T tokens are one row, rank = row index, n = T):
          in a layer with rules, head g's queries ignore its masked keys (a query
          always sees itself);
      stage "merged" (question prefill on a cache of M entries, rank = cache index,
          n = M): head g's masked cache entries are ignored by the new tokens in that layer.
    cache_keep: None, or a list over layers of bool [KVH, M] cache keep-masks (entries
    removed by merged-stage calibration are False); the new tokens are always kept.
    Returns (logits [T, V], per_layer) where per_layer is a list over layers of
    dicts with "q" [T, H, D] (rotated), "k" [KVH, T, D] (rotated), "v" [KVH, T, D]
    for the new tokens only (q multiplied by scale * sqrt(D), so that the q . k / sqrt(D)
    of every function here is the model's score; "k_raw": the keys after QK-norm, before
    RoPE); when calibration is not None each dict also has
    "masked" bool [KVH, n] (n = T for "chunk", M for "merged": the keys that layer's
    calibration masked, all False without matching rules) and "keep" (None, or the
    bool [KVH, M + T] keep-mask the layer's attention used).
    """
    w = model["weights"]
    num_heads, kv_heads, dim, eps = model["H"], model["KVH"], model["D"], model["eps"]
    group = num_heads // kv_heads
    ids = np.asarray(ids, dtype=np.int64)
    positions = np.asarray(positions, dtype=np.int64)
    t_new = ids.shape[0]
    if calibration is not None:
        check_calibration(calibration, model["L"])
        if stage not in CALIBRATION_STAGES:
            raise ValueError(f"calibration needs stage in {CALIBRATION_STAGES}, got {stage!r}")
        if stage == "chunk" and cache is not None:
            raise ValueError("chunk-stage calibration runs on a whole row, without a cache")
        if stage == "merged" and cache is None:
            raise ValueError("merged-stage calibration needs the merged cache")

    x = w["model.embed_tokens.weight"][ids]  # [T, E]
    if model.get("gemma"):
        x = x * math.sqrt(model["E"])
    per_layer = []
    for layer in range(model["L"]):
        pre = f"model.layers.{layer}."
        h = rms_norm(x, w[pre + "input_layernorm.weight"], eps)
        q = linear(model, h, pre + "self_attn.q_proj").reshape(t_new, num_heads, dim)
        k = linear(model, h, pre + "self_attn.k_proj").reshape(t_new, kv_heads, dim)
        v = linear(model, h, pre + "self_attn.v_proj").reshape(t_new, kv_heads, dim)
        if model.get("qk_norm"):
            q = rms_norm(q, w[pre + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, w[pre + "self_attn.k_norm.weight"], eps)
        k_raw = k.transpose(1, 0, 2)  # [KVH, T, D] before RoPE
        theta, factor = model["ropes"][layer] if "ropes" in model else (model["theta"], 1.0)
        q = apply_rope(q, positions, theta, factor) * (model.get("scale", dim**-0.5) * math.sqrt(dim))
        k = apply_rope(k, positions, theta, factor)
        k_new = k.transpose(1, 0, 2)  # [KVH, T, D]
        v_new = v.transpose(1, 0, 2)
        per_layer.append({"q": q, "k": k_new, "v": v_new, "k_raw": k_raw})

        if cache is None:
            n_past, k_all, v_all = 0, k_new, v_new
        else:
            k_past, v_past = cache[layer]
            n_past = k_past.shape[1]
            k_all = np.concatenate([k_past, k_new], axis=1)
            v_all = np.concatenate([v_past, v_new], axis=1)
        window = model.get("windows", [0] * model["L"])[layer]
        window_ok = None
        if window:
            past = np.broadcast_to(np.arange(n_past), (kv_heads, n_past)) if cache_positions is None \
                else cache_positions[layer]
            key_positions = np.concatenate([past, np.broadcast_to(positions, (kv_heads, t_new))], axis=1)
            window_ok = window_visibility(positions, key_positions, window)

        keep = None
        if cache_keep is not None and cache_keep[layer] is not None:
            keep = np.concatenate([cache_keep[layer], np.ones((kv_heads, t_new), dtype=bool)], axis=1)
        if calibration is not None:
            n_seq = t_new if stage == "chunk" else n_past
            rules = calibration_rules_for(calibration, layer, stage)
            masked = layer_calibration_mask(q, k_all, n_past, group, rules, n_seq, window_ok)
            if rules:
                full = np.zeros((kv_heads, n_past + t_new), dtype=bool)
                full[:, :n_seq] = masked  # chunk: ranks = row indices; merged: cache indices
                keep = ~full if keep is None else keep & ~full
            per_layer[-1]["masked"] = masked
            per_layer[-1]["keep"] = keep

        if eviction is not None:  # stage eviction over the merged cache, after calibration
            evict_kept = stage_eviction_kept(q, k_all, n_past, group, keep, eviction, window_ok)
            full = np.concatenate([evict_kept, np.ones((kv_heads, t_new), dtype=bool)], axis=1)
            keep = full if keep is None else keep & full
            per_layer[-1]["keep"] = keep
            per_layer[-1]["evicted"] = ~evict_kept

        per_layer[-1]["probs"] = attention_probs(q, k_all, n_past, group, keep, window_ok)  # decode eviction
        attn = attention(q, k_all, v_all, n_past, group, keep, window_ok).reshape(t_new, num_heads * dim)
        if model.get("gemma"):  # norms after attention and after the MLP; GELU-tanh
            x = x + rms_norm(linear(model, attn, pre + "self_attn.o_proj"), w[pre + "post_attention_layernorm.weight"], eps)
            h = rms_norm(x, w[pre + "pre_feedforward_layernorm.weight"], eps)
            mlp = gelu_tanh(linear(model, h, pre + "mlp.gate_proj")) * linear(model, h, pre + "mlp.up_proj")
            x = x + rms_norm(linear(model, mlp, pre + "mlp.down_proj"), w[pre + "post_feedforward_layernorm.weight"], eps)
            continue
        x = x + linear(model, attn, pre + "self_attn.o_proj")

        h = rms_norm(x, w[pre + "post_attention_layernorm.weight"], eps)
        mlp = silu(linear(model, h, pre + "mlp.gate_proj")) * linear(model, h, pre + "mlp.up_proj")
        x = x + linear(model, mlp, pre + "mlp.down_proj")

    x = rms_norm(x, w["model.norm.weight"], eps)
    logits = x @ w["lm_head.weight"].T  # [T, V]
    return logits, per_layer


def reference_logits(model, ids):
    """Full causal forward of one sequence from position 0: ids [T] -> logits [T, V]."""
    ids = np.asarray(ids, dtype=np.int64)
    logits, _ = forward(model, ids, np.arange(ids.shape[0]))
    return logits


# ----------------------------------------------------------------------------
# ParallelComp stages
# ----------------------------------------------------------------------------


def split_chunks(n, chunk_len):
    """Chunk boundaries for n context tokens: list of (start, end), near-equal sizes.

    N = ceil(n / chunk_len); base, extra = divmod(n, N); chunk i has base + 1
    tokens if i < extra else base.
    """
    num = -(-n // chunk_len)
    base, extra = divmod(n, num)
    bounds, start = [], 0
    for i in range(num):
        size = base + 1 if i < extra else base
        bounds.append((start, start + size))
        start += size
    return bounds


def question_nll(logits, q_start, question):
    """Mean NLL of the question: logits [T, V] of the row, question [Q] placed at q_start.

    Token question[j] is predicted by the logits at row index q_start - 1 + j.
    """
    total = 0.0
    for j, tok in enumerate(question):
        total -= log_softmax(logits[q_start - 1 + j])[tok]
    return total / len(question)


def select_chunks(scores, top_k):
    """Indices of the top_k lowest scores (ties: lower index first), in document order."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[: min(top_k, len(scores))])


def observation_scores(q, k, group, obs_window, window=0):
    """SnapKV attention mass per key from the last obs_window queries.

    q [T, H, D] rotated queries; k [KVH, T, D] rotated keys (a row: key t at position t).
    Returns s [KVH, T]: for KV head g, the sum over observation queries p and query
    heads h with h // group == g of softmax_{t <= p}(q_p,h . k_t / sqrt(D)); in a local
    layer (window > 0) over the keys p - window < t <= p only (the others get 0).
    """
    t_len, num_heads, dim = q.shape
    kv_heads = k.shape[0]
    s = np.zeros((kv_heads, t_len))
    for p in range(max(0, t_len - obs_window), t_len):
        first = max(0, p - window + 1) if window else 0
        for h in range(num_heads):
            g = h // group
            probs = softmax(k[g, first: p + 1] @ q[p, h] / math.sqrt(dim))  # [p + 1 - first]
            s[g, first: p + 1] += probs
    return s


def max_pool_1d(s, kernel):
    """Stride-1 max-pool with the window clipped to the sequence: s [T] -> [T]."""
    half = kernel // 2
    t_len = s.shape[0]
    return np.array([np.max(s[max(0, t - half) : min(t_len, t + half + 1)]) for t in range(t_len)])


def kept_positions_for_head(s, content_start, content_end, capacity, kernel):
    """Row positions kept for one KV head, sorted ascending.

    s [T] attention mass; content tokens are row indices content_start..content_end-1.
    capacity None keeps every content token; otherwise the top `capacity` content
    tokens by max-pooled score (ties: lower index first).
    """
    content = np.arange(content_start, content_end)
    if capacity is None or capacity >= content.shape[0]:
        return content.copy()
    is_content = np.zeros(s.shape[0], dtype=bool)
    is_content[content_start:content_end] = True
    masked = np.where(is_content, s, -np.inf)
    pooled = np.where(is_content, max_pool_1d(masked, kernel), -np.inf)
    ranked = sorted(content.tolist(), key=lambda t: (-pooled[t], t))
    return np.array(sorted(ranked[:capacity]), dtype=np.int64)


def reference_parallelcomp(
    model,
    prefix_ids,
    context_ids,
    question_ids,
    chunk_len,
    top_k,
    capacity,
    obs_window,
    pool_kernel,
    max_new_tokens,
    stop_ids,
    calibration=None,
    bounds=None,
    stage_budget=None,
    decode_eviction=False,
    merge_layout="parallel",
):
    """The whole ParallelComp pipeline (stages 1, 1b, 1c, 2, 3).

    merge_layout: "parallel" (docs/algorithm.md: every kept chunk's entries at its own row
    positions, the question after the longest kept row) or "sequential" (the kept chunks one
    after another in document order: a kept token at row position r of chunk c has its key
    computed from the layer's pre-RoPE key at r + the lengths of the kept chunks before c;
    the question after P and every kept chunk).

    decode_eviction: hold every layer's cache at its size after the question prefill while
    decoding (docs/algorithm.md stage 3, the reference's ``kv_cache_dynamic``): each layer keeps
    the attention rows of its last ``obs_window`` queries (the question's last tokens, then
    each fed token), and after each fed token ``decode_evict_one`` drops one entry per KV
    head. Reported as "decode_evicted": a list over fed tokens of a list over layers of the
    evicted cache index per KV head (indices into prefix + kept chunks + question + fed tokens).

    stage_budget: None (off), or the stage eviction budget (docs/algorithm.md stage 2): in the
    question prefill every layer keeps that many chunk entries per KV head of the merged
    cache (``stage_eviction_kept``, observation window and pool kernel as in stage 1b);
    the rest leave that layer's cache for the question and decoding. Reported as
    "merged_evicted": per layer, per KV head, the sorted merged-cache indices evicted.
    bounds: the chunks as (start, end) pairs of context indices, in order (an input, e.g.
    chunks ended at sentence ends); default: ``split_chunks``, near-equal sizes.

    calibration: None (off; results exactly as without the argument) or a list of
    rule dicts {"first", "last" (inclusive 0-based layers), "region" ("sink" |
    "recent" | "middle" | "all"), "size" (tokens), "threshold" (tau, strict >),
    "last_queries" (r), "stage" ("chunk" | "merged")}:
      "chunk": in every row P + chunk_i + Q of stage 1 (chunk scores and kept K/V
          change; SnapKV scores still use the plain causal attention of the layer's
          q/k); the prefix KV of the merged cache comes from the plain forward of P;
      "merged": in the question prefill over the merged cache; masked entries leave
          head g's cache in that layer for the question and every decoding step.

    Returns a dict:
      "chunk_scores": [N] float64 question NLL per chunk, document order;
      "selected": selected chunk indices, document order;
      "kept_positions": list over layers of a list over selected chunks of
          [KVH, n_kept_i] int row positions (sorted ascending per head);
      "tokens": greedy generated ids, stop token excluded;
      "question_logits": [Q, V] the question's logits on the merged cache;
    and, only when calibration is not None:
      "chunk_masked": list over selected chunks (document order) of a list over
          layers of a list over KV heads of the sorted row positions masked in that
          chunk's row (empty lists where nothing was masked);
      "merged_masked": list over layers of a list over KV heads of the sorted merged
          cache ranks masked (removed) in the merged stage.
    """
    prefix = [int(t) for t in prefix_ids]
    context = [int(t) for t in context_ids]
    question = [int(t) for t in question_ids]
    stop = set(int(t) for t in (stop_ids if stop_ids is not None else []))
    kv_heads, dim, n_layers = model["KVH"], model["D"], model["L"]
    group = model["H"] // kv_heads
    len_p, len_q = len(prefix), len(question)
    windows = model.get("windows", [0] * n_layers)
    ropes = model.get("ropes", [(model["theta"], 1.0)] * n_layers)
    check_calibration(calibration, n_layers)
    chunk_calib = None if calibration is None else [r for r in calibration if r["stage"] == "chunk"]
    merged_calib = None if calibration is None else [r for r in calibration if r["stage"] == "merged"]

    # Stage 1: one independent causal forward per row P + chunk_i + Q.
    bounds = split_chunks(len(context), chunk_len) if bounds is None else [tuple(b) for b in bounds]
    rows = []
    scores = np.zeros(len(bounds))
    for i, (a, b) in enumerate(bounds):
        row = prefix + context[a:b] + question
        if chunk_calib:
            logits, per_layer = forward(model, row, np.arange(len(row)), None, chunk_calib, "chunk")
        else:
            logits, per_layer = forward(model, row, np.arange(len(row)))
        scores[i] = question_nll(logits, len_p + (b - a), question)
        rows.append(per_layer)
    selected = select_chunks(scores, top_k)

    # Stage 1b: per-layer, per-KV-head SnapKV eviction inside each selected row.
    kept = []  # [layer][chunk] -> [KVH, n_kept]
    for layer in range(n_layers):
        per_chunk = []
        for i in selected:
            a, b = bounds[i]
            st = rows[i][layer]
            s = observation_scores(st["q"], st["k"], group, obs_window, windows[layer])
            heads = [kept_positions_for_head(s[g], len_p, len_p + (b - a), capacity, pool_kernel)
                     for g in range(kv_heads)]
            per_chunk.append(np.stack(heads))
        kept.append(per_chunk)

    # Stage 2: merged cache = prefix KV, then each kept chunk's kept KV (doc order).
    if len_p > 0:
        _, prefix_layers = forward(model, prefix, np.arange(len_p))
    # Every entry's position (per layer and KV head): P at 0..P-1, a kept token at its row
    # position (+ the lengths of the kept chunks before it, sequential); local layers' windows
    # compare them with the question's and the answer's positions.
    cache, cache_pos = [], []
    for layer in range(n_layers):
        ks = [prefix_layers[layer]["k"]] if len_p > 0 else [np.zeros((kv_heads, 0, dim))]
        vs = [prefix_layers[layer]["v"]] if len_p > 0 else [np.zeros((kv_heads, 0, dim))]
        ps = [np.broadcast_to(np.arange(len_p), (kv_heads, len_p))]
        for c, i in enumerate(selected):
            st = rows[i][layer]
            pos = kept[layer][c]  # [KVH, n]
            shift = sum(bounds[j][1] - bounds[j][0] for j in selected[:c]) if merge_layout == "sequential" else 0
            if merge_layout == "sequential":
                ks.append(np.stack([apply_rope(st["k_raw"][g, pos[g]][:, None, :], pos[g] + shift, *ropes[layer])[:, 0]
                                    for g in range(kv_heads)]))
            else:
                ks.append(np.stack([st["k"][g, pos[g]] for g in range(kv_heads)]))
            vs.append(np.stack([st["v"][g, pos[g]] for g in range(kv_heads)]))
            ps.append(pos + shift)
        cache.append((np.concatenate(ks, axis=1), np.concatenate(vs, axis=1)))
        cache_pos.append(np.concatenate(ps, axis=1))

    # Question prefill after the longest kept row's content.
    if merge_layout == "sequential":
        start = len_p + sum(bounds[i][1] - bounds[i][0] for i in selected)
    elif merge_layout == "parallel":
        start = max(len_p + bounds[i][1] - bounds[i][0] for i in selected)
    else:
        raise ValueError(f"merge_layout must be parallel or sequential, got {merge_layout!r}")
    cache_keep = None
    eviction = None if stage_budget is None else {
        "budget": stage_budget, "obs_window": obs_window, "pool_kernel": pool_kernel, "prefix_len": len_p}
    if merged_calib or eviction is not None:
        logits, new = forward(model, question, start + np.arange(len_q), cache, merged_calib or None,
                              "merged" if merged_calib else None, eviction=eviction, cache_positions=cache_pos)
        cache_keep = [st.get("keep") for st in new]  # [KVH, M + Q] per layer, or None
        merged_masks = [st.get("masked") for st in new]  # [KVH, M] per layer
        evicted = [st.get("evicted") for st in new]  # [KVH, M] per layer, or None
    else:
        logits, new = forward(model, question, start + np.arange(len_q), cache, cache_positions=cache_pos)
    if decode_eviction:
        m = cache[0][0].shape[1] + len_q
        cache_keep = [np.ones((kv_heads, m), dtype=bool) if k is None else k.copy() for k in (cache_keep or [None] * n_layers)]
        windows = [st["probs"][:, -obs_window:] for st in new]  # [KVH, <= w, M + Q] per layer
    question_logits = logits
    cache = extend_cache(cache, new)
    cache_pos = [np.concatenate([p, np.broadcast_to(start + np.arange(len_q), (kv_heads, len_q))], axis=1)
                 for p in cache_pos]
    next_pos = start + len_q

    # Stage 3: greedy decoding.
    tokens, decode_evicted = [], []
    while len(tokens) < max_new_tokens:
        tok = int(np.argmax(logits[-1]))
        if tok in stop:
            break
        tokens.append(tok)
        if len(tokens) == max_new_tokens:
            break
        if cache_keep is None:
            logits, new = forward(model, [tok], [next_pos], cache, cache_positions=cache_pos)
        else:
            logits, new = forward(model, [tok], [next_pos], cache, cache_keep=cache_keep, cache_positions=cache_pos)
            cache_keep = extend_keep(cache_keep, 1)
        if decode_eviction:
            windows = [np.concatenate([np.pad(w_, ((0, 0), (0, 0), (0, 1))), st["probs"]], axis=1)[:, -obs_window:]
                       for w_, st in zip(windows, new)]
            decode_evicted.append([decode_evict_one(w_, keep, obs_window, pool_kernel)
                                   for w_, keep in zip(windows, cache_keep)])
        cache = extend_cache(cache, new)
        cache_pos = [np.concatenate([p, np.full((kv_heads, 1), next_pos)], axis=1) for p in cache_pos]
        next_pos += 1

    out = {
        "chunk_scores": scores,
        "selected": selected,
        "kept_positions": kept,
        "tokens": tokens,
        "question_logits": question_logits,
    }
    if decode_eviction:
        out["decode_evicted"] = decode_evicted
    if eviction is not None:
        out["merged_evicted"] = [[np.flatnonzero(e[g]).tolist() for g in range(kv_heads)] for e in evicted]
    if calibration is not None:
        out["chunk_masked"] = [
            [
                [np.flatnonzero(rows[i][layer]["masked"][g]).tolist() if chunk_calib else [] for g in range(kv_heads)]
                for layer in range(n_layers)
            ]
            for i in selected
        ]
        out["merged_masked"] = [
            [np.flatnonzero(merged_masks[layer][g]).tolist() for g in range(kv_heads)]
            for layer in range(n_layers)
        ] if merged_calib else [[[] for _ in range(kv_heads)] for _ in range(n_layers)]
    return out


def extend_keep(cache_keep, t_new):
    """Append t_new always-kept entries to each layer's bool [KVH, M] keep-mask (None stays None)."""
    return [
        None if keep is None else np.concatenate([keep, np.ones((keep.shape[0], t_new), dtype=bool)], axis=1)
        for keep in cache_keep
    ]


def extend_cache(cache, per_layer):
    """Append the new tokens' K/V (per_layer from ``forward``) to cache [KVH, M, D] per layer."""
    return [
        (np.concatenate([k, st["k"]], axis=1), np.concatenate([v, st["v"]], axis=1))
        for (k, v), st in zip(cache, per_layer)
    ]
