"""Text <-> token ids for a Hugging Face checkpoint folder, and streaming detokenization.

Uses only the `tokenizers` library: the engine serves token ids and needs text only at the
edges (prompt in, streamed deltas out), so it does not pull in `transformers`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import tokenizers


class Tokenizer:
    """A checkpoint's `tokenizer.json`, plus the special-token settings from its config files.

    Build one with `from_pretrained`. The server encodes prompts given as text with it, and
    streams output text through `IncrementalDetokenizer`.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: list[int],
        add_bos_token: bool | None = None,
    ):
        """`add_bos_token` is tokenizer_config.json's flag, None if the file does not set it."""
        self._backend = backend
        self._bos_token_id = bos_token_id
        self._eos_token_ids = list(eos_token_ids)
        # If tokenizer.json's post-processor already adds BOS (Llama 2 and 3, Mistral), it is
        # added there; otherwise we add it, as the config asks or, if it says nothing,
        # whenever the checkpoint defines a BOS token.
        # NOTE: transformers 5 ignores add_bos_token when tokenizer.json exists and adds only
        # what the post-processor adds; transformers 4's LlamaTokenizerFast honoured the flag
        # (default true). They differ only when the post-processor adds no BOS; we follow 4.
        probe = backend.encode("a", add_special_tokens=True).ids
        post_processor_adds_bos = bos_token_id is not None and probe[:1] == [bos_token_id]
        wants_bos = add_bos_token if add_bos_token is not None else True
        self._prepend_bos = bos_token_id is not None and wants_bos and not post_processor_adds_bos

    def to_json(self) -> str:
        """The backend tokenizer as `tokenizer.json` text (structured output builds its token
        automaton from it), without padding or truncation."""
        backend = copy.copy(self._backend)
        backend.no_padding()
        backend.no_truncation()
        return backend.to_str()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Tokenizer | None:
        """Load the tokenizer of a Hugging Face model folder.

        Returns None when the folder has no `tokenizer.json`: the tokenizer is optional for
        requests whose prompts are token ids. Special tokens come from `tokenizer_config.json`,
        `generation_config.json` and `config.json` when present.
        """
        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").is_file():
            return None
        backend = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tokenizer_config = _read_json(model_dir / "tokenizer_config.json")
        generation_config = _read_json(model_dir / "generation_config.json")
        model_config = _read_json(model_dir / "config.json")

        def token_id(token: str | dict | None) -> int | None:
            # tokenizer_config writes a token as a string or as an AddedToken dict.
            content = token.get("content") if isinstance(token, dict) else token
            return backend.token_to_id(content) if content is not None else None

        # A tokenizer_config that names bos_token (even as null, like Qwen2's) is the
        # authority; config files' bos_token_id is only a fallback.
        if "bos_token" in tokenizer_config:
            bos_token_id = token_id(tokenizer_config["bos_token"])
        else:
            bos_token_id = generation_config.get("bos_token_id", model_config.get("bos_token_id"))

        for source in (generation_config.get("eos_token_id"), model_config.get("eos_token_id")):
            if source is not None:
                eos_token_ids = source if isinstance(source, list) else [source]
                break
        else:
            eos_id = token_id(tokenizer_config.get("eos_token"))
            eos_token_ids = [eos_id] if eos_id is not None else []

        return cls(
            backend,
            bos_token_id=bos_token_id,
            eos_token_ids=list(dict.fromkeys(eos_token_ids)),  # dedupe, keep order
            add_bos_token=tokenizer_config.get("add_bos_token"),
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, starting with one BOS token if the checkpoint uses one (unless
        `add_special_tokens` is False: a rendered chat template writes its own BOS).

        Special-token text in `text` (e.g. "</s>") is parsed as that special token, as
        Hugging Face tokenizers do.
        """
        ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        prepend_bos = self._prepend_bos and add_special_tokens
        return [self._bos_token_id, *ids] if prepend_bos else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Bytes of an incomplete UTF-8 character decode to U+FFFD."""
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation (generation_config.json may list several, as Llama 3 does)."""
        return list(self._eos_token_ids)

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer knows, added tokens included. The model's embedding may be
        larger (checkpoints often pad it), so size model tensors from config.json instead."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        """Sorted ids of special added tokens and of BOS/EOS."""
        special = {i for i, tok in self._backend.get_added_tokens_decoder().items() if tok.special}
        special.update(self._eos_token_ids)
        if self._bos_token_id is not None:
            special.add(self._bos_token_id)
        return sorted(special)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text deltas, as they arrive.

    The caller (the detokenizing side of the server) creates one per request and calls
    `append` after every step. Deltas never contain a partial UTF-8 character: byte-level BPE
    can split a character over several tokens, and such text is held back until complete.

    This is the prefix/read offset algorithm of vLLM and HF TGI. Only a short window of ids is
    decoded each step, so the cost per token does not grow with the output length:

        ids:  ... | prefix window     | unread tokens |
                  ^prefix_offset      ^read_offset
        prefix_text = decode(prefix window)      (already emitted)
        new_text    = decode(prefix window + unread tokens)
        delta       = new_text[len(prefix_text):], once it does not end in U+FFFD

    The prefix window is there because a token's text can depend on the tokens before it
    (SentencePiece drops a leading space at the start of a decode).
    """

    # Prompt tokens kept as context for the first output tokens (vLLM uses the same).
    INITIAL_CONTEXT_TOKENS = 5

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True
    ):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Only ids from prefix_offset on are kept; earlier ones are never decoded again.
        self._window = list(prompt_token_ids[-self.INITIAL_CONTEXT_TOKENS :])
        self._read_offset = len(self._window)  # index into _window
        self._prefix_text = self._decode(self._window)
        self._deltas: list[str] = []

    def append(self, new_token_ids: list[int]) -> str:
        """Add newly generated ids; return the text they complete ("" if none yet)."""
        self._window.extend(new_token_ids)
        new_text = self._decode(self._window)
        # NOTE: a trailing U+FFFD means the last token ends inside a multi-byte character
        # (or the model emitted invalid bytes); hold it back until more bytes come.
        if len(new_text) <= len(self._prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(self._prefix_text) :]
        # The tokens just read become the next prefix window.
        self._window = self._window[self._read_offset :]
        self._read_offset = len(self._window)
        self._prefix_text = self._decode(self._window)
        self._deltas.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far: the concatenation of the deltas."""
        if len(self._deltas) > 1:
            self._deltas = ["".join(self._deltas)]
        return self._deltas[0] if self._deltas else ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
