"""How to pick each next token and when to stop. Validated on construction."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from engine.grammar import grammar_text

MAX_LOGPROBS = 20
# Bounds that keep one request from costing the server much more than its tokens: every stop
# string is searched in every new piece of text, and stop token ids are checked per token.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_TOP_K = 2**31 - 1
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes
# Structured output: a constraint's size (schema as JSON text, regex, all choices together).
MAX_STRUCTURED_CHARS = 64 * 1024
MAX_CHOICES = 1024


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0  # > 1 discourages tokens seen in the prompt or output
    presence_penalty: float = 0.0  # subtracted once from tokens already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-n logprobs per sampled token (0: only the sampled token's)
    skip_special_tokens: bool = True
    # Structured output (engine/structured_output.py), at most one: a JSON schema (a dict, or
    # its JSON text), a regular expression the whole output must match, or a list of strings
    # the output must equal one of.
    json_schema: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    # Set by the router when it retries a request: the prompt's last n tokens were generated
    # under the constraint already, and its grammar must consume them first.
    num_structured_prompt_tokens: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        for name in ("temperature", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == -1:
            self.top_k = 0
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(
                f"top_k must be -1, 0 (disabled) or in [1, {MAX_TOP_K}], got {self.top_k}"
            )
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if max(map(len, self.stop), default=0) > MAX_STOP_STRING_CHARS:
            raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(
                f"at most {MAX_STOP_TOKEN_IDS} stop token ids, got {len(self.stop_token_ids)}"
            )
        if self.seed is not None and not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        self._check_structured()

    def _check_structured(self) -> None:
        given = [n for n in ("json_schema", "regex", "choice") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of json_schema, regex, choice; got {given}")
        n = self.num_structured_prompt_tokens
        if not isinstance(n, int) or n < 0 or (n and not given):
            raise ValueError("num_structured_prompt_tokens must be >= 0 (0 without a constraint)")
        if not given:
            return
        if isinstance(self.json_schema, str):
            if len(self.json_schema) > MAX_STRUCTURED_CHARS:
                raise ValueError(f"json_schema must be at most {MAX_STRUCTURED_CHARS} characters")
            try:
                self.json_schema = json.loads(self.json_schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema is not valid JSON: {e}") from None
        if self.json_schema is not None:
            if not isinstance(self.json_schema, dict):
                raise ValueError("json_schema must be a JSON object (a dict)")
            size = len(json.dumps(self.json_schema))
        elif self.regex is not None:
            if not isinstance(self.regex, str) or not self.regex:
                raise ValueError("regex must be a non-empty string")
            size = len(self.regex)
        else:
            self.choice = list(self.choice)
            if not self.choice or any(not isinstance(c, str) or not c for c in self.choice):
                raise ValueError("choice must be a non-empty list of non-empty strings")
            if len(self.choice) > MAX_CHOICES:
                raise ValueError(f"at most {MAX_CHOICES} choices, got {len(self.choice)}")
            size = sum(map(len, self.choice))
        if size > MAX_STRUCTURED_CHARS:
            raise ValueError(f"{given[0]} must be at most {MAX_STRUCTURED_CHARS} characters")
        grammar_text(self.json_schema, self.regex, self.choice)  # raises ValueError if invalid

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def grammar(self) -> str | None:
        """The structured output constraint as llguidance grammar text, None without one."""
        if self.json_schema is None and self.regex is None and self.choice is None:
            return None
        return grammar_text(self.json_schema, self.regex, self.choice)

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
