"""Structured output in the engine: every output parses and validates against its JSON schema,
regex or choice list (greedy and sampled), through chunked prefill, preemption, speculative
decoding and the prefill → decode handoff; bad constraints are refused before any model work."""

from __future__ import annotations

import json
import re

import pytest

from engine import LLM, SamplingParams
from tests.test_handoff_engine import CopyConnector

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

SCHEMAS = [
    {  # nesting, enum, bounded integer, array of numbers, a pattern
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
            # Bounded, digits too: a random model writes digits and exponents for long.
            "scores": {
                "type": "array",
                "items": {"type": "number", "minimum": -100, "maximum": 100, "multipleOf": 0.25},
                "maxItems": 3,
            },
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 10},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "age", "role", "scores", "address"],
        "additionalProperties": False,
    },
    {  # an array of objects, booleans, null in a union
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 1, "maximum": 9999},
                "ok": {"type": "boolean"},
                "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 8}]},
            },
            "required": ["id", "ok", "note"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 3,
    },
    {"enum": ["red", "green", "blue", 42, None]},
    {  # $defs and $ref, nested arrays
        "$defs": {
            "point": {
                "type": "array",
                "items": {"type": "integer", "minimum": -50, "maximum": 50},
                "maxItems": 2,
            }
        },
        "type": "object",
        "properties": {
            "path": {"type": "array", "items": {"$ref": "#/$defs/point"}, "maxItems": 3},
            "closed": {"type": "boolean"},
        },
        "required": ["path", "closed"],
        "additionalProperties": False,
    },
]
REGEXES = [
    r"[0-9]{3}-[0-9]{4}",
    r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])",
    r"#[0-9a-f]{6}",
    r"[a-z]{1,8}( [a-z]{1,8}){0,3}\.",
]
CHOICES = [
    ["yes", "no"],
    ["positive", "negative", "neutral"],
    ["café", "naïve", "日本", 'say "hi"'],
]

PROMPTS = ["Alice was beginning", "The White Rabbit", "It is a truth", "Mr. Bennet replied"]
MAX_TOKENS = 160


def constraints():
    yield from ({"json_schema": s} for s in SCHEMAS)
    yield from ({"regex": r} for r in REGEXES)
    yield from ({"choice": c} for c in CHOICES)


def check(output, constraint: dict) -> None:
    """The output is complete (ended by the grammar or EOS, not by max_tokens) and valid."""
    assert output.finish_reason == "stop", (output.finish_reason, output.text)
    if "json_schema" in constraint:
        jsonschema.validate(json.loads(output.text), constraint["json_schema"])
    elif "regex" in constraint:
        assert re.fullmatch(constraint["regex"], output.text), output.text
    else:
        assert output.text in constraint["choice"], output.text


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, num_blocks=256, max_num_batched_tokens=256)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_output_is_valid(llm, temperature):
    items = [(c, p) for c in constraints() for p in (PROMPTS if temperature else PROMPTS[:2])]
    params = [
        SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, seed=i, **c)
        for i, (c, _) in enumerate(items)
    ]
    outputs = llm.generate([p for _, p in items], params)
    for (constraint, _), output in zip(items, outputs):
        check(output, constraint)
    if temperature:  # sampling explores: not every prompt of a choice list gives the same one
        texts = [o.text for (c, _), o in zip(items, outputs) if c.get("choice") == CHOICES[1]]
        assert len(set(texts)) > 1, texts
    kv = llm.engine.kv_manager
    assert kv.num_free_blocks == kv.num_blocks


def test_unconstrained_rows_are_untouched_and_the_grammar_ends_the_request(llm):
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = [o.token_ids for o in llm.generate(PROMPTS, plain)]
    choice = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True, choice=["yes", "no"])
    mixed = llm.generate(PROMPTS + PROMPTS, [plain] * 4 + [choice] * 4)
    assert [o.token_ids for o in mixed[:4]] == alone
    for out in mixed[4:]:
        # Complete after the choice's tokens: no EOS needed, ignore_eos notwithstanding.
        assert out.text in ("yes", "no") and out.finish_reason == "stop"
        assert len(out.token_ids) <= 3


def test_logprobs_come_from_the_model_not_the_mask(llm):
    free = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=1, temperature=0.0, logprobs=3))
    forced = llm.generate(
        PROMPTS[:1], SamplingParams(max_tokens=5, temperature=0.0, logprobs=3, regex="[0-9]+")
    )
    (free_ids, free_lps), (ids, lps) = (zip(*o[0].logprobs[0][1]) for o in (free, forced))
    assert ids == free_ids and lps == pytest.approx(free_lps)  # the same top 3
    # The model's favourites are not digits, yet a digit was sampled: the mask was applied.
    assert not any(llm.engine.tokenizer.decode([i]).isdigit() for i in ids)
    assert forced[0].text.isdigit()


def test_chunked_prefill_and_preemption_keep_the_grammar(model_dir, llm):
    items = [(c, PROMPTS[i % 4]) for i, c in enumerate(constraints()) if i % 3 == 0]
    params = [SamplingParams(max_tokens=100, temperature=0.0, **c) for c, _ in items]
    prompts = [p * 4 for _, p in items]  # long enough to be prefilled in several chunks
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    # 16-token chunks; few blocks, so requests are preempted and recomputed mid-output.
    small = LLM(model_dir, num_blocks=18, block_size=8, max_num_batched_tokens=16)
    outputs = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outputs] == expected
    for (constraint, _), output in zip(items, outputs):
        check(output, constraint)
    kv = small.engine.kv_manager
    assert kv.num_free_blocks == kv.num_blocks


def test_speculative_drafts_are_verified_against_the_grammar(model_dir, llm):
    items = [(c, PROMPTS[i % 4]) for i, c in enumerate(constraints()) if i % 2 == 0]
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, **c) for c, _ in items]
    prompts = [p for _, p in items]
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    spec = LLM(model_dir, num_blocks=256, speculative={"method": "ngram", "adaptive": False})
    outputs = spec.generate(prompts, params)
    assert spec.engine.num_draft_tokens > 0
    assert spec.engine.num_accepted_tokens < spec.engine.num_draft_tokens  # some were refused
    assert [o.token_ids for o in outputs] == expected
    sampled = [
        SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=i, **c)
        for i, (c, _) in enumerate(items)
    ]
    for (constraint, _), output in zip(items, spec.generate(prompts, sampled)):
        check(output, constraint)


def test_decode_worker_rebuilds_the_grammar_from_the_first_token(model_dir, llm):
    items = [(c, PROMPTS[i % 4]) for i, c in enumerate(constraints()) if i % 2 == 1]
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, **c) for c, _ in items]
    expected = llm.generate([p for _, p in items], params)
    prefill = LLM(model_dir, num_blocks=256)
    decode = LLM(model_dir, num_blocks=256)
    connector = CopyConnector(prefill.engine.runner.kv_caches, decode.engine.runner.kv_caches)
    prefill.engine.runner.kv_connector = connector
    tokenizer = prefill.engine.tokenizer
    for i, ((_, prompt), p) in enumerate(zip(items, params)):
        ids = tokenizer.encode(prompt)
        connector.targets[f"r{i}"] = decode.engine.reserve(f"r{i}", ids, p)
        one = SamplingParams(**{**p.__dict__, "max_tokens": 1})
        prefill.engine.add_request(f"r{i}", ids, one)
    tokens = {}
    while prefill.engine.has_unfinished_requests():
        for out in prefill.engine.step():
            tokens[out.request_id] = list(out.token_ids)
    for rid, (first,) in tokens.items():
        if decode.engine.admit_prefilled(rid, first) is not None:
            continue  # the first token completed the grammar already
    while decode.engine.has_unfinished_requests():
        for out in decode.engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    assert [tokens[f"r{i}"] for i in range(len(items))] == [o.token_ids for o in expected]
    for engine in (prefill.engine, decode.engine):
        assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks


def test_a_retry_resumes_the_grammar_after_the_tokens_already_streamed(llm):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, json_schema=SCHEMAS[0])
    (full,) = llm.generate(PROMPTS[:1], params)
    prompt = llm.engine.tokenizer.encode(PROMPTS[0])
    k = len(full.token_ids) // 2
    resumed = SamplingParams(
        max_tokens=MAX_TOKENS - k,
        temperature=0.0,
        json_schema=SCHEMAS[0],
        num_structured_prompt_tokens=k,
    )
    (rest,) = llm.generate([prompt + full.token_ids[:k]], resumed)
    assert full.token_ids[:k] + rest.token_ids == full.token_ids
    with pytest.raises(ValueError, match="do not follow"):
        bad = SamplingParams(choice=["yes"], num_structured_prompt_tokens=2)
        llm.generate([prompt], bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"json_schema": "{not json"}, "not valid JSON"),
        ({"json_schema": {"type": "objekt"}}, "invalid json_schema"),
        ({"json_schema": {"type": "integer", "minimum": 5, "maximum": 1}}, "Unsatisfiable"),
        ({"json_schema": {"$ref": "#/$defs/missing"}}, "invalid json_schema"),
        ({"json_schema": [1, 2]}, "JSON object"),
        ({"regex": "(ab"}, "invalid regex"),
        ({"regex": ""}, "non-empty"),
        ({"choice": []}, "non-empty list"),
        ({"choice": ["a", ""]}, "non-empty list"),
        ({"regex": "a", "choice": ["a"]}, "at most one"),
        ({"num_structured_prompt_tokens": 1}, "without a constraint"),
    ],
)
def test_invalid_constraints_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_refused_before_any_model_work(model_dir, tmp_path, llm):
    from engine.testing import write_test_checkpoint

    no_tokenizer = LLM(write_test_checkpoint(tmp_path / "m", with_tokenizer=False), num_blocks=16)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        no_tokenizer.engine.add_request("r", [5, 6, 7], SamplingParams(regex="[0-9]+"))
    with pytest.raises(ValueError, match="less than the prompt"):
        llm.engine.add_request(
            "r", [5, 6], SamplingParams(regex="[0-9]+", num_structured_prompt_tokens=2)
        )
    assert not llm.engine.has_unfinished_requests()
