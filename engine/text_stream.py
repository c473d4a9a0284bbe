"""Streaming output text with stop strings."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.tokenizer import IncrementalDetokenizer


@dataclass
class TextStream:
    """One request's output text: incremental detokenization, stop strings, and how much of
    the text is safe to stream (a tail that may begin a stop string is held back).

    Used by the engine offline and by the router when serving."""

    prompt: str | None
    detokenizer: IncrementalDetokenizer | None
    stop: list[str]
    include_stop: bool
    text: str = ""
    num_emitted_chars: int = 0
    num_emitted_tokens: int = 0
    stop_hit: str | None = field(default=None)
    output_kind: str = "cumulative"  # the engine's outputs for it (engine.engine.OUTPUT_KINDS)

    def append(self, new_token_ids: list[int]) -> None:
        if self.detokenizer is None:
            return
        before = len(self.text)
        self.text += self.detokenizer.append(new_token_ids)
        for stop in self.stop:
            # Only the new text and the tail that could complete a stop string need a look.
            at = self.text.find(stop, max(0, before - len(stop) + 1))
            if at != -1:
                self.text = self.text[: at + len(stop) if self.include_stop else at]
                self.stop_hit = stop
                return

    def releasable_chars(self, finished: bool) -> int:
        """Text safe to stream: hold back a tail that may be the start of a stop string."""
        if finished or not self.stop:
            return len(self.text)
        return max(self.num_emitted_chars, len(self.text) - (max(map(len, self.stop)) - 1))

    def take_delta(self, finished: bool) -> str:
        """The text not streamed yet that is safe to stream now; marks it streamed."""
        release = self.releasable_chars(finished)
        delta = self.text[self.num_emitted_chars : release]
        self.num_emitted_chars = release
        return delta
