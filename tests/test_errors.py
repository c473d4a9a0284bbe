"""Bad input gets a clear error before any model work, and leaves nothing behind."""

from __future__ import annotations

import json
import shutil

import pytest

from engine import LLM, SamplingParams
from engine.testing import write_test_checkpoint


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, num_blocks=64, max_model_len=512)


def test_unknown_architecture(tmp_path):
    path = write_test_checkpoint(tmp_path, with_tokenizer=False)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown architecture.*GPT2LMHeadModel"):
        LLM(path)


def test_missing_weight_files(tmp_path):
    path = write_test_checkpoint(tmp_path / "one", with_tokenizer=False)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        LLM(path)
    sharded = write_test_checkpoint(tmp_path / "sharded", num_shards=2, with_tokenizer=False)
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        LLM(sharded)


def test_missing_folder_and_missing_tensor(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(tmp_path / "nowhere")
    path = write_test_checkpoint(tmp_path / "m", with_tokenizer=False)
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks .* weights"):
        LLM(path)


@pytest.mark.parametrize(
    "prompt, match",
    [
        ("", "prompt is empty"),
        ([], "prompt is empty"),
        ([5] * 512, "longer than the context"),
        ([5, 100000], "token ids must be integers in"),
    ],
)
def test_bad_prompts(llm, prompt, match):
    with pytest.raises(ValueError, match=match):
        llm.generate([[1, 2, 3], prompt], SamplingParams(max_tokens=2))
    # The good prompt before the bad one was not left queued either.
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv_manager.num_free_blocks == 64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_tokens=0), "max_tokens must be"),
        (dict(max_tokens=-3), "max_tokens must be"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(logprobs=50), "logprobs"),
        (dict(stop=[""]), "stop strings"),
        (dict(temperature=float("nan")), "temperature must be a finite number"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite"),
        (dict(top_p=float("nan")), "top_p must be in"),
        (dict(top_k=2**40), "top_k"),
        (dict(stop=["s"] * 65), "at most 64 stop strings"),
        (dict(stop=["s" * 1025]), "at most 1024 characters"),
        (dict(stop_token_ids=[1] * 1025), "at most 1024 stop token ids"),
        (dict(seed=2**64), "seed must be in"),
        (dict(seed=-(2**63) - 1), "seed must be in"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_request_larger_than_the_pool(model_dir):
    llm = LLM(model_dir, num_blocks=4)
    with pytest.raises(ValueError, match="needs up to 5 KV blocks but the pool has only 4"):
        llm.generate([[7] * 70], SamplingParams(max_tokens=4))


def test_bad_engine_args(model_dir):
    with pytest.raises(ValueError, match="block_size"):
        LLM(model_dir, block_size=12)
    with pytest.raises(ValueError, match="dtype"):
        LLM(model_dir, dtype="int3")
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(model_dir, max_model_len=1 << 20)


def test_text_prompt_without_tokenizer(tmp_path):
    path = write_test_checkpoint(tmp_path, with_tokenizer=False)
    llm = LLM(path, num_blocks=16)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello")
    out = llm.generate([[4, 5, 6]], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and out.text == ""


def test_unsupported_rope_scaling(tmp_path):
    path = write_test_checkpoint(tmp_path, with_tokenizer=False)
    config = json.loads((path / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        LLM(path)
    shutil.rmtree(path)
