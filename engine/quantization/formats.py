"""Quantizing a weight matrix W [out_features N, in_features K] and dequantizing it back.

    int8  q [N, K] int8,   w = q * scale[n]                   scale = max|W[n, :]| / 127
    fp8   q [N, K] uint8,  w = float(e4m3 bits q) * scale[n]  scale = max|W[n, :]| / 448
    int4  q [N, ceil(K/2)] uint8: byte j holds k = 2j (low nibble) and k = 2j + 1 (high),
          w = (q - zero[n, g]) * scale[n, g] for k in group g = k // group_size
            symmetric:  zero = 8,  scale = max|W_g| / 7,  q - 8 in [-8, 7]
            asymmetric: zero in [0, 15] per group, scale = (max W_g - min W_g) / 15 (with 0 in
                        the range, so zero is exact)

Per-channel scales are float32 (N of them: nothing). int4 group scales cost 1/64 of the packed
weight's bytes per scale byte, so they are stored in bf16 when the model runs in bf16
(float32 otherwise); q is rounded against the stored scale, so dequantizing is exact to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_MAX = 448.0  # largest finite float8 e4m3fn
_TINY = 1e-12  # an all-zero row or group gets this scale instead of 0


@dataclass
class QuantizedWeight:
    """A quantized [N, K] matrix (or a stack [E, N, K]: the leading dims are batch dims)."""

    method: str
    qweight: torch.Tensor
    scales: torch.Tensor  # [..., N] (int8, fp8) or [..., N, num_groups] (int4)
    zeros: torch.Tensor | None  # [..., N, num_groups] uint8: int4 asymmetric only
    in_features: int
    group_size: int = 0  # int4 only


def int4_scale_dtype(model_dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float32


def quantize(
    weight: torch.Tensor, method: str, group_size: int = 128, symmetric: bool = True
) -> QuantizedWeight:
    """Quantize `weight` [..., N, K] (any float dtype; the math runs in float32)."""
    w = weight.float()
    k = w.shape[-1]
    if method == "int8":
        scale = (w.abs().amax(-1) / 127).clamp_min(_TINY)
        q = (w / scale[..., None]).round().clamp(-127, 127).to(torch.int8)
        return QuantizedWeight(method, q, scale, None, k)
    if method == "fp8":
        scale = (w.abs().amax(-1) / FP8_MAX).clamp_min(_TINY)
        q = (w / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        # Stored as its bits: uint8 survives every op (cat, copy, safetensors, module.to).
        return QuantizedWeight(method, q.view(torch.uint8), scale, None, k)
    if method == "int4":
        return _quantize_int4(weight, group_size, symmetric)
    raise ValueError(f"unknown quantization method {method!r}")


def _quantize_int4(weight: torch.Tensor, group_size: int, symmetric: bool) -> QuantizedWeight:
    k = weight.shape[-1]
    num_groups = -(-k // group_size)
    # Pad K to whole groups with zeros (they quantize to the zero point and are cut off).
    w = torch.nn.functional.pad(weight.float(), (0, num_groups * group_size - k))
    groups = w.unflatten(-1, (num_groups, group_size))
    scale_dtype = int4_scale_dtype(weight.dtype)
    if symmetric:
        scale = (groups.abs().amax(-1) / 7).clamp_min(_TINY).to(scale_dtype).float()
        zero = torch.full_like(scale, 8.0)
    else:
        low = groups.amin(-1).clamp_max(0)
        high = groups.amax(-1).clamp_min(0)
        scale = ((high - low) / 15).clamp_min(_TINY).to(scale_dtype).float()
        zero = (-low / scale).round().clamp(0, 15)
    q = (groups / scale[..., None] + zero[..., None]).round().clamp(0, 15)
    q = q.flatten(-2)[..., :k].to(torch.uint8)
    zeros = None if symmetric else zero.to(torch.uint8)
    return QuantizedWeight("int4", pack_int4(q), scale.to(scale_dtype), zeros, k, group_size)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[..., K] uint8 values in [0, 15] -> [..., ceil(K/2)] bytes, even k in the low nibble."""
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of pack_int4: [..., ceil(K/2)] bytes -> [..., K] uint8."""
    both = torch.stack((packed & 0xF, packed >> 4), dim=-1)
    return both.flatten(-2)[..., :k]


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float matrix [..., N, K] that `qw` stands for, computed in float32, cast to dtype."""
    if qw.method == "fp8":
        return (qw.qweight.view(torch.float8_e4m3fn).float() * qw.scales[..., None]).to(dtype)
    if qw.method == "int8":
        return (qw.qweight.float() * qw.scales.float()[..., None]).to(dtype)
    k, g = qw.in_features, qw.group_size
    q = unpack_int4(qw.qweight, k).float()
    zeros = qw.zeros.float() if qw.zeros is not None else torch.full_like(qw.scales, 8.0).float()
    # Per-element scale / zero: group k // g; repeat each group's value g times, cut to K.
    scale = qw.scales.float().repeat_interleave(g, dim=-1)[..., :k]
    zero = zeros.repeat_interleave(g, dim=-1)[..., :k]
    return ((q - zero) * scale).to(dtype)
