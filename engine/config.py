"""Configuration: the model's (read from a Hugging Face `config.json`) and the engine's (chosen by
the user). Both are validated here, at the boundary, so the rest of the engine can trust them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.quantization.config import QuantConfig
from engine.speculative import SpeculativeConfig

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}

# How the KV cache stores K and V: "auto" in the model dtype, or 8-bit with a float32 scale per
# token and head stored beside the values (see engine/kv_cache/quant.py).
KV_CACHE_DTYPES = ("auto", "fp8", "int8")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[dtype]


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a Llama-family decoder, as read from `config.json`."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    torch_dtype: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # Sparse MoE MLP (Mixtral, Qwen2-MoE); num_experts 0 means dense MLPs everywhere.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on, sigmoid-gated expert
    moe_layers: tuple[int, ...] = ()  # the layers whose MLP is the sparse block
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on each query and key head before RoPE
    # Per-layer attention windows (None: global), from `layer_types` or Qwen's
    # `max_window_layers`; empty: `sliding_window` for every layer.
    layer_windows: tuple[int | None, ...] = ()
    # Cross-layer KV sharing (CLA, Brandon et al. 2024): groups of this many adjacent layers
    # share one KV cache; the group's first layer computes K and V, the others only queries.
    # From config.json's `cla_share_factor`; 1: every layer has its own.
    cla_share_factor: int = 1

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{model_dir}: no config.json; is this a Hugging Face model folder?"
            )
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelConfig:
        archs = cfg.get("architectures") or []
        known = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
        if not known:
            raise ValueError(
                f"unknown architecture {archs or cfg.get('model_type')!r}; "
                f"Baton supports {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[known[0]]
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; only silu (SwiGLU)")
        num_heads = cfg["num_attention_heads"]
        hidden_size = cfg["hidden_size"]
        head_dim = cfg.get("head_dim") or hidden_size // num_heads
        num_kv_heads = cfg.get("num_key_value_heads") or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads {num_heads} not a multiple of kv heads {num_kv_heads}"
            )
        # transformers 5 moved rope settings into `rope_parameters`; real checkpoints mostly still
        # carry `rope_theta` + `rope_scaling`. Accept both.
        rope_params = cfg.get("rope_parameters") or {}
        rope_theta = float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
        rope_scaling = cfg.get("rope_scaling") or (rope_params if rope_params else None)
        rope_scaling = _check_rope_scaling(rope_scaling)
        sliding_window = cfg.get("sliding_window")
        qwen = family in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe")
        if qwen and not cfg.get("use_sliding_window", False):
            sliding_window = None
        if family == "qwen2":  # Qwen2 always has q/k/v biases
            attention_bias = True
        elif family == "qwen2_moe":
            attention_bias = bool(cfg.get("qkv_bias", True))
        else:  # Llama says so with `attention_bias`
            attention_bias = bool(cfg.get("attention_bias", False))
        if family in ("qwen3", "qwen3_moe") and attention_bias:
            # Qwen3's attention_bias also puts a bias on o_proj, which Baton's model lacks.
            raise ValueError("Qwen3 with attention_bias is not supported")
        layer_windows = _layer_windows(cfg, qwen, sliding_window)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=known[0],
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden_size,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            sliding_window=sliding_window,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype") or "float32",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            **_moe_fields(family, cfg),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            layer_windows=layer_windows,
            cla_share_factor=_cla_share_factor(cfg, layer_windows),
        )

    def layer_window(self, layer: int) -> int | None:
        """The attention window of one layer (None: it sees the whole sequence)."""
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window

    @property
    def kv_window(self) -> int | None:
        """The window that bounds the KV cache: the largest layer window when every layer has
        one. One global layer needs every token's KV, and blocks hold all layers, so then None."""
        windows = [self.layer_window(i) for i in range(self.num_layers)]
        return None if None in windows else max(windows)

    @property
    def num_kv_layers(self) -> int:
        """KV caches the model keeps: one per layer, or one per CLA group."""
        return -(-self.num_layers // self.cla_share_factor)

    def kv_layer(self, layer: int) -> int:
        """The KV cache layer `layer` reads (its CLA group's)."""
        return layer // self.cla_share_factor

    @property
    def kv_elements_per_token(self) -> int:
        """K and V elements one token occupies across all KV caches (times the dtype's size:
        bytes); layers that share a cache (CLA) count once."""
        return 2 * self.num_kv_layers * self.num_kv_heads * self.head_dim


def _cla_share_factor(cfg: dict, layer_windows: tuple) -> int:
    factor = cfg.get("cla_share_factor", 1)
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"cla_share_factor must be a positive integer, got {factor!r}")
    groups = [layer_windows[i : i + factor] for i in range(0, len(layer_windows), factor)]
    if any(len(set(group)) > 1 for group in groups):
        raise ValueError("layers sharing a KV cache (cla_share_factor) must share a window")
    return factor


_LAYER_TYPES = ("sliding_attention", "full_attention")


def _layer_windows(cfg: dict, qwen: bool, sliding_window: int | None) -> tuple[int | None, ...]:
    """Each layer's window as transformers assigns it: `layer_types` when the config lists them,
    else for Qwen the layers from `max_window_layers` on (its default 28), else every layer."""
    num_layers = cfg["num_hidden_layers"]
    if sliding_window is None:
        return ()
    if sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    types = cfg.get("layer_types")
    if types is None and qwen:
        first = cfg.get("max_window_layers", 28)
        types = [_LAYER_TYPES[i < first] for i in range(num_layers)]
    if types is None:
        return ()
    if len(types) != num_layers or any(t not in _LAYER_TYPES for t in types):
        raise ValueError(
            f"layer_types must list {num_layers} entries, each one of {list(_LAYER_TYPES)}"
        )
    return tuple(sliding_window if t == "sliding_attention" else None for t in types)


def _moe_fields(family: str, cfg: dict) -> dict:
    """The MoE fields of ModelConfig, from each family's spelling of them."""
    num_layers = cfg["num_hidden_layers"]
    if family == "mixtral":
        # Every layer sparse; softmax, top-k, renormalised; experts as wide as intermediate_size.
        fields = dict(
            num_experts=cfg["num_local_experts"],
            num_experts_per_tok=cfg["num_experts_per_tok"],
            moe_intermediate_size=cfg["intermediate_size"],
            norm_topk_prob=True,
            moe_layers=tuple(range(num_layers)),
        )
    elif family in ("qwen2_moe", "qwen3_moe"):  # Qwen3-MoE: no shared expert
        step = cfg.get("decoder_sparse_step", 1)
        dense = set(cfg.get("mlp_only_layers") or ())
        num_experts = cfg["num_experts"]
        fields = dict(
            num_experts=num_experts,
            num_experts_per_tok=cfg["num_experts_per_tok"],
            moe_intermediate_size=cfg["moe_intermediate_size"],
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size", 0),
            moe_layers=tuple(
                i
                for i in range(num_layers)
                if i not in dense and num_experts > 0 and (i + 1) % step == 0
            ),
        )
    else:
        return {}
    if not 0 < fields["num_experts_per_tok"] <= fields["num_experts"]:
        raise ValueError(
            f"num_experts_per_tok {fields['num_experts_per_tok']} must be in "
            f"[1, num_experts={fields['num_experts']}]"
        )
    return fields


def _check_rope_scaling(rope_scaling: dict | None) -> dict | None:
    if not rope_scaling:
        return None
    kind = rope_scaling.get("rope_type") or rope_scaling.get("type") or "default"
    if kind == "default":
        return None
    if kind not in ("llama3", "linear"):
        raise ValueError(
            f"unsupported rope_scaling type {kind!r}; Baton supports llama3 and linear"
        )
    return {**rope_scaling, "rope_type": kind}


@dataclass
class EngineConfig:
    """What the user chooses about how the engine runs. Checked in `__post_init__`."""

    model: str
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from free memory
    kv_cache_memory_fraction: float = 0.9  # of free memory after weights (GPU); CPU uses a cap
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # CUDA: no CUDA graphs (debugging, profiling)
    # CUDA: steps with prompt tokens replay graphs of everything but attention
    # (engine/prefill_graphs.py); False: they run eagerly (decode steps keep their graphs).
    prefill_graphs: bool = True
    # CUDA: decode steps replay CUDA graphs (engine/decode_graphs.py); False: they run eagerly
    # and none is captured (a prefill worker never decodes: every request leaves after its
    # first token). `enforce_eager` turns off both kinds.
    decode_graphs: bool = True
    # Launch a greedy decode step before the previous one's tokens reach the host, so the host
    # work of a step overlaps the device's (LLMEngine.step; Scheduler.schedule_ahead).
    async_scheduling: bool = False
    kv_cache_dtype: str = "auto"  # "auto" (the model dtype), "fp8" (e4m3) or "int8"
    # Speculative decoding, off by default: e.g. {"method": "ngram", "num_speculative_tokens": 4}
    # (engine/speculative.py: SpeculativeConfig). Parsed into a SpeculativeConfig here.
    speculative: dict | SpeculativeConfig | None = None
    # Weight quantization, off by default: "int8" | "int4" | "fp8", or a dict such as
    # {"method": "int4", "group_size": 64, "symmetric": False} (engine/quantization/config.py).
    quantization: str | dict | QuantConfig | None = None
    # Attention sinks (StreamingLLM), off by default: every query attends to the first
    # `attention_sinks` tokens and the last `sink_window` (itself included), with RoPE positions
    # counted within that cache (engine/attention/sink_backend.py), so KV memory per request is
    # bounded and requests may generate past max_model_len.
    attention_sinks: int = 0
    sink_window: int = 0
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError("kv_cache_memory_fraction must be in (0, 1]")
        if self.dtype != "auto":
            parse_dtype(self.dtype)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, "
                f"got {self.kv_cache_dtype!r}"
            )
        self.speculative = SpeculativeConfig.parse(self.speculative)
        self.quantization = QuantConfig.parse(self.quantization)
        if self.attention_sinks < 0 or self.sink_window < 0:
            raise ValueError("attention_sinks and sink_window must be >= 0")
        if bool(self.attention_sinks) != bool(self.sink_window):
            raise ValueError(
                "attention sinks need both attention_sinks (the first k tokens kept) and "
                f"sink_window (the recent tokens kept) > 0; got {self.attention_sinks} and "
                f"{self.sink_window}"
            )

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
