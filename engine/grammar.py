"""Structured output constraints as llguidance grammars, and each request's matcher.

Torch-free, so the router can validate constraints (through SamplingParams) cheaply. How the
pieces fit into the engine step: engine/structured_output.py.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from functools import lru_cache

log = logging.getLogger(__name__)

# JSON schemas are compact by default: whitespace only as `json.dumps` writes it (", ", ": ").
# NOTE: flexible whitespace lets a weak model loop on spaces and newlines until max_tokens.
_JSON_OPTIONS = {"whitespace_flexible": False}
# Compiled grammars kept per engine (a new request copies one; compiling again costs ms).
_MAX_CACHED_GRAMMARS = 64


def load_llguidance():
    """The library, imported on first use (only constrained requests need it)."""
    import llguidance

    return llguidance


@lru_cache(maxsize=256)
def _grammar_text(kind: str, spec: str) -> str:
    """`spec` is the JSON schema as canonical JSON text, the regex, or the choices as a JSON
    list. Raises ValueError with llguidance's message when the constraint is invalid."""
    matcher = load_llguidance().LLMatcher
    try:
        if kind == "json_schema":
            grammar = matcher.grammar_from_json_schema(spec, defaults=_JSON_OPTIONS)
        elif kind == "regex":
            grammar = matcher.grammar_from_regex(spec)
        else:  # choice: a Lark rule of string literals (JSON string escapes are Lark's too)
            literals = (json.dumps(c, ensure_ascii=False) for c in json.loads(spec))
            grammar = "start: " + " | ".join(literals)
    except Exception as e:  # llguidance raises plain exceptions for malformed input
        raise ValueError(f"invalid {kind}: {e}") from None
    is_error, messages = matcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"invalid {kind}: {messages[0].strip()}")
    return grammar


def grammar_text(json_schema: dict | None, regex: str | None, choice: list[str] | None) -> str:
    """The llguidance grammar for the one constraint given (SamplingParams checks that it is
    exactly one); cached, so re-validating copied SamplingParams costs a dict lookup."""
    if json_schema is not None:
        return _grammar_text("json_schema", json.dumps(json_schema))
    if regex is not None:
        return _grammar_text("regex", regex)
    return _grammar_text("choice", json.dumps(choice))


class Grammar:
    """One request's matcher. Owned by its `Request`; advanced only by its accepted tokens."""

    def __init__(self, matcher):
        self.matcher = matcher

    def accept(self, token_id: int) -> None:
        # NOTE: a token outside the mask (only a bug could append one) leaves the matcher in
        # its error state, which is_terminated reports: the request ends instead of going on
        # unconstrained.
        if not self.matcher.consume_token(token_id):
            log.warning("token %d rejected by the grammar: %s", token_id, self.matcher.get_error())

    @property
    def is_terminated(self) -> bool:
        """True when nothing may follow: the grammar is complete, EOS was taken, or error."""
        return self.matcher.is_stopped() or self.matcher.is_error()

    @property
    def is_accepting(self) -> bool:
        return self.matcher.is_accepting()


class GrammarCompiler:
    """Per engine: the tokenizer as llguidance sees it, and compiled grammars. The engine builds
    it on the first constrained request (scanning the vocabulary takes 10-300 ms)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]):
        llg = load_llguidance()
        # n_vocab: the model's logits width, which may exceed the tokenizer's vocabulary; the
        # ids past the tokenizer's are never allowed.
        self.tokenizer = llg.LLTokenizer(
            tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids)
        )
        self._compiled: OrderedDict[str, object] = OrderedDict()

    def grammar(self, grammar: str, prefix_token_ids: list[int]) -> Grammar:
        """A fresh matcher for `grammar` (from `grammar_text`), after `prefix_token_ids`.
        Raises ValueError if the grammar cannot work with this tokenizer or the prefix breaks
        it."""
        template = self._compiled.get(grammar)
        if template is None:
            template = load_llguidance().LLMatcher(self.tokenizer, grammar, log_level=0)
            if template.is_error():
                raise ValueError(f"invalid structured output constraint: {template.get_error()}")
            self._compiled[grammar] = template
            if len(self._compiled) > _MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(grammar)
        matcher = template.deep_copy()
        if prefix_token_ids and not matcher.consume_tokens(prefix_token_ids):
            raise ValueError(
                "the prompt's last num_structured_prompt_tokens tokens do not follow the "
                f"structured output constraint: {matcher.get_error()}"
            )
        return Grammar(matcher)
