"""Loading a Hugging Face model folder: one or several `*.safetensors` files (with their index)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from engine.attention.backend import AttentionBackend
from engine.config import ModelConfig
from engine.models.llama import LlamaForCausalLM
from engine.models.moe import checkpoint_target
from engine.quantization.checkpoint import stored_quantization
from engine.quantization.config import QuantConfig
from engine.quantization.linear import quantize_model

log = logging.getLogger(__name__)

# Tensors some checkpoints carry that the model recomputes instead of loading.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{model_dir}: index names weight files that are missing: {missing}"
            )
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weight files found")
    return files


def load_model(
    model_dir: str | Path,
    cfg: ModelConfig,
    backend: AttentionBackend,
    dtype: torch.dtype,
    device: torch.device,
    quantization: QuantConfig | None = None,
) -> LlamaForCausalLM:
    """Build the model without allocating, then fill every parameter from the checkpoint.

    A parameter may come in parts (MoE experts stored one matrix each: `moe.checkpoint_target`
    says which part a tensor fills); it counts as loaded once its parts cover all its elements.

    `quantization`: the linears are quantized once loaded (engine/quantization). A checkpoint
    Baton saved quantized is built quantized and loaded as it is."""
    model_dir = Path(model_dir)
    files = weight_files(model_dir)
    stored = stored_quantization(model_dir)
    if stored is not None and quantization not in (None, stored):
        raise ValueError(
            f"{model_dir} is quantized as {stored}; it cannot be loaded as {quantization}"
        )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, backend)
    model = model.to(dtype)
    if stored is not None:
        quantize_model(model, stored)  # on meta: the quantized layout, to load into
    model = model.to_empty(device=device)
    params = dict(model.named_parameters())
    loaded_elements = dict.fromkeys(params, 0)
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                target, part = checkpoint_target(name, cfg.moe_intermediate_size)
                if target not in params:
                    if name == "lm_head.weight" and cfg.tie_word_embeddings:
                        continue
                    log.warning("ignoring unexpected tensor %s in %s", name, path.name)
                    continue
                tensor = f.get_tensor(name)
                dest = params[target][part]
                if tensor.shape != dest.shape:
                    raise ValueError(
                        f"{path.name}: {name} has shape {tuple(tensor.shape)}, "
                        f"config implies {tuple(dest.shape)}"
                    )
                with torch.no_grad():
                    dest.copy_(tensor.to(dest.dtype))
                loaded_elements[target] += dest.numel()
    missing = sorted(n for n, p in params.items() if loaded_elements[n] != p.numel())
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{model_dir}: checkpoint lacks {len(missing)} weights: {shown}")
    if quantization is not None and stored is None:
        quantize_model(model, quantization)
    model.rotary.build(device)
    return model.eval().requires_grad_(False)
