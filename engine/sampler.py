"""Turning one row of logits per request into the next token, batched over the step.

Order of operations (the usual one): penalties on raw logits → greedy rows take the argmax →
temperature → top-k → top-p → min-p → draw. Logprobs are reported from the raw model
distribution (before penalties and temperature), as the OpenAI API does.

The draw uses the exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks i with
probability p_i. The noise comes from the request's own generator when it has a seed, so its
samples do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.request import Request
from engine.speculative import accept_greedy, rejection_sample


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: None, or (sampled token's logprob, [(token id, logprob), ...] top-n).
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, requests: list[Request], raw_logits: torch.Tensor | None = None
    ) -> SamplerOutput:
        """`raw_logits`: the model's, when `logits` were masked (structured output); logprobs
        come from them. Without, `logits` are the model's."""
        if all_plain_greedy(requests):  # one argmax, one copy to the host
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * len(requests))
        raw = (logits if raw_logits is None else raw_logits).float()
        logits = logits.float()
        if any(r.sampling_params.has_penalties for r in requests):
            logits = apply_penalties(logits.clone(), requests)
        params = [r.sampling_params for r in requests]
        tokens = logits.argmax(dim=-1)
        # Decided on the host: an all-greedy batch costs one argmax and one device sync.
        greedy = [p.greedy for p in params]
        if not all(greedy):
            sampled = self._sample(logits, requests)
            tokens = torch.where(torch.tensor(greedy, device=logits.device), tokens, sampled)
        token_ids = tokens.tolist()
        return SamplerOutput(token_ids, self._logprobs(raw, token_ids, requests))

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        return self.draw(self.probs(logits, requests), requests)

    def draw(self, probs: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """One token per row of `probs` (need not be normalized), each from its request's
        random stream. Also draws a draft model's proposals."""
        noise = torch.empty_like(probs)
        for i, request in enumerate(requests):
            noise[i].exponential_(generator=self._generator_for(request))
        return (probs / noise).argmax(dim=-1)

    def probs(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """The distribution each row is drawn from: temperature, top-k, top-p, min-p applied
        (unnormalized after min-p). Speculative verification compares drafts against it."""
        params = [r.sampling_params for r in requests]
        device = logits.device
        temperature = torch.tensor([p.temperature or 1.0 for p in params], device=device)
        logits = logits / temperature[:, None]
        if any(p.top_k for p in params):
            vocab = logits.shape[-1]
            k = torch.tensor([p.top_k or vocab for p in params], device=device).clamp(max=vocab)
            kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if any(p.top_p < 1.0 for p in params):
            logits = _top_p(logits, torch.tensor([p.top_p for p in params], device=device))
        probs = logits.softmax(dim=-1)
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=device)
            probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), 0.0)
        return probs

    def skip_draw(self, request: Request, vocab_size: int) -> None:
        """Advance a seeded request's stream past one sampling step done on another worker."""
        params = request.sampling_params
        if params.seed is not None and not params.greedy:
            noise = torch.empty(vocab_size, device=self.device)
            noise.exponential_(generator=self._generator_for(request))

    def verify(
        self, logits: torch.Tensor, requests: list[Request], drafts: list[list[int]]
    ) -> list[list[int]]:
        """Speculative verification: `logits` holds len(draft) + 1 rows per request, in order.
        Returns each request's accepted drafts followed by one token of the target's (see
        engine/speculative.py). Called by the runner for requests that carried drafts."""
        raw = logits.float()
        argmax = raw.argmax(dim=-1).tolist()
        row_requests = [r for r, d in zip(requests, drafts) for _ in range(len(d) + 1)]
        probs = None
        if not all(r.sampling_params.greedy for r in requests):
            probs = self.probs(raw, row_requests)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        tokens, start = [], 0
        for request, draft in zip(requests, drafts):
            end = start + len(draft) + 1
            if request.sampling_params.greedy:
                tokens.append(accept_greedy(draft, argmax[start:end]))
            else:
                gen = self._generator_for(request)
                # A draft model's q (its processed distribution, one row per draft); None
                # for n-gram drafts, a point mass.
                q = request.spec_draft_probs
                q = None if q is None else q[: len(draft)]
                tokens.append(rejection_sample(probs[start:end], draft, q, gen))
            start = end
        return tokens

    def _generator_for(self, request: Request) -> torch.Generator:
        seed = request.sampling_params.seed
        if seed is None:
            return self.generator
        if request.generator is None:
            request.generator = torch.Generator(device=self.device).manual_seed(seed)
        return request.generator

    @staticmethod
    def _logprobs(raw: torch.Tensor, token_ids: list[int], requests: list[Request]):
        wanted = [r.sampling_params.logprobs for r in requests]
        if all(n is None for n in wanted):
            return [None] * len(requests)
        logprobs = raw.log_softmax(dim=-1)
        max_n = max(n or 0 for n in wanted)
        top = logprobs.topk(max_n, dim=-1) if max_n else None
        chosen = logprobs.gather(1, torch.tensor(token_ids, device=raw.device)[:, None])[
            :, 0
        ].tolist()
        result = []
        for i, n in enumerate(wanted):
            if n is None:
                result.append(None)
                continue
            pairs = []
            if n:
                pairs = list(zip(top.indices[i, :n].tolist(), top.values[i, :n].tolist()))
            result.append((chosen[i], pairs))
        return result


def all_plain_greedy(requests: list[Request]) -> bool:
    """True when every request's next token is its logits row's argmax and nothing else of the
    row is needed (greedy, no penalties, no logprobs). Structured output's masks are the
    caller's to check: `Sampler` gets masked logits, the runner's in-graph argmax does not."""
    for request in requests:
        p = request.sampling_params
        if p.temperature != 0.0 or p.logprobs is not None or p.has_penalties:
            return False
    return True


def _top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (always the top one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Drop a token when the tokens before it already reach top_p.
    drop = (cum - sorted_logits.softmax(dim=-1)) >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Repetition (over prompt and output, divides positive logits, multiplies negative ones, as
    in the CTRL paper and transformers), then presence and frequency (over the output)."""
    vocab = logits.shape[-1]
    for i, request in enumerate(requests):
        p = request.sampling_params
        if not p.has_penalties:
            continue
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(request.all_token_ids)), device=logits.device)
            row = logits[i, seen]
            logits[i, seen] = torch.where(
                row > 0, row / p.repetition_penalty, row * p.repetition_penalty
            )
        if request.output_token_ids and (p.presence_penalty or p.frequency_penalty):
            out = torch.tensor(request.output_token_ids, device=logits.device)
            counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(
                logits.dtype
            )
    return logits
