"""The offline API: `LLM(model=...).generate(prompts, sampling_params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from engine.config import EngineConfig
from engine.engine import LLMEngine, RequestOutput
from engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str, **engine_args):
        """`engine_args` are EngineConfig's fields; `speculative_config` (vLLM's name) is
        accepted for `speculative`."""
        if "speculative_config" in engine_args:
            engine_args["speculative"] = engine_args.pop("speculative_config")
        self.engine = LLMEngine(EngineConfig(model=str(model), **engine_args))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; one finished output per prompt, in order.

        A prompt is a string or a list of token ids. `sampling_params` is one for all prompts or
        one per prompt. Every prompt is validated before any is run."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(
                f"got {len(sampling_params)} sampling params for {len(prompts)} prompts"
            )
        made = [
            self.engine.make_request(f"offline-{next(self._ids)}", p, sp, output_kind="final")
            for p, sp in zip(prompts, sampling_params)
        ]
        order = {req.request_id: i for i, (req, _) in enumerate(made)}
        for req, state in made:
            self.engine.enqueue(req, state)
        results: list[RequestOutput | None] = [None] * len(prompts)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[order[out.request_id]] = out
        except BaseException:
            for rid in order:
                self.engine.abort_request(rid)
            raise
        return results
