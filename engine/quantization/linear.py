"""Quantized linear layers, and turning a loaded model's linears into them.

What is quantized: every attention and MLP projection (q/k/v/o, gate/up/down, the shared
expert's too) and the MoE experts. What is not: the embedding, the output head (`lm_head`: at
vocab 128k its logits are the most error-sensitive product, and it is 6% of Llama-3-8B's
bytes), norms, the MoE router and the shared expert's 1-wide gate.

How `quant_linear` computes, by device and rows M:
    CPU                     dequantize to the activation dtype, then F.linear (a reference:
                            correct, not fast; fp8 emulated this way too)
    CUDA, M <= 256          the Triton weight-only kernel (kernels.py), CUDA-graph capturable
    CUDA, M > 256, fp8      torch._scaled_mm on FP8 tensor cores, activations quantized per
                            token to e4m3 (bf16 models with K, N multiples of 16)
    CUDA, M > 256, else     dequantize once to the activation dtype, then cuBLAS
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from engine.quantization.config import QuantConfig
from engine.quantization.formats import FP8_MAX, QuantizedWeight, dequantize, quantize

QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _frozen(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t, requires_grad=False)


class QuantLinear(nn.Module):
    """A quantized stand-in for `nn.Linear` (or, with a leading expert dim, for a stack of them).
    Parameters, as named in Baton's saved checkpoints: `qweight`, `scales`, `zeros` (int4
    asymmetric only), `bias`. They are frozen `nn.Parameter`s so the loader and
    `model.parameters()` (weight bytes) see them like any weight."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.method, self.in_features, self.group_size = qw.method, qw.in_features, qw.group_size
        self.out_features = qw.qweight.shape[-2]
        self.qweight = _frozen(qw.qweight)
        self.scales = _frozen(qw.scales)
        self.zeros = _frozen(qw.zeros)
        self.bias = _frozen(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: QuantConfig) -> QuantLinear:
        qw = quantize(linear.weight.data, cfg.method, cfg.group_size, cfg.symmetric)
        bias = None if linear.bias is None else linear.bias.data
        return cls(qw, bias)

    def quantized(self, index: int | None = None) -> QuantizedWeight:
        """The weight (of expert `index` in a stack) as a QuantizedWeight of views."""

        def pick(t):
            return t if t is None or index is None else t[index]

        return QuantizedWeight(
            self.method,
            pick(self.qweight),
            pick(self.scales),
            pick(self.zeros),
            self.in_features,
            self.group_size,
        )

    def with_tensors(self, **tensors: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """A projection like this one on other tensors of the same layout (fused q/k/v)."""
        qw = QuantizedWeight(
            self.method,
            tensors["qweight"],
            tensors["scales"],
            tensors.get("zeros"),
            self.in_features,
            self.group_size,
        )
        return partial(quant_linear, qw=qw, bias=tensors.get("bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.quantized(), self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.method == "int4" else ""
        return f"{self.method}, in={self.in_features}, out={self.out_features}{group}"


def quant_linear(
    x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] @ dequant(qw)^T + bias, in x's dtype (see the module docstring for how)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if not x.is_cuda:
        out = F.linear(x2, dequantize(qw, x.dtype), bias)
    elif x2.shape[0] <= _kernels().MAX_KERNEL_ROWS:
        out = _kernels().weight_only_matmul(x2, qw, bias)
    elif qw.method == "fp8" and _scaled_mm_fits(x2, qw):
        out = _fp8_scaled_mm(x2, qw, bias)
    else:
        out = F.linear(x2, dequantize(qw, x.dtype), bias)
    return out.view(*shape[:-1], out.shape[-1])


def _kernels():
    from engine.quantization import kernels  # Triton: imported only on CUDA

    return kernels


def _scaled_mm_fits(x: torch.Tensor, qw: QuantizedWeight) -> bool:
    n, k = qw.qweight.shape
    return x.dtype == torch.bfloat16 and k % 16 == 0 and n % 16 == 0 and has_fp8(x.device)


def _fp8_scaled_mm(x: torch.Tensor, qw: QuantizedWeight, bias) -> torch.Tensor:
    """W8A8 on FP8 tensor cores: x quantized per row (token) with its own float32 scale."""
    x_scale = (x.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12)
    x_fp8 = (x.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    w_fp8 = qw.qweight.view(torch.float8_e4m3fn)
    out = torch._scaled_mm(
        x_fp8,
        w_fp8.t(),  # [K, N] column-major, as cuBLASLt wants the second operand
        scale_a=x_scale,
        scale_b=qw.scales.float().view(1, -1),
        out_dtype=x.dtype,
    )
    return out if bias is None else out + bias


def has_fp8(device: torch.device) -> bool:
    """FP8 e4m3 math: compute capability 8.9 (Ada) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def check_supported(cfg: QuantConfig, device: torch.device) -> None:
    """Called by the model runner before loading: a clear error for fp8 on a GPU without it."""
    if cfg.method == "fp8" and device.type == "cuda" and not has_fp8(device):
        name = torch.cuda.get_device_name(device)
        raise ValueError(
            f"quantization='fp8' needs a GPU with FP8 (compute capability 8.9+, e.g. H100); "
            f"{name} has none. Use int8 or int4."
        )


class QuantExperts(nn.Module):
    """MoE experts (moe.Experts) with each expert's matrices quantized: `gate_up_proj` and
    `down_proj` are QuantLinear stacks [num_experts, out, in]."""

    def __init__(self, gate_up: QuantizedWeight, down: QuantizedWeight):
        super().__init__()
        self.gate_up_proj = QuantLinear(gate_up)
        self.down_proj = QuantLinear(down)

    def gate_up(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.gate_up_proj.quantized(expert))

    def down(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.down_proj.quantized(expert))


def quantize_model(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """Replace, in place, the linears named in QUANTIZED_LINEARS and every MoE `Experts` by
    their quantized versions; each float weight is dropped as soon as it is converted, so the
    peak is the float model plus one matrix. On the meta device this only builds the layout
    (for loading a checkpoint that is already quantized). Returns the model."""
    from engine.models.moe import Experts

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name in QUANTIZED_LINEARS:
                setattr(module, name, QuantLinear.from_linear(child, cfg))
            elif isinstance(child, Experts):
                args = (cfg.method, cfg.group_size, cfg.symmetric)
                gate_up = quantize(child.gate_up_proj.data, *args)
                down = quantize(child.down_proj.data, *args)
                setattr(module, name, QuantExperts(gate_up, down))
    if any(p.is_cuda for p in model.parameters()):
        torch.cuda.empty_cache()  # the float weights' memory, for the KV cache sizing after
    return model
