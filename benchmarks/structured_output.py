"""Structured output's cost: decode throughput with and without constraints, same model, same
prompts, same run.

Each workload runs every request for exactly `--max-tokens` tokens, so tokens per second compare
like for like: `plain` (no constraint, ignore_eos), `json` (a JSON schema whose arrays must be
longer than the run, so the grammar never ends it early), `regex` (likewise), and `mixed` (half
json, half plain). Reported: output tokens/s, the ratio to plain, and the host time spent on
masks per step (`GrammarMasker.start` + the wait in `apply`; on CUDA the fill overlaps the
forward pass, so only the wait costs).

    python -m benchmarks.structured_output                      # CPU, the demo model's shape
    python -m benchmarks.structured_output --shape 8b --batch-sizes 1,32,128   # GPU, random
        # weights of Llama-3-8B's shape; a 32k byte-level BPE trained here on Python's own
        # sources stands in for its tokenizer (masks are 128256 wide either way)
"""

from __future__ import annotations

import argparse
import glob
import json
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from engine import LLM, SamplingParams
from engine.structured_output import GrammarMasker, PendingMask
from engine.testing import DEMO_MODEL_CONFIG, write_test_checkpoint

# Long outputs by construction: at least 500 array items, far more than any run's tokens.
JSON_SCHEMA = {
    "type": "array",
    "minItems": 500,
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 10**6},
            "name": {"type": "string", "maxLength": 12},
            "tag": {"enum": ["red", "green", "blue"]},
            "score": {"type": "number", "minimum": -10, "maximum": 10, "multipleOf": 0.5},
        },
        "required": ["id", "name", "tag", "score"],
        "additionalProperties": False,
    },
}
REGEX = r"([a-z]{1,8}[ ,.]){500,}"


class MaskTimer:
    """Host time in GrammarMasker.start and PendingMask.apply (the wait plus the mask op)."""

    def __init__(self):
        self.seconds, self.steps = 0.0, 0
        self._start, self._apply = GrammarMasker.start, PendingMask.apply
        timer = self

        def start(masker, *args):
            t = time.perf_counter()
            try:
                return timer._start(masker, *args)
            finally:
                timer.seconds += time.perf_counter() - t

        def apply(pending, logits):
            t = time.perf_counter()
            try:
                return timer._apply(pending, logits)
            finally:
                timer.seconds += time.perf_counter() - t
                timer.steps += 1

        GrammarMasker.start, PendingMask.apply = start, apply

    def reset(self):
        self.seconds, self.steps = 0.0, 0


def train_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE trained on Python's standard library sources (on every machine)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = sorted(glob.glob(f"{sysconfig.get_paths()['stdlib']}/**/*.py", recursive=True))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train(files[:1500], trainer)
    tokenizer.save(str(path / "tokenizer.json"))


def make_llm(root: Path, args) -> LLM:
    common = dict(max_num_batched_tokens=8192, max_num_seqs=max(args.batch_sizes))
    if args.shape == "8b":
        from benchmarks.gpu_common import LLAMA3_8B, write_config_only

        config = {**LLAMA3_8B, "bos_token_id": 1, "eos_token_id": 2}
        model_dir = write_config_only(root / "llama3-8b-shape", config)
        train_tokenizer(model_dir, 32000)
        return LLM(model_dir, dtype="bfloat16", extra={"random_weights": True}, **common)
    model_dir = write_test_checkpoint(root / "demo", **DEMO_MODEL_CONFIG)
    return LLM(model_dir, num_blocks=4096, **common)


def run(llm: LLM, prompts, params, timer: MaskTimer) -> tuple[float, int]:
    llm.generate(prompts[:2], params[:2])  # warm-up: compiles the grammars, first kernels
    timer.reset()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outputs)
    assert all(len(o.token_ids) == params[0].max_tokens for o in outputs), "a request ended early"
    return elapsed, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=["demo", "8b"], default="demo")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    timer = MaskTimer()
    with tempfile.TemporaryDirectory() as tmp:
        llm = make_llm(Path(tmp), args)
        vocab = llm.engine.model_config.vocab_size
        device = llm.engine.runner.device
        print(f"# model {args.shape}, vocab {vocab}, device {device}, torch {torch.__version__}")
        print("| batch | workload | tokens/s | vs plain | mask ms/step |")
        print("|---|---|---|---|---|")
        gen = torch.Generator().manual_seed(0)
        for batch in args.batch_sizes:
            prompts = [
                torch.randint(3, min(vocab, 1000), (args.prompt_len,), generator=gen).tolist()
                for _ in range(batch)
            ]
            base = dict(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
            constrained = {
                "plain": [SamplingParams(**base)] * batch,
                "json": [SamplingParams(**base, json_schema=JSON_SCHEMA)] * batch,
                "regex": [SamplingParams(**base, regex=REGEX)] * batch,
                "mixed": [
                    SamplingParams(**base, json_schema=JSON_SCHEMA if i % 2 else None)
                    for i in range(batch)
                ],
            }
            # Workloads alternate, best of --repeats each: a busy machine slows them alike.
            best = {}
            for _ in range(args.repeats):
                for name, params in constrained.items():
                    elapsed, tokens = run(llm, prompts, params, timer)
                    mask_ms = 1e3 * timer.seconds / timer.steps if timer.steps else 0.0
                    if name not in best or elapsed < best[name][0]:
                        best[name] = (elapsed, tokens, mask_ms)
            plain_rate = best["plain"][1] / best["plain"][0]
            for name, (elapsed, tokens, mask_ms) in best.items():
                rate = tokens / elapsed
                print(
                    f"| {batch} | {name} | {rate:.0f} | {rate / plain_rate:.2f} | {mask_ms:.2f} |",
                    flush=True,
                )
    print(json.dumps(vars(args)))


if __name__ == "__main__":
    main()
