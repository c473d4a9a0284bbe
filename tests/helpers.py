"""Helpers shared by the tests: prompts, and the transformers reference on a checkpoint."""

from __future__ import annotations

import torch

# 16 prompt lengths from 1 to 300: block-boundary cases (15, 16, 17, 31, 33) included.
PROMPT_LENGTHS = [1, 2, 3, 7, 15, 16, 17, 31, 33, 64, 100, 128, 150, 200, 257, 300]


def random_prompts(lengths, vocab_size=512, seed=0, low=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, vocab_size, (n,), generator=g).tolist() for n in lengths]


def greedy(llm, prompts, max_tokens: int) -> list[list[int]]:
    """`engine.LLM`'s greedy tokens for the prompts (EOS ignored, as the serving tests ask)."""
    from engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompts, params)]


class Reference:
    """Greedy generation and logits from `transformers` on the same checkpoint (float32)."""

    def __init__(self, path):
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.model.eval()
        # Generate past EOS without suppressing it, as the engine's `ignore_eos` does
        # (`min_new_tokens` would instead forbid EOS and change the greedy choice).
        self.model.generation_config.eos_token_id = None
        self._cache: dict[tuple, list[int]] = {}

    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        key = (tuple(prompt), max_tokens)
        if key not in self._cache:
            self._cache[key] = self._generate(prompt, max_tokens)
        return self._cache[key]

    def _generate(self, prompt: list[int], max_tokens: int) -> list[int]:
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return out[0, len(prompt) :].tolist()

    def last_logits(self, prompt: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.model(torch.tensor([prompt])).logits[0, -1]


def capture_first_logits(llm) -> dict:
    """Record, per request id, the logits row its first token was sampled from (filled as
    `llm` runs): the prompt's last-position logits."""
    captured = {}
    execute = llm.engine.runner.execute

    def capture(sched):
        out = execute(sched)
        for row, rid in enumerate(out.sampled):
            captured.setdefault(rid, out.logits[row].clone())
        return out

    llm.engine.runner.execute = capture
    return captured
