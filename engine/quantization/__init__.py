"""Weight quantization: int8 / int4 / fp8 linear layers (EngineConfig.quantization).

config.py      QuantConfig: the user's choice, validated
formats.py     quantize / dequantize a matrix (the storage formats)
linear.py      QuantLinear, quantize_model (at load), how each device computes
kernels.py     the Triton weight-only matmul (CUDA), its tuning
gemv.py        the decode GEMV kernel kernels.py tunes in for a few rows (int8, fp8)
gemv_int4.py   its int4 kernel (nibbles to floats with one AND each)
checkpoint.py  Baton's pre-quantized checkpoints: save_quantized, stored_quantization
"""

from engine.quantization.config import METHODS, QuantConfig

__all__ = ["METHODS", "QuantConfig"]
