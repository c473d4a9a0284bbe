"""The random test checkpoints load in transformers as real ones do, and the tokenizer and
streaming detokenizer give the reference text."""

import json

import pytest
import torch
from safetensors import safe_open

from engine.testing import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    default_model_dir,
    ensure_default_model,
    write_test_checkpoint,
)
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # keep load progress bars out of the test output

NON_ASCII_TEXT = "At the café the naïve one — who loves 日本 🙂 — said “merci”."
ASCII_TEXT = "Alice was beginning to get very tired of sitting by her sister on the bank."


def expected_weight_names(num_layers: int, *, qkv_bias: bool, tied: bool) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(num_layers):
        layer = f"model.layers.{i}."
        names |= {layer + "input_layernorm.weight", layer + "post_attention_layernorm.weight"}
        names |= {layer + f"self_attn.{p}_proj.weight" for p in "qkvo"}
        names |= {layer + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        if qkv_bias:
            names |= {layer + f"self_attn.{p}_proj.bias" for p in "qkv"}
    if not tied:
        names.add("lm_head.weight")
    return names


def read_tensors(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            # safe_open is not iterable, hence .keys()
            tensors.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    return tensors


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_test_checkpoint(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return Tokenizer.from_pretrained(checkpoint)


# --- checkpoint layout -----------------------------------------------------------------------


def test_single_file_checkpoint_has_hf_files_and_names(checkpoint):
    files = {p.name for p in checkpoint.iterdir()}
    assert files == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert set(read_tensors(checkpoint)) == expected_weight_names(2, qkv_bias=False, tied=False)
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert "head_dim" not in config  # written only when given, as Hub configs do
    assert (config["bos_token_id"], config["eos_token_id"]) == (BOS_TOKEN_ID, EOS_TOKEN_ID)


def test_sharded_checkpoint_has_complete_index_and_same_tensors(tmp_path, checkpoint):
    path = write_test_checkpoint(tmp_path, num_shards=3)
    shard_names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(p.name for p in path.glob("*.safetensors")) == shard_names
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shard_names)
    for shard in shard_names:
        with safe_open(path / shard, framework="pt") as f:
            assert set(f.keys()) == {n for n, s in index["weight_map"].items() if s == shard}
    tensors = read_tensors(path)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    # Same seed, same weights, however they are split.
    single = read_tensors(checkpoint)
    assert all(torch.equal(tensors[name], single[name]) for name in single)


def test_same_seed_same_files_other_seed_other_weights(tmp_path):
    a = write_test_checkpoint(tmp_path / "a", with_tokenizer=True)
    b = write_test_checkpoint(tmp_path / "b", with_tokenizer=True)
    c = write_test_checkpoint(tmp_path / "c", seed=1, with_tokenizer=False)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_bfloat16_checkpoint_is_saved_in_bfloat16(tmp_path):
    path = write_test_checkpoint(tmp_path, dtype="bfloat16", with_tokenizer=False)
    assert {t.dtype for t in read_tensors(path).values()} == {torch.bfloat16}
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16


# --- loading in transformers -----------------------------------------------------------------


@pytest.mark.parametrize(
    "architecture, options",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True, "num_shards": 2}),
        ("llama", {"head_dim": 32}),
        ("mistral", {}),
        ("mistral", {"tie_word_embeddings": True}),
        ("qwen2", {}),
        ("qwen2", {"tie_word_embeddings": True}),
    ],
)
def test_transformers_loads_every_weight(tmp_path, architecture, options):
    path = write_test_checkpoint(
        tmp_path, architecture=architecture, with_tokenizer=False, **options
    )
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert (
        type(model).__name__ == json.loads((path / "config.json").read_text())["architectures"][0]
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    # transformers holds our tensors unchanged under the same names.
    state = model.state_dict()
    tensors = read_tensors(path)
    assert set(tensors) == expected_weight_names(
        2, qkv_bias=architecture == "qwen2", tied=bool(options.get("tie_word_embeddings"))
    )
    assert all(torch.equal(state[name], tensor) for name, tensor in tensors.items())
    if options.get("tie_word_embeddings"):
        assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_transformers_reads_llama3_rope_scaling(tmp_path):
    rope_scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    }
    path = write_test_checkpoint(tmp_path, rope_scaling=rope_scaling, with_tokenizer=False)
    assert json.loads((path / "config.json").read_text())["rope_scaling"] == rope_scaling
    config = transformers.AutoConfig.from_pretrained(path)
    # transformers 5 folds the legacy rope_theta / rope_scaling keys into rope_parameters.
    assert config.rope_parameters == {**rope_scaling, "rope_theta": 10000.0}


def test_random_model_logits_have_clear_winners(checkpoint):
    """Greedy tests against transformers need top-1 logits well clear of the runner-up."""
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    prompts = torch.randint(3, 512, (4, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(prompts).logits
    top2 = logits.topk(2, dim=-1).values
    relative_gap = (top2[..., 0] - top2[..., 1]) / logits.std(dim=-1)
    assert relative_gap.median() > 0.1
    assert (relative_gap < 1e-3).float().mean() < 0.01
    assert logits.softmax(-1).amax(-1).median() > 0.2  # peaky, not near-uniform


# --- tokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [ASCII_TEXT, NON_ASCII_TEXT, "", " two  spaces\nand a newline"])
def test_encode_decode_round_trip_with_one_bos(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id == BOS_TOKEN_ID
    assert ids.count(BOS_TOKEN_ID) == 1
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s>" + text


def test_encode_matches_transformers(checkpoint, tokenizer):
    reference = transformers.AutoTokenizer.from_pretrained(checkpoint)
    for text in (ASCII_TEXT, NON_ASCII_TEXT, "", "ends with eos</s>"):
        assert tokenizer.encode(text) == reference.encode(text)


def test_special_token_properties_match_config(checkpoint, tokenizer):
    config = json.loads((checkpoint / "config.json").read_text())
    assert tokenizer.vocab_size == config["vocab_size"]
    assert tokenizer.bos_token_id == config["bos_token_id"]
    assert tokenizer.eos_token_ids == [config["eos_token_id"]]
    assert {0, BOS_TOKEN_ID, EOS_TOKEN_ID} <= set(tokenizer.all_special_ids)


def test_eos_ids_come_from_generation_config_then_config_then_tokenizer_config(tmp_path):
    path = write_test_checkpoint(tmp_path, with_tokenizer=True, num_hidden_layers=1)
    generation_config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(
        json.dumps({**generation_config, "eos_token_id": [2, 7]})
    )
    assert Tokenizer.from_pretrained(path).eos_token_ids == [2, 7]
    (path / "generation_config.json").unlink()
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "eos_token_id": 9}))
    assert Tokenizer.from_pretrained(path).eos_token_ids == [9]
    (path / "config.json").unlink()
    assert Tokenizer.from_pretrained(path).eos_token_ids == [EOS_TOKEN_ID]  # "</s>"


def test_bos_added_when_post_processor_does_not(tmp_path):
    path = write_test_checkpoint(tmp_path, with_tokenizer=True, num_hidden_layers=1)
    tokenizer_json = json.loads((path / "tokenizer.json").read_text())
    (path / "tokenizer.json").write_text(json.dumps({**tokenizer_json, "post_processor": None}))
    ids = Tokenizer.from_pretrained(path).encode("Alice")
    assert ids[0] == BOS_TOKEN_ID and ids.count(BOS_TOKEN_ID) == 1
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(
        json.dumps({**tokenizer_config, "add_bos_token": False})
    )
    assert BOS_TOKEN_ID not in Tokenizer.from_pretrained(path).encode("Alice")


def test_no_tokenizer_json_means_no_tokenizer(tmp_path):
    path = write_test_checkpoint(tmp_path, with_tokenizer=False)
    assert Tokenizer.from_pretrained(path) is None


# --- incremental detokenization --------------------------------------------------------------


class CountingTokenizer:
    """Wraps a Tokenizer and records the longest id list decoded, to check the detokenizer's
    per-token cost."""

    def __init__(self, inner: Tokenizer):
        self.inner = inner
        self.longest_decode = 0

    def decode(self, ids, skip_special_tokens=True):
        self.longest_decode = max(self.longest_decode, len(ids))
        return self.inner.decode(ids, skip_special_tokens)


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_incremental_detokenizer_streams_exact_text(tokenizer, chunk_size):
    prompt_ids = tokenizer.encode("Once upon a time")
    output_text = (NON_ASCII_TEXT + " " + ASCII_TEXT) * 4
    output_ids = tokenizer.encode(output_text)[1:]  # drop BOS
    # The test means something only if some tokens hold part of a character.
    assert any("\ufffd" in tokenizer.decode([i]) for i in output_ids)

    counting = CountingTokenizer(tokenizer)
    detokenizer = IncrementalDetokenizer(counting, prompt_ids)
    deltas = [
        detokenizer.append(output_ids[start : start + chunk_size])
        for start in range(0, len(output_ids), chunk_size)
    ]
    assert "".join(deltas) == detokenizer.text == tokenizer.decode(output_ids) == output_text
    assert not any("\ufffd" in delta for delta in deltas)
    if chunk_size == 1:
        assert "" in deltas  # partial characters were held back
    # Cost per token stays bounded: only a short window is decoded, never the whole output.
    assert len(output_ids) > 100
    assert counting.longest_decode <= 16


def test_incremental_detokenizer_skips_special_tokens_unless_asked(tokenizer):
    output_ids = tokenizer.encode("the end")[1:] + [EOS_TOKEN_ID]
    skipping = IncrementalDetokenizer(tokenizer, [BOS_TOKEN_ID])
    keeping = IncrementalDetokenizer(tokenizer, [BOS_TOKEN_ID], skip_special_tokens=False)
    for token_id in output_ids:
        skipping.append([token_id])
        keeping.append([token_id])
    assert skipping.text == "the end"
    assert keeping.text == "the end</s>"


# --- demo model --------------------------------------------------------------------------------


def test_ensure_default_model_writes_once(tmp_path, monkeypatch):
    monkeypatch.setenv("BATON_HOME", str(tmp_path))
    assert default_model_dir() == tmp_path / "models" / "tiny-llama-v2"
    path = ensure_default_model()
    assert path == default_model_dir()
    config = json.loads((path / "config.json").read_text())
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (
        1024,
        128,
        4,
    )
    assert Tokenizer.from_pretrained(path).vocab_size == 1024
    written_at = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == written_at
    assert [p.name for p in path.parent.iterdir()] == ["tiny-llama-v2"]  # no temp dirs left
