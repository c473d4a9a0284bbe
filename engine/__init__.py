"""Baton's model runtime: paged KV cache, continuous batching, chunked prefill, prefix caching."""

from engine.config import EngineConfig, ModelConfig
from engine.engine import LLMEngine, RequestOutput
from engine.llm import LLM
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "EngineConfig", "LLMEngine", "ModelConfig", "RequestOutput", "SamplingParams"]
