"""The model's architecture: a frozen, hashable dataclass usable as a static jit argument.

Built from a Hugging Face ``config.json`` (``ModelConfig.from_hf_dict``) or from GGUF
metadata (``pcomp_jax.checkpoints.gguf``). Nothing here depends on a specific model:
layer, head and vocabulary sizes all come from the checkpoint.

The families differ in a few fields whose defaults are Llama's: Qwen2 adds QKV biases,
Qwen3 RMSNorm on every query and key head (``qk_norm``), Gemma 3 that and norms after
attention and MLP (``post_norms``), scaled embeddings, a GELU MLP, its own query scale and
layers of two kinds: local (sliding-window attention, ``local_rope``) and global
(``sliding_windows``, one entry per layer, 0 for a global layer).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import CheckpointError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (Hugging Face ``rope_parameters`` / ``rope_scaling``).

    type: ``default``, ``linear`` (positions divided by ``factor``), ``dynamic``
      (NTK-aware base rescaled when a call's positions exceed ``original_window``), or
      ``llama3`` (per-frequency scaling with ``low_freq_factor`` / ``high_freq_factor``).
    freq_factors: optional explicit per-frequency divisors (GGUF ``rope_freqs`` tensor),
      applied on top of ``type``; length ``rotary_dim // 2``.
    """

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_window: int | None = None
    freq_factors: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise CheckpointError(
                f"rope type {self.type!r} is not supported; supported rope types: {', '.join(ROPE_TYPES)}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Gemma 3, SmolLM2).

    window: the trained context length (``max_position_embeddings``), W in docs/algorithm.md.
    qkv_bias: whether q/k/v projections carry biases (Qwen2).
    tie_embeddings: whether the output projection reuses the input embedding.
    qk_norm: RMSNorm over each query and key head before RoPE (Qwen3, Gemma 3).
    post_norms: RMSNorm on the attention output and on the MLP output before each joins
      the residual stream (Gemma 3), besides the norms before them.
    embed_scale: None, or the factor the embeddings are multiplied by (in the activation
      dtype; Gemma 3: sqrt(hidden_size)).
    mlp_activation: the gate's activation, ``silu`` (SwiGLU) or ``gelu_tanh`` (Gemma 3).
    query_scale: None (``head_dim ** -0.5``) or the attention's score scale (Gemma 3:
      ``query_pre_attn_scalar ** -0.5``).
    sliding_windows: ``()`` when every layer attends to all earlier tokens; otherwise one
      entry per layer: 0 for a global layer, w > 0 for a local one, where a query sees a
      key iff it is causal and their positions differ by less than w.
    local_rope: the rotary embedding of the local layers (None: ``rope``); ``rope`` is
      the global layers'.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    window: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    qkv_bias: bool = False
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    qk_norm: bool = False
    post_norms: bool = False
    embed_scale: float | None = None
    mlp_activation: str = "silu"
    query_scale: float | None = None
    sliding_windows: tuple[int, ...] = ()
    local_rope: RopeConfig | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise CheckpointError(f"MLP activation {self.mlp_activation!r} is not supported; supported: "
                                  f"{', '.join(MLP_ACTIVATIONS)}")
        if self.sliding_windows and (len(self.sliding_windows) != self.num_layers
                                     or any(w < 0 for w in self.sliding_windows)):
            raise CheckpointError(f"sliding_windows must give one window >= 0 per layer ({self.num_layers}), "
                                  f"got {self.sliding_windows}")

    @property
    def has_sliding_layers(self) -> bool:
        """Whether some layer attends through a sliding window (Gemma 3's local layers)."""
        return any(w > 0 for w in self.sliding_windows)

    @property
    def has_local_rope(self) -> bool:
        """Whether the local layers rotate with other frequencies than the global ones."""
        return self.has_sliding_layers and self.local_rope is not None and self.local_rope != self.rope

    @property
    def queries_per_kv_head(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Reads a Hugging Face ``config.json`` dict (transformers 4.x or 5.x layout)."""
        archs = d.get("architectures") or []
        arch = archs[0] if archs else d.get("model_type", "?")
        if arch not in SUPPORTED_HF_ARCHITECTURES:
            raise CheckpointError(
                f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_HF_ARCHITECTURES)}"
            )
        if arch == "Gemma3ForCausalLM":
            d = _gemma3_text_config(d)
        sliding = d.get("sliding_window")
        if arch not in LOCAL_LAYER_ARCHITECTURES and sliding is not None and d.get(
                "use_sliding_window", arch != "Qwen2ForCausalLM"):
            raise CheckpointError(
                f"sliding-window attention (sliding_window={sliding}) is not supported for {arch}; "
                f"only full causal attention is (sliding_window: null); it is for "
                f"{', '.join(LOCAL_LAYER_ARCHITECTURES)}"
            )
        num_heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // num_heads
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            window=d["max_position_embeddings"],
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope=_rope_from_hf(d),
            qkv_bias=bool(d.get("attention_bias", arch == "Qwen2ForCausalLM")),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            **_family_fields(arch, d, head_dim),
        )


SUPPORTED_HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                              "Gemma3ForCausalLM")
LOCAL_LAYER_ARCHITECTURES = ("Qwen3ForCausalLM", "Gemma3ForCausalLM")  # local layers read from the config
GEMMA_FAMILY = ("Gemma3ForCausalLM",)  # RMSNorm as x * (1 + w): +1 folded into the weights at load time


def _gemma3_text_config(d: dict[str, Any]) -> dict[str, Any]:
    """A ``Gemma3ForCausalLM`` config with Gemma 3's defaults where a field is absent."""
    d = {"tie_word_embeddings": True, **d}
    if not (d.get("rope_parameters") or {}).get("full_attention"):
        d.setdefault("rope_theta", 1_000_000.0)  # Gemma 3's global default
    return d


def _layer_windows(d: dict[str, Any], num_layers: int, window: int | None, default_pattern: int | None):
    """Per-layer windows from ``layer_types`` (or a Gemma ``sliding_window_pattern``: every
    n-th layer global, the others local); () when no layer is local."""
    if not window:
        return ()
    types = d.get("layer_types")
    if types is None:
        if default_pattern is None:
            return ()
        pattern = int(d.get("sliding_window_pattern") or default_pattern)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown or len(types) != num_layers:
        raise CheckpointError(f"layer_types must name sliding_attention or full_attention for each of the "
                              f"{num_layers} layers; got {types}")
    windows = tuple(int(window) if t == "sliding_attention" else 0 for t in types)
    return windows if any(windows) else ()


def _family_fields(arch: str, d: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """The ``ModelConfig`` fields of the Qwen3 and Gemma 3 families (none for the others)."""
    num_layers = d["num_hidden_layers"]
    if arch == "Qwen3ForCausalLM":
        window = d.get("sliding_window") if d.get("use_sliding_window", False) else None
        if window and d.get("layer_types") is None:  # transformers: the layers from max_window_layers on
            first = d.get("max_window_layers", num_layers)
            d = {**d, "layer_types": ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]}
        return dict(qk_norm=True, sliding_windows=_layer_windows(d, num_layers, window, None))
    if arch != "Gemma3ForCausalLM":
        return {}
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if d.get(key) is not None:
            raise CheckpointError(f"Gemma 3 with {key}={d[key]} is not supported (only null)")
    if d.get("use_bidirectional_attention"):
        raise CheckpointError("Gemma 3 with use_bidirectional_attention is not supported (causal attention only)")
    activation = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise CheckpointError(f"Gemma 3 hidden_activation {activation!r} is not supported (gelu_pytorch_tanh)")
    params = d.get("rope_parameters") or {}
    local = params.get("sliding_attention") if "sliding_attention" in params else None
    local_rope = _rope_from_hf({"rope_parameters": local, "max_position_embeddings": d["max_position_embeddings"]}
                               ) if local else RopeConfig(theta=float(d.get("rope_local_base_freq", 10000.0)))
    return dict(
        qk_norm=True,
        post_norms=True,
        embed_scale=float(d["hidden_size"]) ** 0.5,
        mlp_activation="gelu_tanh",
        query_scale=float(d.get("query_pre_attn_scalar", 256)) ** -0.5,
        sliding_windows=_layer_windows(d, num_layers, d.get("sliding_window", 4096), 6),
        local_rope=local_rope,
    )


def _rope_from_hf(d: dict[str, Any]) -> RopeConfig:
    """transformers 5 writes ``rope_parameters`` (theta inside); 4.x ``rope_theta`` + ``rope_scaling``.
    Gemma 3's ``rope_parameters`` holds one set per layer kind: the global layers' here."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    if "full_attention" in params:
        params = dict(params["full_attention"] or {})
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError("partial_rotary_factor != 1 is not supported")
    return RopeConfig(
        theta=float(theta),
        type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_window=params.get("original_max_position_embeddings", d.get("max_position_embeddings")),
    )
