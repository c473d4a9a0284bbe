"""Small random-weight checkpoints in the Hugging Face layout, for tests and the demo model.

`write_test_checkpoint` writes a folder that `transformers.AutoModelForCausalLM` and
`AutoTokenizer` load as they would a real Llama, Mistral, Qwen2, Mixtral or Qwen2-MoE
checkpoint: `config.json`, `generation_config.json`, safetensors weights (optionally sharded with
an index), and a byte-level BPE `tokenizer.json` trained on a short embedded text. Only torch,
safetensors, tokenizers and json are used, so the engine can build its demo model without
transformers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# architecture -> (HF class name, rms_norm_eps as the real checkpoints of that family set it)
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", 1e-5),
    "mistral": ("MistralForCausalLM", 1e-5),
    "qwen2": ("Qwen2ForCausalLM", 1e-6),
    "mixtral": ("MixtralForCausalLM", 1e-5),
    "qwen2_moe": ("Qwen2MoeForCausalLM", 1e-6),
    "qwen3": ("Qwen3ForCausalLM", 1e-6),
    "qwen3_moe": ("Qwen3MoeForCausalLM", 1e-6),
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"
PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1, 2
# Byte-level BPE needs all 256 byte symbols in its alphabet, plus the special tokens above.
MIN_TOKENIZER_VOCAB = 256 + 3
# Standard deviation of the random model's logits: ~40% top-1 probability at vocab 512.
LOGIT_STD = 4.0
# ChatML turns after BOS, as Qwen2's template writes them (here <|im_start|> and <|im_end|> are
# plain text, not added tokens: the tokenizer stays as trained).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Public-domain English (Carroll, "Alice's Adventures in Wonderland"; Austen, "Pride and
# Prejudice") and a closing line of our own with multi-byte characters (2-, 3- and 4-byte UTF-8),
# so byte-level BPE learns tokens that split a character and streaming detokenization is tested.
SAMPLE_TEXT = """\
Alice was beginning to get very tired of sitting by her sister on the bank, and of having \
nothing to do: once or twice she had peeped into the book her sister was reading, but it had no \
pictures or conversations in it, “and what is the use of a book,” thought Alice “without \
pictures or conversations?”

So she was considering in her own mind (as well as she could, for the hot day made her feel very \
sleepy and stupid), whether the pleasure of making a daisy-chain would be worth the trouble of \
getting up and picking the daisies, when suddenly a White Rabbit with pink eyes ran close by her.

There was nothing so very remarkable in that; nor did Alice think it so very much out of the way \
to hear the Rabbit say to itself, “Oh dear! Oh dear! I shall be late!” (when she thought it over \
afterwards, it occurred to her that she ought to have wondered at this, but at the time it all \
seemed quite natural); but when the Rabbit actually took a watch out of its waistcoat-pocket, and \
looked at it, and then hurried on, Alice started to her feet, for it flashed across her mind that \
she had never before seen a rabbit with either a waistcoat-pocket, or a watch to take out of it, \
and burning with curiosity, she ran across the field after it, and fortunately was just in time \
to see it pop down a large rabbit-hole under the hedge.

In another moment down went Alice after it, never once considering how in the world she was to \
get out again. The rabbit-hole went straight on like a tunnel for some way, and then dipped \
suddenly down, so suddenly that Alice had not a moment to think about stopping herself before \
she found herself falling down a very deep well.

It is a truth universally acknowledged, that a single man in possession of a good fortune, must \
be in want of a wife.

However little known the feelings or views of such a man may be on his first entering a \
neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is \
considered the rightful property of some one or other of their daughters.

“My dear Mr. Bennet,” said his lady to him one day, “have you heard that Netherfield Park is let \
at last?” Mr. Bennet replied that he had not. “But it is,” returned she; “for Mrs. Long has just \
been here, and she told me all about it.” Mr. Bennet made no answer. “Do you not want to know who \
has taken it?” cried his wife impatiently. “You want to tell me, and I have no objection to \
hearing it.” This was invitation enough.

At the café the naïve young man ordered crème brûlée — and green tea from 日本 (Japan) — then \
said “merci” and smiled 🙂. Über-polite, he paid in € and ¥.
"""


def write_test_checkpoint(
    path: str | Path,
    *,
    architecture: str = "llama",
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int | None = None,
    max_position_embeddings: int = 1024,
    rope_theta: float = 10000.0,
    rope_scaling: dict | None = None,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
    num_shards: int = 1,
    init_std: float = 0.1,
    seed: int = 0,
    with_tokenizer: bool = True,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    moe_config: dict | None = None,
    cla_share_factor: int = 1,
) -> Path:
    """Write a random-weight causal LM checkpoint in the Hugging Face layout and return its path.

    The folder holds `config.json`, `generation_config.json`, `model.safetensors` (or
    `num_shards` files plus `model.safetensors.index.json`) and, with `with_tokenizer`,
    `tokenizer.json` and `tokenizer_config.json`. The same arguments always give the same files.

    Linear weights are normal(0, init_std); see `_random_weights` for why the other tensors
    are scaled as they are.

    MoE architectures (mixtral, qwen2_moe) get `num_experts` experts, `num_experts_per_tok` of
    them per token, stored one matrix per expert as Hub checkpoints are; `moe_config` overrides
    config keys (qwen2_moe: `norm_topk_prob`, `decoder_sparse_step`, `mlp_only_layers`, ...).
    """
    if architecture not in _ARCHITECTURES:
        raise ValueError(
            f"architecture must be one of {sorted(_ARCHITECTURES)}, got {architecture!r}"
        )
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if num_attention_heads % num_key_value_heads != 0:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    if head_dim is None and hidden_size % num_attention_heads != 0:
        raise ValueError("hidden_size must be a multiple of num_attention_heads (or pass head_dim)")
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    if with_tokenizer and vocab_size < MIN_TOKENIZER_VOCAB:
        raise ValueError(f"a byte-level tokenizer needs vocab_size >= {MIN_TOKENIZER_VOCAB}")

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = _hf_config(
        architecture,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=tie_word_embeddings,
        dtype=dtype,
    )
    if architecture in _MOE:
        config.update(_moe_config(architecture, num_experts, num_experts_per_tok, config))
        config.update(moe_config or {})
    if cla_share_factor > 1:
        # Cross-layer KV sharing: no HF architecture has it, so transformers cannot load this
        # checkpoint (tests compare it with an explicit reference); only each group's first
        # layer has k_proj / v_proj.
        config["cla_share_factor"] = cla_share_factor
    _write_json(path / "config.json", config)
    _write_json(
        path / "generation_config.json",
        {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID, "pad_token_id": PAD_TOKEN_ID},
    )
    tensors = _random_weights(config, init_std=init_std, seed=seed)
    tensors = {name: t.to(_DTYPES[dtype]).contiguous() for name, t in tensors.items()}
    _save_weights(path, tensors, num_shards)
    if with_tokenizer:
        _write_tokenizer(path, vocab_size=vocab_size, model_max_length=max_position_embeddings)
    return path


def _hf_config(
    architecture: str, *, head_dim: int | None, rope_scaling: dict | None, dtype: str, **fields
) -> dict:
    """The config.json dict, with the keys and legacy spellings real Hub checkpoints use."""
    class_name, rms_norm_eps = _ARCHITECTURES[architecture]
    config = {
        "architectures": [class_name],
        "model_type": architecture,
        "vocab_size": fields["vocab_size"],
        "hidden_size": fields["hidden_size"],
        "intermediate_size": fields["intermediate_size"],
        "num_hidden_layers": fields["num_hidden_layers"],
        "num_attention_heads": fields["num_attention_heads"],
        "num_key_value_heads": fields["num_key_value_heads"],
    }
    if head_dim is not None:  # Hub configs name it only where it is not hidden / heads
        config["head_dim"] = head_dim
    config.update(
        {
            "max_position_embeddings": fields["max_position_embeddings"],
            "rms_norm_eps": rms_norm_eps,
            "rope_theta": float(fields["rope_theta"]),
            "tie_word_embeddings": fields["tie_word_embeddings"],
            # NOTE: transformers 5 calls this `dtype`, but Hub checkpoints say `torch_dtype`
            # and both versions read it.
            "torch_dtype": dtype,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "attention_dropout": 0.0,
            "bos_token_id": BOS_TOKEN_ID,
            "eos_token_id": EOS_TOKEN_ID,
            "use_cache": True,
        }
    )
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    if architecture == "llama":
        config.update({"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1})
    elif architecture == "mistral":
        config["sliding_window"] = None
    elif architecture == "qwen2":
        # Qwen2 always has q/k/v biases; there is no config switch for them.
        config.update(
            {
                "use_sliding_window": False,
                "sliding_window": None,
                "max_window_layers": fields["num_hidden_layers"],
            }
        )
    elif architecture in ("qwen3", "qwen3_moe"):
        # q/k RMSNorms over head_dim; no attention biases. Qwen3 configs always name head_dim
        # (transformers' Qwen3Config defaults it to 128, not hidden / heads).
        config.update(
            {"attention_bias": False, "use_sliding_window": False, "sliding_window": None}
        )
        config["head_dim"] = head_dim or fields["hidden_size"] // fields["num_attention_heads"]
    return config


_MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


def _moe_config(architecture: str, num_experts: int, top_k: int, config: dict) -> dict:
    if architecture == "mixtral":
        return {"num_local_experts": num_experts, "num_experts_per_tok": top_k}
    inter = config["intermediate_size"]
    if architecture == "qwen3_moe":  # no shared expert; top-k renormalised as Qwen3-30B-A3B
        return {
            "num_experts": num_experts,
            "num_experts_per_tok": top_k,
            "moe_intermediate_size": inter // 2,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
    return {
        "num_experts": num_experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": inter // 2,
        "shared_expert_intermediate_size": inter,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "qkv_bias": True,
    }


def _mlp_weights(config: dict, prefix: str, normal) -> dict[str, torch.Tensor]:
    """A layer's MLP: dense (gate/up/down_proj) or, for MoE layers, the router and one matrix
    per expert under the family's names (Mixtral: block_sparse_moe, w1 gate, w3 up, w2 down)."""
    hidden, std = config["hidden_size"], config["initializer_range_test"]
    arch = config["model_type"]
    layer = int(prefix.split(".")[2])
    dense_only = arch not in _MOE or (
        arch != "mixtral"
        and (layer in config["mlp_only_layers"] or (layer + 1) % config["decoder_sparse_step"] != 0)
    )

    def swiglu(p: str, inter: int, names=("gate_proj", "up_proj", "down_proj")):
        return {
            f"{p}{names[0]}.weight": normal(inter, hidden, std=std),
            f"{p}{names[1]}.weight": normal(inter, hidden, std=std),
            f"{p}{names[2]}.weight": normal(hidden, inter, std=std),
        }

    if dense_only:
        return swiglu(prefix + "mlp.", config["intermediate_size"])
    if arch == "mixtral":
        moe, inter = prefix + "block_sparse_moe.", config["intermediate_size"]
        tensors = {moe + "gate.weight": normal(config["num_local_experts"], hidden, std=std)}
        for e in range(config["num_local_experts"]):
            tensors.update(swiglu(f"{moe}experts.{e}.", inter, ("w1", "w3", "w2")))
        return tensors
    moe, inter = prefix + "mlp.", config["moe_intermediate_size"]
    tensors = {moe + "gate.weight": normal(config["num_experts"], hidden, std=std)}
    for e in range(config["num_experts"]):
        tensors.update(swiglu(f"{moe}experts.{e}.", inter))
    if arch == "qwen2_moe":
        tensors.update(swiglu(moe + "shared_expert.", config["shared_expert_intermediate_size"]))
        tensors[moe + "shared_expert_gate.weight"] = normal(1, hidden, std=std)
    return tensors


def _random_weights(config: dict, *, init_std: float, seed: int) -> dict[str, torch.Tensor]:
    """Random float32 weights under Hugging Face parameter names, deterministic from `seed`.

    Embeddings, linear weights and biases are normal(0, init_std); norm weights are
    1 + normal(0, 0.1) so the norms are not the identity.
    NOTE: tests compare greedy token ids with transformers and sample with temperature, so
    logits must be spread out, not near-uniform. With init_std ~0.1, lm_head rows of norm
    ~init_std * sqrt(hidden) give logits of std < 1 (top-1 probability ~2% at vocab 512). So the
    output head is scaled for logits of std ~LOGIT_STD (top-1 probability ~40%): lm_head gets
    std LOGIT_STD / sqrt(hidden), or, when it is tied to the embeddings, the final norm's
    weight carries the factor. Bigger embeddings would make the top-1 margins no wider but let
    the token embedding drown the attention updates, so the output would depend less on context.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    def norm_weight(size: int, scale: float = 1.0) -> torch.Tensor:
        return scale * (1.0 + normal(size, std=0.1))

    hidden = config["hidden_size"]
    vocab = config["vocab_size"]
    num_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // num_heads
    q_size = num_heads * head_dim
    kv_size = config["num_key_value_heads"] * head_dim
    has_qkv_bias = config["model_type"] == "qwen2" or config.get("qkv_bias", False)

    tensors = {"model.embed_tokens.weight": normal(vocab, hidden, std=init_std)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        tensors[prefix + "input_layernorm.weight"] = norm_weight(hidden)
        shares_kv = i % config.get("cla_share_factor", 1) != 0
        projections = (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size))
        for name, out_size in projections[:1] if shares_kv else projections:
            tensors[prefix + f"self_attn.{name}.weight"] = normal(out_size, hidden, std=init_std)
            if has_qkv_bias:
                tensors[prefix + f"self_attn.{name}.bias"] = normal(out_size, std=init_std)
        tensors[prefix + "self_attn.o_proj.weight"] = normal(hidden, q_size, std=init_std)
        if config["model_type"] in ("qwen3", "qwen3_moe"):
            tensors[prefix + "self_attn.q_norm.weight"] = norm_weight(head_dim)
            if not shares_kv:
                tensors[prefix + "self_attn.k_norm.weight"] = norm_weight(head_dim)
        tensors[prefix + "post_attention_layernorm.weight"] = norm_weight(hidden)
        tensors.update(_mlp_weights({**config, "initializer_range_test": init_std}, prefix, normal))
    # The final norm's output has unit RMS, so logit std = (lm_head row std) * sqrt(hidden).
    head_std = LOGIT_STD / math.sqrt(hidden)
    if config["tie_word_embeddings"]:
        tensors["model.norm.weight"] = norm_weight(hidden, scale=head_std / init_std)
    else:
        tensors["model.norm.weight"] = norm_weight(hidden)
        tensors["lm_head.weight"] = normal(vocab, hidden, std=head_std)
    return tensors


def write_truncated_draft(target: str | Path, path: str | Path, num_layers: int) -> Path:
    """A draft model for speculative decoding from a target checkpoint: its first `num_layers`
    decoder layers with the target's embedding, final norm, output head and tokenizer (a layer-
    skipping draft; it agrees with the target as far as the later layers change little).
    Returns `path`."""
    from safetensors.torch import load_file

    target, path = Path(target), Path(path)
    config = json.loads((target / "config.json").read_text())
    if not 1 <= num_layers <= config["num_hidden_layers"]:
        raise ValueError(
            f"num_layers must be in [1, {config['num_hidden_layers']}], got {num_layers}"
        )
    tensors = {}
    for file in sorted(target.glob("*.safetensors")):
        tensors.update(load_file(file))
    kept = {
        name: t
        for name, t in tensors.items()
        if not name.startswith("model.layers.") or int(name.split(".")[2]) < num_layers
    }
    path.mkdir(parents=True, exist_ok=True)
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (target / name).is_file():
            shutil.copyfile(target / name, path / name)
    _write_json(path / "config.json", {**config, "num_hidden_layers": num_layers})
    _save_weights(path, kept, num_shards=1)
    return path


def write_draft_pair(
    path: str | Path, num_draft_layers: int, later_layer_scale: float = 1.0, **checkpoint_args
) -> tuple[Path, Path]:
    """A target checkpoint (`write_test_checkpoint(**checkpoint_args)`) at `path / "target"`
    and its truncated draft (`write_truncated_draft`) at `path / "draft"`.

    Random layers all matter equally, so a random target's truncation agrees with it little.
    `later_layer_scale` < 1 scales the residual branches (o_proj, down_proj) of the layers the
    draft lacks, as in a trained model whose late layers refine more than they rewrite; the
    target is then still a checkpoint like any other, and the draft's acceptance meaningful."""
    from safetensors.torch import load_file

    path = Path(path)
    target = write_test_checkpoint(path / "target", **checkpoint_args)
    if later_layer_scale != 1.0:
        weights = target / "model.safetensors"
        tensors = load_file(weights)
        for name, tensor in tensors.items():
            later = name.startswith("model.layers.") and int(name.split(".")[2]) >= num_draft_layers
            if later and name.endswith(("o_proj.weight", "down_proj.weight")):
                tensor.mul_(later_layer_scale)
        save_file(tensors, weights, metadata={"format": "pt"})
    return target, write_truncated_draft(target, path / "draft", num_draft_layers)


def _save_weights(path: Path, tensors: dict[str, torch.Tensor], num_shards: int) -> None:
    """Save as one `model.safetensors`, or as HF-style shards plus an index when num_shards > 1."""
    metadata = {"format": "pt"}  # transformers checks this key
    if num_shards == 1:
        save_file(tensors, path / "model.safetensors", metadata=metadata)
        return
    names = list(tensors)
    if num_shards > len(names):
        raise ValueError(
            f"num_shards must be at most {len(names)} (one tensor each), got {num_shards}"
        )
    # Contiguous runs of tensors of about equal bytes, as HF's save_pretrained does.
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    shards: list[list[str]] = [[] for _ in range(num_shards)]
    written = 0
    for index, name in enumerate(names):
        shard = min(written * num_shards // total_size, num_shards - 1)
        # Leave at least one tensor for each shard still to fill.
        shard = max(shard, num_shards - (len(names) - index))
        shards[shard].append(name)
        written += tensors[name].numel() * tensors[name].element_size()
    weight_map = {}
    for shard_index, shard_names in enumerate(shards):
        file_name = f"model-{shard_index + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file(
            {name: tensors[name] for name in shard_names}, path / file_name, metadata=metadata
        )
        weight_map.update({name: file_name for name in shard_names})
    _write_json(
        path / "model.safetensors.index.json",
        {"metadata": {"total_size": total_size}, "weight_map": weight_map},
    )


def _write_tokenizer(path: Path, *, vocab_size: int, model_max_length: int) -> None:
    """Train a byte-level BPE of exactly `vocab_size` tokens on SAMPLE_TEXT and save it."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],  # ids 0, 1, 2 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SAMPLE_TEXT.splitlines(), trainer=trainer)
    # A short text runs out of merges before a large vocab is full; fill the rest with reserved
    # special tokens (as Llama 3 does) so the tokenizer and the embedding have the same size.
    missing = vocab_size - tokenizer.get_vocab_size()
    tokenizer.add_special_tokens(
        [AddedToken(f"<|reserved_{i}|>", special=True) for i in range(missing)]
    )
    assert tokenizer.get_vocab_size() == vocab_size
    assert tokenizer.token_to_id(BOS_TOKEN) == BOS_TOKEN_ID
    assert tokenizer.token_to_id(EOS_TOKEN) == EOS_TOKEN_ID
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1",
        special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID)],
    )
    tokenizer.save(str(path / "tokenizer.json"))
    _write_json(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
            "chat_template": CHAT_TEMPLATE,
        },
    )


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# Bumped whenever the demo model's files change, so an older cached copy is not reused
# (v2: a chat template).
DEMO_MODEL_NAME = "tiny-llama-v2"


def default_model_dir() -> Path:
    """Where the embedded demo model lives: `$BATON_HOME/models/tiny-llama-v2`, else under
    `~/.cache/baton`."""
    home = os.environ.get("BATON_HOME")
    base = Path(home) if home else Path.home() / ".cache" / "baton"
    return base / "models" / DEMO_MODEL_NAME


# The demo model: big enough to look like a model, small enough to write in a second on CPU.
DEMO_MODEL_CONFIG = {
    "architecture": "llama",
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "seed": 0,
}


def ensure_default_model() -> Path:
    """Write the demo model to `default_model_dir()` unless it is already there; return its path.

    Safe to call from several processes at once: each writes into its own temporary folder
    and renames it into place, so a reader never sees a half-written model.
    """
    model_dir = default_model_dir()
    if model_dir.is_dir():
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=model_dir.parent))
    try:
        write_test_checkpoint(tmp_dir, **DEMO_MODEL_CONFIG)
        tmp_dir.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        os.rename(tmp_dir, model_dir)
    except OSError:
        # Another process renamed its copy into place first; theirs is as good as ours.
        if not model_dir.is_dir():
            raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return model_dir
