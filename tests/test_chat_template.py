"""Chat templates: rendered as transformers renders them, found where transformers saves them."""

from __future__ import annotations

import json

import pytest

from engine.chat_template import ChatTemplate, render_chat_template
from engine.testing import BOS_TOKEN_ID, CHAT_TEMPLATE
from engine.tokenizer import Tokenizer

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who is Alice?"},
    {"role": "assistant", "content": "A girl “down the rabbit-hole”."},
    {"role": "user", "content": "And the café? 日本 🙂"},
]


def test_test_checkpoint_template_equals_transformers(model_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(model_dir)
    template = ChatTemplate.from_pretrained(model_dir)
    assert template is not None and template.bos_token == "<s>"
    text = template.render(MESSAGES)
    assert text == hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    # The template writes BOS itself: encoding must not add a second one.
    ids = Tokenizer.from_pretrained(model_dir).encode(text, add_special_tokens=False)
    hf_ids = hf(text, add_special_tokens=False)["input_ids"]  # what apply_chat_template does
    assert ids == hf_ids
    assert ids[0] == BOS_TOKEN_ID and ids[1] != BOS_TOKEN_ID


def test_template_sources_and_override(tmp_path, model_dir):
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    folder = tmp_path / "m"
    folder.mkdir()
    # No template anywhere: None, so the server can refuse chat with a clear message.
    (folder / "tokenizer_config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != "chat_template"})
    )
    assert ChatTemplate.from_pretrained(folder) is None
    # A list of named templates (as some Hub checkpoints have): the default one.
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ 1 }}"}]
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named}))
    assert ChatTemplate.from_pretrained(folder).source == "{{ 1 }}"
    # chat_template.jinja (transformers' newer layout) wins over tokenizer_config.
    (folder / "chat_template.jinja").write_text("{{ eos_token }}")
    assert ChatTemplate.from_pretrained(folder).render([]) == "</s>"
    # A config override: template text, or a path to a file.
    assert ChatTemplate.from_pretrained(folder, "X{{ bos_token }}").render([]) == "X<s>"
    (tmp_path / "t.jinja").write_text("{{ messages | length }}")
    assert ChatTemplate.from_pretrained(folder, str(tmp_path / "t.jinja")).render(MESSAGES) == "4"
    with pytest.raises(ValueError, match="neither a Jinja2 template nor a file"):
        ChatTemplate.from_pretrained(folder, str(tmp_path / "missing.jinja"))


def test_template_errors_and_globals():
    strict = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('system messages are not supported') }}{% endif %}"
        "{{ m['content'] | tojson }}{% endfor %}"
    )
    assert render_chat_template(strict, [{"role": "user", "content": "<é>"}]) == '"<é>"'
    with pytest.raises(ValueError, match="system messages are not supported"):
        render_chat_template(strict, MESSAGES)
    with pytest.raises(ValueError, match="chat template"):
        render_chat_template("{% for %}", MESSAGES)
    # Sandboxed: no reaching into Python internals.
    with pytest.raises(ValueError):
        render_chat_template("{{ messages.__class__.__subclasses__() }}", MESSAGES)
    assert render_chat_template(CHAT_TEMPLATE, MESSAGES[:1], add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
    )


def test_config_checks_the_chat_template_and_http_port(tmp_path):
    from deploy.config import BatonConfig

    def config(tier: dict, **top) -> BatonConfig:
        pools = [{"tier": "t", "role": "prefill"}, {"tier": "t", "role": "decode"}]
        return BatonConfig.from_dict({"tiers": {"t": tier}, "pools": pools, **top})

    assert config({"chat_template": "{{ 1 }}"}).tiers["t"].chat_template == "{{ 1 }}"
    with pytest.raises(ValueError, match=r"config: tiers\.t\.chat_template: .* nor a file"):
        config({"chat_template": str(tmp_path / "missing.jinja")})
    with pytest.raises(ValueError, match="http_port must be in"):
        config({}, http_port=70000)
    assert config({}, http_port=None).http_port is None and config({}).http_port == 8000
