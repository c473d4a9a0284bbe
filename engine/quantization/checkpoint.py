"""Baton's pre-quantized checkpoints: `save_quantized` writes one, `stored_quantization` tells
the loader that a folder holds one.

Layout: the source folder's files (tokenizer, generation config, ...), one `model.safetensors`
with the quantized model's parameters by name (`...q_proj.qweight`, `.scales`, `.zeros`;
formats.py), and `config.json` with

    "quantization_config": {"quant_method": "baton", "method": "int4", "group_size": 128,
                            "symmetric": true}

Other tools' pre-quantized formats (GPTQ, AWQ, compressed-tensors, ...) are refused with a
clear error: load their unquantized checkpoint with `quantization=...` instead.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.quantization.config import QuantConfig

QUANT_METHOD = "baton"


def stored_quantization(model_dir: str | Path) -> QuantConfig | None:
    """The QuantConfig a checkpoint was saved with, or None for an unquantized one."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    stored = cfg.get("quantization_config")
    if not stored:
        return None
    method = stored.get("quant_method")
    if method != QUANT_METHOD:
        raise ValueError(
            f"{model_dir}: pre-quantized {method!r} checkpoints are not supported; Baton loads "
            f"its own (`baton quantize`) or quantizes an unquantized checkpoint at load "
            f"(quantization='int8' | 'int4' | 'fp8')"
        )
    return QuantConfig.parse({k: v for k, v in stored.items() if k != "quant_method"})


def save_quantized(
    model_dir: str | Path, out_dir: str | Path, quantization, dtype: str = "auto"
) -> Path:
    """Load `model_dir` on the CPU, quantize it, and write a Baton checkpoint to `out_dir`.
    `quantization` as EngineConfig takes it; `dtype` the dtype of the unquantized rest (and of
    int4 scales); "auto": the checkpoint's."""
    from engine.attention.backend import AttentionSpec
    from engine.attention.torch_backend import TorchAttentionBackend
    from engine.config import ModelConfig, parse_dtype
    from engine.loader import load_model

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cfg = QuantConfig.parse(quantization)
    if cfg is None:
        raise ValueError("save_quantized needs a quantization")
    if stored_quantization(model_dir) is not None:
        raise ValueError(f"{model_dir} is already quantized")
    model_config = ModelConfig.from_pretrained(model_dir)
    torch_dtype = parse_dtype(model_config.torch_dtype if dtype == "auto" else dtype)
    backend = TorchAttentionBackend(
        AttentionSpec(
            num_heads=model_config.num_heads,
            num_kv_heads=model_config.num_kv_heads,
            head_dim=model_config.head_dim,
            scale=1.0,
        )
    )
    model = load_model(model_dir, model_config, backend, torch_dtype, torch.device("cpu"), cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        skip = path.suffix == ".safetensors" or path.name in (
            "config.json",
            "model.safetensors.index.json",
        )
        if path.is_file() and not skip:
            shutil.copy2(path, out_dir / path.name)
    tensors = {name: t.contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": QUANT_METHOD, **cfg.to_dict()}
    config["torch_dtype"] = str(torch_dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
