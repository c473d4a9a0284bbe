"""Shared fixtures: small random-weight checkpoints and the transformers reference on them."""

from __future__ import annotations

import functools

import pytest
import torch

from engine.testing import write_test_checkpoint

# 16 prompt lengths from 1 to 300: block-boundary cases (15, 16, 17, 31, 33) included.
PROMPT_LENGTHS = [1, 2, 3, 7, 15, 16, 17, 31, 33, 64, 100, 128, 150, 200, 257, 300]


def random_prompts(lengths, vocab_size=512, seed=0, low=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, vocab_size, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The default test model: Llama, GQA (4 heads, 2 KV heads), 2 layers, with a tokenizer."""
    return write_test_checkpoint(tmp_path_factory.mktemp("llama"))


class Reference:
    """Greedy generation and logits from `transformers` on the same checkpoint (float32)."""

    def __init__(self, path):
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.model.eval()
        # Generate past EOS without suppressing it, as the engine's `ignore_eos` does
        # (`min_new_tokens` would instead forbid EOS and change the greedy choice).
        self.model.generation_config.eos_token_id = None

    @functools.lru_cache(maxsize=None)
    def _greedy(self, prompt: tuple[int, ...], max_tokens: int) -> tuple[int, ...]:
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return tuple(out[0, len(prompt):].tolist())

    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        return list(self._greedy(tuple(prompt), max_tokens))

    def last_logits(self, prompt: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.model(torch.tensor([prompt])).logits[0, -1]


@pytest.fixture(scope="session")
def reference(model_dir):
    return Reference(model_dir)
