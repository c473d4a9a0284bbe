"""`EngineConfig.quantization`: which weight format the linear layers use.

    quantization="int8"    int8 weights, one scale per output channel (symmetric)
    quantization="int4"    4-bit weights in groups of `group_size` along the input dim, two per
                           byte; symmetric (zero point 8) or asymmetric (a zero point per group)
    quantization="fp8"     float8 e4m3 weights, one scale per output channel
    quantization={"method": "int4", "group_size": 64, "symmetric": False}

Activations stay in the model dtype (weight-only), except fp8 prefill on FP8 GPUs, which feeds
`torch._scaled_mm` activations quantized per token (see linear.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

METHODS = ("int8", "int4", "fp8")


@dataclass(frozen=True)
class QuantConfig:
    method: str
    group_size: int = 128  # int4 only: input elements sharing one scale (and zero point)
    symmetric: bool = True  # int4 only: False stores a zero point per group

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quantization must be one of {list(METHODS)}, got {self.method!r}")
        if not isinstance(self.group_size, int) or self.group_size < 2 or self.group_size % 2:
            raise ValueError(
                f"quantization group_size must be an even int >= 2, got {self.group_size!r}"
            )
        if not isinstance(self.symmetric, bool):
            raise ValueError(
                f"quantization symmetric must be true or false, got {self.symmetric!r}"
            )

    @classmethod
    def parse(cls, value: str | dict | QuantConfig | None) -> QuantConfig | None:
        """None, a method name, a dict of the fields, or a QuantConfig."""
        if value is None or isinstance(value, QuantConfig):
            return value
        if isinstance(value, str):
            return cls(method=value)
        if isinstance(value, dict):
            unknown = set(value) - {"method", "group_size", "symmetric"}
            if unknown or "method" not in value:
                raise ValueError(
                    f"quantization dict needs 'method' and may have 'group_size', 'symmetric'; "
                    f"got keys {sorted(value)}"
                )
            return cls(**value)
        raise ValueError(f"quantization must be a method name or a dict, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)
