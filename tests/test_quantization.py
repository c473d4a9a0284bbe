"""Weight quantization (EngineConfig.quantization int8 / int4 / fp8) on CPU: the formats' error
bounds, accuracy of the quantized test model against the unquantized one, Baton's pre-quantized
checkpoints, MoE experts, and the disaggregated handoff between quantized workers.

`python -m tests.test_quantization [model_dir]` prints the accuracy table of
benchmarks/RESULTS.md (float32 and bf16 baselines).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from engine import LLM
from engine.quantization.checkpoint import save_quantized
from engine.quantization.config import QuantConfig
from engine.quantization.formats import dequantize, pack_int4, quantize, unpack_int4
from engine.quantization.linear import QuantExperts, QuantLinear
from engine.testing import write_test_checkpoint
from tests.helpers import random_prompts
from tests.test_handoff_engine import CopyConnector
from tests.test_kv_quant import GREEDY, accuracy_prompts, handoff, run_with_logits

INT4_ASYM = {"method": "int4", "symmetric": False}


def test_config_is_validated():
    assert QuantConfig.parse("int4") == QuantConfig("int4", 128, True)
    assert QuantConfig.parse({"method": "int4", "group_size": 64}).group_size == 64
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM("unused", quantization="int3")
    with pytest.raises(ValueError, match="group_size must be an even int"):
        QuantConfig.parse({"method": "int4", "group_size": 33})
    with pytest.raises(ValueError, match="may have 'group_size', 'symmetric'"):
        QuantConfig.parse({"method": "int8", "bits": 8})


# Relative L2 error of dequant(quant(W)) for Gaussian W: int8 ~ 1/(127 sqrt 3) x max/std;
# e4m3 has 3 mantissa bits (~2.3% rounding); int4 groups of 128 ~ 1/(7 sqrt 3) x max/std.
ROUND_TRIP_BOUNDS = {
    ("int8", True): 0.01,
    ("fp8", True): 0.035,
    ("int4", True): 0.13,
    ("int4", False): 0.11,
}


@pytest.mark.parametrize("method,symmetric", list(ROUND_TRIP_BOUNDS))
@pytest.mark.parametrize("k", [256, 301])  # 301: odd, a partial last group
def test_round_trip_error_is_bounded(method, symmetric, k):
    g = torch.Generator().manual_seed(k)
    weight = torch.randn(96, k, generator=g) * 0.02
    qw = quantize(weight, method, 128, symmetric)
    restored = dequantize(qw)
    rel = float((restored - weight).norm() / weight.norm())
    assert rel < ROUND_TRIP_BOUNDS[method, symmetric], rel
    # No element is off by more than half a step of its own scale (plus fp8's relative step).
    step = qw.scales if method != "int4" else qw.scales.float().repeat_interleave(128, -1)[:, :k]
    step = step[:, None] if method != "int4" else step
    tolerance = 0.5 * step * 1.0001 if method != "fp8" else weight.abs() / 16 + step
    assert bool(((restored - weight).abs() <= tolerance).all())
    if symmetric:  # re-quantizing changes nothing: the largest element sets the same scale
        again = quantize(restored, method, 128, symmetric)
        assert torch.equal(dequantize(again), restored)


def test_int4_packing_is_two_per_byte_low_nibble_first():
    q = torch.tensor([[1, 2, 3, 4, 15]], dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.tolist() == [[0x21, 0x43, 0x0F]]
    assert torch.equal(unpack_int4(packed, 5), q)


def test_storage_layout(model_dir):
    llm = LLM(model_dir, num_blocks=16, quantization="int4")
    layer = llm.engine.runner.model.model.layers[0]
    q_proj = layer.self_attn.q_proj
    assert isinstance(q_proj, QuantLinear) and q_proj.qweight.dtype == torch.uint8
    assert q_proj.qweight.shape == (64, 32) and q_proj.scales.shape == (64, 1)
    assert isinstance(layer.mlp.down_proj, QuantLinear)
    # The output head stays in the model dtype (see engine/quantization/linear.py).
    assert llm.engine.runner.model.lm_head.weight.dtype == torch.float32
    names = {n for n, _ in llm.engine.runner.model.named_parameters()}
    assert "model.layers.0.self_attn.q_proj.weight" not in names
    assert "model.layers.0.self_attn.q_proj.qweight" in names


# Accuracy on the test model (2 layers, hidden 64, weights of std 0.1: a random model amplifies
# weight error into logits more than a trained one; see benchmarks/RESULTS.md for the table).
# Bounds: mean relative L2 error of the end-of-prompt logits, share of 32 prompts whose first
# greedy token agrees, share whose whole 16-token greedy continuation agrees.
ACCURACY_BOUNDS = {
    "int8": (0.03, 0.85, 0.4),
    "fp8": (0.12, 0.7, 0.0),
    "int4": (0.45, 0.6, 0.0),
}


def measure(model_dir, quantization, baseline, dtype="float32") -> dict:
    llm = LLM(model_dir, dtype=dtype, num_blocks=1024, quantization=quantization)
    outputs, logits = run_with_logits(llm, accuracy_prompts())
    ref_outputs, ref_logits = baseline
    rel = torch.tensor([(a - b).norm() / b.norm() for a, b in zip(logits, ref_logits)])
    pairs = list(zip(outputs, ref_outputs))
    weights = [p for p in llm.engine.runner.model.parameters()]
    return {
        "weight_bytes": sum(p.numel() * p.element_size() for p in weights),
        "rel_logit_err_mean": float(rel.mean()),
        "rel_logit_err_max": float(rel.max()),
        "first_token_agreement": sum(a.token_ids[0] == b.token_ids[0] for a, b in pairs)
        / len(pairs),
        "greedy_agreement": sum(a.token_ids == b.token_ids for a, b in pairs) / len(pairs),
    }


@pytest.fixture(scope="module")
def measured(model_dir):
    """name -> measure(...) against the unquantized model, each computed once."""
    baseline = run_with_logits(LLM(model_dir, num_blocks=1024), accuracy_prompts())
    configs = {"int8": "int8", "fp8": "fp8", "int4": "int4", "int4-asym": INT4_ASYM}
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = measure(model_dir, configs[name], baseline)
        return cache[name]

    return get


@pytest.mark.parametrize("method", list(ACCURACY_BOUNDS))
def test_accuracy_against_unquantized(measured, method):
    result = measured(method)
    max_err, min_first, min_whole = ACCURACY_BOUNDS[method]
    assert result["rel_logit_err_mean"] < max_err, result
    assert result["first_token_agreement"] >= min_first, result
    assert result["greedy_agreement"] >= min_whole, result


def test_int8_is_closer_than_int4_and_asymmetric_int4_no_worse(measured):
    errors = {name: measured(name)["rel_logit_err_mean"] for name in ("int8", "int4", "int4-asym")}
    assert errors["int8"] < errors["int4"] / 5
    assert errors["int4-asym"] < errors["int4"] * 1.1
    # Bytes: int8 halves the linears, int4 quarters them (plus scales); the rest stays float32.
    assert measured("int4")["weight_bytes"] < measured("int8")["weight_bytes"]


@pytest.mark.parametrize("quantization", ["int8", INT4_ASYM, "fp8"], ids=["int8", "int4a", "fp8"])
def test_saved_checkpoint_loads_to_the_same_model(model_dir, tmp_path, quantization):
    """`save_quantized` then loading the folder gives the tokens quantize-at-load gives."""
    prompts = random_prompts([4, 30, 90], seed=21)
    at_load = LLM(model_dir, num_blocks=64, quantization=quantization)
    saved = save_quantized(model_dir, tmp_path / "q", quantization)
    stored = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == "baton"
    loaded = LLM(saved, num_blocks=64)  # quantization read from config.json
    for a, b in zip(at_load.generate(prompts, GREEDY), loaded.generate(prompts, GREEDY)):
        assert a.token_ids == b.token_ids
    with pytest.raises(ValueError, match="cannot be loaded as"):
        LLM(saved, num_blocks=64, quantization="int4" if quantization == "int8" else "int8")


def test_foreign_prequantized_checkpoint_gets_a_clear_error(model_dir, tmp_path):
    folder = tmp_path / "gptq"
    folder.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="pre-quantized 'gptq' checkpoints are not supported"):
        LLM(folder, num_blocks=8)


def test_moe_experts_are_quantized(tmp_path):
    path = write_test_checkpoint(tmp_path / "mixtral", architecture="mixtral", seed=3)
    prompts = accuracy_prompts(16)
    ref = run_with_logits(LLM(path, num_blocks=512), prompts)
    llm = LLM(path, num_blocks=512, quantization="int8")
    assert isinstance(llm.engine.runner.model.model.layers[0].mlp.experts, QuantExperts)
    outputs, logits = run_with_logits(llm, prompts)
    rel = torch.tensor([(a - b).norm() / b.norm() for a, b in zip(logits, ref[1])])
    # Median: a token near a routing tie may pick another expert (a jump, not drift).
    assert float(rel.median()) < 0.03
    first = sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(outputs, ref[0]))
    assert first >= 0.85 * len(prompts)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_handoff_between_quantized_workers(model_dir, method):
    """Prefill on one quantized engine, decode on another (the disaggregated path, KV copied
    in process): the tokens of one quantized engine doing both."""
    prompts = random_prompts([3, 16, 33, 120], seed=14)
    args = dict(quantization=method, num_blocks=64)
    expected = [o.token_ids for o in LLM(model_dir, **args).generate(prompts, GREEDY)]
    prefill = LLM(model_dir, max_num_batched_tokens=32, **args)
    decode = LLM(model_dir, **args)
    connector = CopyConnector(prefill.engine.runner.kv_caches, decode.engine.runner.kv_caches)
    prefill.engine.runner.kv_connector = connector
    assert handoff(prefill, decode, prompts, connector.targets.__setitem__) == expected


def accuracy_table(model_dir) -> list[dict]:
    rows = []
    for dtype in ("float32", "bfloat16"):
        baseline = run_with_logits(LLM(model_dir, dtype=dtype, num_blocks=1024), accuracy_prompts())
        for name, q in (
            ("int8", "int8"),
            ("fp8", "fp8"),
            ("int4", "int4"),
            ("int4-asym", INT4_ASYM),
        ):
            rows.append(
                {"dtype": dtype, "quantization": name, **measure(model_dir, q, baseline, dtype)}
            )
    return rows


if __name__ == "__main__":
    import tempfile

    folder = sys.argv[1] if len(sys.argv) > 1 else write_test_checkpoint(tempfile.mkdtemp())
    for row in accuracy_table(folder):
        print(json.dumps(row))


@pytest.mark.timeout(300)
def test_quantized_workers_serve_over_grpc(model_dir):
    """The deployment path: tier engine_args carry the quantization to a prefill and a decode
    worker (Ray actors, KV over gloo); gRPC streams the tokens the offline quantized engine
    gives."""
    ray = pytest.importorskip("ray")
    from tests.test_serving import Server, generate

    prompts = random_prompts([5, 40, 130], seed=22)
    offline = LLM(
        model_dir, dtype="float32", num_blocks=256, max_num_batched_tokens=128, quantization="int4"
    )
    expected = [o.token_ids for o in offline.generate(prompts, GREEDY)]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        server = Server(
            model_dir, num_prefill=1, num_decode=1, engine_args={"quantization": "int4"}
        )
        try:
            for prompt, want in zip(prompts, expected):
                tokens, _ = generate(server.stub, prompt, max_tokens=GREEDY.max_tokens)
                assert tokens == want
        finally:
            server.close()
    finally:
        ray.shutdown()
