from engine.attention.backend import AttentionBackend, AttentionMetadata, AttentionSpec
from engine.attention.torch_backend import TorchAttentionBackend

__all__ = ["AttentionBackend", "AttentionMetadata", "AttentionSpec", "TorchAttentionBackend"]
