"""Structured output: sampling constrained to a JSON schema, a regular expression or a choice list.

The constraint becomes a token-level automaton over the tokenizer's vocabulary, built by
llguidance (a lexer over the token trie under an Earley parser; masks are computed lazily per
step, so even large schemas compile in milliseconds). Baton only wires it into the step:

    SamplingParams.__post_init__  grammar_text(): the constraint as llguidance grammar, checked
                                  (bad JSON schema or regex -> ValueError, before any model work)
    LLMEngine.make_request        GrammarCompiler.grammar(): the request's own matcher, checked
                                  against this model's tokenizer; it consumes the tokens a retry
                                  put back into the prompt (`num_structured_prompt_tokens`)
    ModelRunner.execute           GrammarMasker.start(): one bitmask for all constrained rows of
                                  the step, filled by llguidance's thread pool (GIL released)
                                  while the forward pass runs; .apply() masks the logits with one
                                  op after it. A step with no constrained request skips all this
    Request.append_output_token   the matcher consumes every accepted token, however it came
                                  (sampled, an accepted draft, a prefill worker's first token)
    Scheduler._check_stop         a matcher that is stopped (the grammar is complete and nothing
                                  can follow) finishes the request; EOS is allowed only where the
                                  grammar accepts

Preemption by recompute keeps the matcher: the request keeps its output tokens, so the state is
still right when it samples again. Speculative decoding verifies drafts against the grammar: the
row scoring draft j is masked with the state after drafts 1..j-1 (llguidance consumes the drafts,
computes the masks and rolls back), so a draft the grammar forbids has probability 0 and is
rejected, and the correction token is drawn from a masked row.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from engine.grammar import load_llguidance


class GrammarMasker:
    """Per runner: the step's constrained rows in one int32 bitmask (bit t of row r set: token
    t allowed), filled on a worker thread so it overlaps the forward pass, applied in one op.

        logits rows | r0 | r1 r1 r1 | r2 | r3 |     r1 verifies 2 drafts; r0, r2 constrained
        bitmask     | r0 | r1 r1 r1 |      r3 |     rows: [0, 1, 2, 3, 5]
    """

    def __init__(self, vocab_size: int, device: torch.device, overlap: bool | None = None):
        """`overlap` (default: on CUDA) fills the masks on a worker thread while the forward
        pass runs; on CPU the forward pass keeps every core busy itself, so they are filled
        inline (a thread handoff costs more than it saves there)."""
        self.vocab_size = vocab_size
        self.num_words = (vocab_size + 31) // 32
        self.device = device
        self.overlap = device.type == "cuda" if overlap is None else overlap
        self._executor = None  # llguidance's thread pool, built on first use
        self._thread: ThreadPoolExecutor | None = None
        self._shifts = torch.arange(32, dtype=torch.int32, device=device)

    def start(self, requests: list, drafts: list[list[int]]) -> PendingMask | None:
        """Begin filling the masks of `requests`' sampled rows (in logits order; each request
        has len(its drafts) + 1 rows). Returns None when none is constrained: then the step
        pays nothing. The matchers must not change until the result is taken."""
        entries, rows, row = [], [], 0
        for request, draft in zip(requests, drafts):
            if request.grammar is not None:
                entries.append((request.grammar.matcher, len(rows), list(draft)))
                rows.extend(range(row, row + len(draft) + 1))
            row += len(draft) + 1
        if not entries:
            return None
        if self._executor is None:
            num_threads = max(1, min(8, (os.cpu_count() or 2) // 2))
            self._executor = load_llguidance().LLExecutor(num_threads)
            if self.overlap:
                self._thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        pin = self.device.type == "cuda"
        # -1: all allowed, for rows past a draft the grammar rejects (llguidance stops there;
        # those rows are never reached, since that draft has probability 0).
        shape = (len(rows), self.num_words)
        bitmask = torch.full(shape, -1, dtype=torch.int32, pin_memory=pin)
        if self.overlap:
            future = self._thread.submit(self._fill, entries, bitmask.data_ptr(), len(rows))
        else:
            future = Future()
            future.set_result(self._fill(entries, bitmask.data_ptr(), len(rows)))
        return PendingMask(self, future, bitmask, rows)

    def _fill(self, entries, ptr: int, num_rows: int) -> None:
        """On the worker thread: llguidance writes the rows in native code (no torch here: the
        tensor belongs to the caller's inference mode)."""
        row_bytes = self.num_words * 4
        plain = [(matcher, index) for matcher, index, draft in entries if not draft]
        if plain:
            self._executor.unsafe_compute_mask_ptr(plain, ptr, row_bytes, num_rows)
        # With drafts: llguidance consumes them one by one, writes each state's mask in the
        # rows that follow, and rolls the matcher back.
        speculated = [entry for entry in entries if entry[2]]
        if speculated:
            self._executor.unsafe_compute_mask_ptr_with_draft_token(
                speculated, ptr, row_bytes, num_rows
            )


class PendingMask:
    """A step's masks being filled; `apply` waits for them."""

    def __init__(self, masker: GrammarMasker, future: Future, bitmask: torch.Tensor, rows):
        self.masker, self.future, self.bitmask, self.rows = masker, future, bitmask, rows

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of `logits` with the forbidden tokens of the constrained rows at -inf."""
        self.future.result()
        m = self.masker
        bits = self.bitmask.to(m.device, non_blocking=True)
        allowed = ((bits.unsqueeze(-1) >> m._shifts) & 1).view(len(self.rows), -1).bool()
        allowed = allowed[:, : logits.shape[-1]]
        rows = torch.tensor(self.rows, device=logits.device)
        masked = logits.clone()
        masked[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
        return masked
