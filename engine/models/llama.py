"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, and with sparse MoE MLPs Mixtral,
Qwen2-MoE and Qwen3-MoE: see moe.py): GQA, RoPE, RMSNorm, SwiGLU, Qwen3's q/k norms.

Module and parameter names mirror the Hugging Face checkpoint (`model.layers.0.self_attn.q_proj`,
...) so weights load by name. The forward pass takes a flat batch of tokens (no padding) and
attends through the attention backend over the paged KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention.backend import AttentionBackend, AttentionMetadata
from engine.config import ModelConfig
from engine.models.moe import SparseMoeBlock
from engine.quantization.linear import QuantLinear


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, scale in the model dtype: the order transformers uses.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """RoPE's per-pair angular frequencies, with Llama 3's frequency-dependent stretch.

    Llama 3 leaves high frequencies (short wavelengths) alone, divides low frequencies by
    `factor`, and interpolates smoothly between the two bands."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        self.head_dim, self.max_positions = head_dim, max_positions
        self.theta, self.scaling = theta, scaling
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def build(self, device: torch.device) -> None:
        """Fill the cos/sin table (float32, like the reference) once the model is on its device."""
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(device)
        positions = torch.arange(self.max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos_sin = torch.stack((emb.cos(), emb.sin()))  # [2, max_positions, head_dim]

    def forward(self, positions, q, k):
        cos = self.cos_sin[0][positions].to(q.dtype).unsqueeze(1)  # [T, 1, D]
        sin = self.cos_sin[1][positions].to(q.dtype).unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
        layer: int | None = None,
    ):
        super().__init__()
        self.layer = layer  # picks this layer's window in the backend (per-layer windows)
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        bias = cfg.attention_bias
        # CLA: a layer past the first of its group reads that layer's KV and has no K, V.
        self.shares_kv = layer is not None and layer % cfg.cla_share_factor != 0
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=bias)
        if not self.shares_kv:
            self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
            self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            if not self.shares_kv:
                self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        # Shared with every layer; not registered as a submodule so it is not a weight.
        self._rotary = (rotary,)
        self._backend = backend
        self._ops = None  # engine.attention.fused_ops once `fuse` ran (CUDA)

    def fuse(self, ops) -> None:
        """One [q; k; v] projection (the q/k/v parameters become views of it) and the RoPE
        kernel."""
        if self.shares_kv:
            return  # queries only: the plain path below
        self.qkv_proj = _fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        self._ops = ops

    def forward(self, positions, x, kv_cache, meta: AttentionMetadata):
        if self.shares_kv:
            return self._shared_kv_forward(positions, x, kv_cache, meta)
        if self._ops is not None:
            return self._fused_forward(positions, x, kv_cache, meta)
        q = self.q_proj(x).view(-1, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if not self._backend.applies_rope:  # attention sinks: the backend rotates in-cache
            q, k = self._rotary[0](positions, q, k)
        out = self._backend.forward(q, k, v, kv_cache, meta, self.layer)
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))

    def _shared_kv_forward(self, positions, x, kv_cache, meta):
        """CLA: attend over the cache the group's first layer wrote in this same forward pass
        (this step's tokens included); no K or V of its own, nothing written."""
        q = self.q_proj(x).view(-1, self.num_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q)
        if self._backend.applies_rope:
            raise NotImplementedError("cross-layer KV sharing with attention sinks")
        q, _ = self._rotary[0](positions, q, q[:, :0])  # no keys: an empty slice of heads
        out = self._backend.forward(q, None, None, kv_cache, meta, self.layer)
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))

    def _fused_forward(self, positions, x, kv_cache, meta):
        q, k, v = self.fused_qkv(positions, x)
        out = self._backend.forward(q, k, v, kv_cache, meta, self.layer)
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))

    def fused_qkv(self, positions, x):
        """The fused path up to attention: q [T, H, D], k and v [T, KV, D], rotated."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], -1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:  # new contiguous tensors: rope_ below works in place on them
            q, k = self.q_norm(q), self.k_norm(k)
        if not self._backend.applies_rope:  # attention sinks: the backend rotates in-cache
            self._ops.rope_(q, k, positions, self._rotary[0].cos_sin)
        return q, k, v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        inter = intermediate_size or cfg.intermediate_size
        self.gate_proj = nn.Linear(cfg.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=False)
        self._ops = None

    def fuse(self, ops) -> None:
        """One [gate; up] projection and the SiLU-and-mul kernel."""
        self.gate_up_proj = _fuse_linears([self.gate_proj, self.up_proj])
        self._ops = ops

    def forward(self, x):
        if self._ops is not None:
            return self.down_proj(self._ops.silu_and_mul(self.gate_up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _fuse_linears(linears: list[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    """One projection whose output is the concatenation of `linears`' outputs, over tensors
    the parts' parameters become views of. A plain callable, not a module: the fused tensors
    are not listed (or counted) twice among the parameters."""
    first = linears[0]
    fused = {
        name: _concat_params([getattr(lin, name) for lin in linears])
        for name, param in first.named_parameters(recurse=False)
        if param is not None
    }
    if isinstance(first, QuantLinear):
        return first.with_tensors(**fused)
    return partial(F.linear, weight=fused["weight"], bias=fused.get("bias"))


def _concat_params(params: list[nn.Parameter]) -> torch.Tensor:
    """Concatenate along dim 0 and re-point each parameter at its rows of the result: the fused
    matrix is the only copy, and the named parameters (state_dict) still read right."""
    fused = torch.cat([p.data for p in params])
    row = 0
    for p in params:
        p.data = fused[row : row + p.shape[0]]
        row += p.shape[0]
    return fused


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend, index: int
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rotary, backend, index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoeBlock(cfg, MLP) if index in cfg.moe_layers else MLP(cfg)

    def forward(self, positions, x, kv_cache, meta):
        x = x + self.self_attn(positions, self.input_layernorm(x), kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))

    def fused_forward(self, ops, positions, x, residual, kv_cache, meta):
        """The same layer with each add-then-norm as one kernel. The hidden state is carried as
        (x, residual) with the true value x + residual; `residual` is updated in place."""
        h, residual = self.fused_input_norm(ops, x, residual)
        h = self.self_attn(positions, h, kv_cache, meta)
        return self.fused_after_attention(ops, h, residual), residual

    def fused_input_norm(self, ops, x, residual):
        """(the attention's input, residual): add-then-norm, or at the first layer (residual
        None, x the embedding) the norm alone."""
        weight, eps = self.input_layernorm.weight, self.input_layernorm.eps
        if residual is None:
            return ops.rms_norm(x, weight, eps), x
        return ops.rms_norm(x, weight, eps, residual), residual

    def fused_after_attention(self, ops, h, residual):
        """From the attention's projected output `h` to the layer's x (`residual` in place)."""
        norm = self.post_attention_layernorm
        return self.mlp(ops.rms_norm(h, norm.weight, norm.eps, residual))


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, rotary, backend, i) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Llama, Mistral, Qwen2, Mixtral and Qwen2-MoE share this code; they differ only in config
    values (the MoE ones in which layers' MLP is a `SparseMoeBlock`)."""

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.config = cfg
        self.rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )
        self.model = DecoderModel(cfg, self.rotary, backend)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._ops = None

    def fuse_for_cuda(self) -> None:
        """Switch to fused kernels (`engine.attention.fused_ops`): q/k/v and gate/up as one
        matrix each, add+RMSNorm, RoPE and SiLU-and-mul as one kernel each. Called by the model
        runner after loading, on CUDA; the eager modules stay the reference."""
        from engine.attention import fused_ops

        for layer in self.model.layers:
            layer.self_attn.fuse(fused_ops)
            layer.mlp.fuse(fused_ops)
        self._ops = fused_ops

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[torch.Tensor],  # one per KV layer
        meta: AttentionMetadata,
        layer_done: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm, [num_tokens, hidden_size]. `kv_caches` holds
        one cache per KV layer (per CLA group); `layer_done(j)` is called once KV layer j is
        written (KV transfer overlaps the later layers)."""
        x = self.model.embed_tokens(input_ids)
        ops, residual = self._ops, None
        for i, layer in enumerate(self.model.layers):
            kv_cache = kv_caches[self.config.kv_layer(i)]
            if ops is None:
                x = layer(positions, x, kv_cache, meta)
            else:
                x, residual = layer.fused_forward(ops, positions, x, residual, kv_cache, meta)
            if layer_done is not None and not layer.self_attn.shares_kv:
                layer_done(self.config.kv_layer(i))
        if ops is None:
            return self.model.norm(x)
        return self.fused_final_norm(x, residual)

    def fused_final_norm(self, x, residual):
        return self._ops.rms_norm(x, self.model.norm.weight, self.model.norm.eps, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = (
            self.model.embed_tokens.weight
            if self.config.tie_word_embeddings
            else self.lm_head.weight
        )
        return F.linear(hidden, weight)
