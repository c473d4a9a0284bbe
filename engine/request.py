"""One request's state inside the engine. The scheduler owns it; the runner only reads it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from engine.grammar import Grammar
from engine.sampling_params import SamplingParams
from engine.speculative import DraftGate


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    # Extra keys for the prefix-cache hash (e.g. an adapter name): prefixes with different extra
    # keys never share blocks.
    cache_extra_keys: tuple = ()

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Prompt + output: the tokens whose KV the request needs. Appended to as tokens are sampled.
    all_token_ids: list[int] = field(init=False)
    # How many of `all_token_ids` have their KV in the cache. Reset to 0 on preemption.
    num_computed_tokens: int = 0
    # Prompt tokens served from the prefix cache at the last admission.
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    # Per output token: (logprob of the sampled token, [(token id, logprob), ...] top-n).
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    # Draft tokens proposed for the next step (speculative decoding); the scheduler may trim them
    # and clears them once the step is scheduled.
    spec_token_ids: list[int] = field(default_factory=list)
    # With a draft model and sampling: the draft's distribution q for each of those drafts,
    # [num_drafts, vocab] (None: greedy, or n-gram drafts, a point mass). Set with them.
    spec_draft_probs: torch.Tensor | None = None
    # Dynamic speculation: whether and how many drafts it gets (its acceptance, its pauses).
    spec_gate: DraftGate = field(default_factory=DraftGate)
    # The request's own random stream when it has a seed; made by the sampler on its device.
    generator: torch.Generator | None = None
    # Structured output: the matcher of its constraint (engine/grammar.py), None without one.
    # It consumes every token appended below.
    grammar: Grammar | None = None

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.is_finished else None

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.grammar is not None:
            self.grammar.accept(token_id)
