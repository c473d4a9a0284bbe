"""Chat messages -> prompt text, with a checkpoint's Jinja2 chat template.

Templates come from the model folder as transformers saves them (`chat_template` in
`tokenizer_config.json`, or `chat_template.jinja` beside it), or from the serving config. They
are rendered as `transformers.apply_chat_template` renders them: a sandboxed Jinja2
environment with `trim_blocks` and `lstrip_blocks`, the `tojson` filter without HTML escaping,
`raise_exception` and `strftime_now`, and `bos_token` / `eos_token` as strings.

The rendered text already holds whatever special tokens the template writes (often BOS), so
encode it without adding special tokens again: `Tokenizer.encode(text, add_special_tokens=False)`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # the Jinja2 text
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        return render_chat_template(
            self.source,
            messages,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, override: str | None = None
    ) -> ChatTemplate | None:
        """The template a model folder defines, or `override` (template text or a file path)
        in its place; None if there is neither. Called once per tier at startup."""
        model_dir = Path(model_dir)
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if override:
            source = read_template(override)
        elif (model_dir / "chat_template.jinja").is_file():
            source = (model_dir / "chat_template.jinja").read_text()
        else:
            source = config.get("chat_template")
            if isinstance(source, list):  # several named templates: the "default" one
                named = {t.get("name"): t.get("template") for t in source}
                source = named.get("default")
        if not source:
            return None
        return cls(
            source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        )


def read_template(value: str) -> str:
    """A config's `chat_template`: Jinja2 text itself, or the path of a file holding it."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"chat_template: {value!r} is neither a Jinja2 template nor a file")
    return path.read_text()


def render_chat_template(
    source: str,
    messages: list[dict],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    **kwargs,
) -> str:
    """Render `messages` (dicts with `role` and `content`); raises ValueError when the template
    rejects them (e.g. roles that do not alternate) or is not valid Jinja2."""
    try:
        return _compile(source).render(
            messages=messages,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template: {e}") from None


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    # NOTE: templates from the Hub are untrusted code: only the sandbox renders them.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _token_text(token: str | dict | None) -> str:
    # tokenizer_config writes a token as a string or as an AddedToken dict.
    if isinstance(token, dict):
        return token.get("content") or ""
    return token or ""
