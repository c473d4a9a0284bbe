"""Host time the engine spends building its per-step outputs, by output kind.

A cumulative output (`RequestOutput.token_ids`, `text` and `logprobs`: everything generated
so far) copies the whole output of every request every step, so its cost grows with the
output's length; a delta output holds only what is new (`engine.engine.OUTPUT_KINDS`). A decode
worker streams deltas; `LLM.generate` reads only final outputs.

One engine per kind (a 1-layer model on CPU, so that nothing but the host's work differs),
`--batch` greedy requests decoding `--tokens` tokens each, `LLMEngine._output` and the whole
step timed over the last tenth of the run (medians). "delta, ids": delta outputs without
detokenizing (a decode worker's requests: its router detokenizes).

    python -m benchmarks.output_kinds                      # 64 requests, 2000 tokens, logprobs 0
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from engine import LLM, SamplingParams
from engine.testing import write_test_checkpoint

VARIANTS = {  # name: (output kind, detokenize)
    "cumulative": ("cumulative", True),
    "delta": ("delta", True),
    "delta, ids": ("delta", False),  # a decode worker's: the router detokenizes
}


def output_ms_per_step(model_dir: str, variant: str, args) -> tuple[float, float]:
    """(ms building outputs, ms the whole step), medians over the run's last tenth."""
    llm = LLM(model_dir, dtype="float32", num_blocks=args.batch * (args.tokens // 16 + 2),
              max_num_seqs=args.batch)  # fmt: skip
    engine = llm.engine
    original, spent = engine._output, [0.0]

    def timed(*a, **k):
        start = time.perf_counter()
        out = original(*a, **k)
        spent[0] += time.perf_counter() - start
        return out

    engine._output = timed
    params = SamplingParams(
        max_tokens=args.tokens, temperature=0.0, ignore_eos=True, logprobs=args.logprobs
    )
    kind, detokenize = VARIANTS[variant]
    for i in range(args.batch):
        request, state = engine.make_request(
            str(i), [5 + i % 100, 6, 7, 8], params, kind, detokenize
        )
        engine.enqueue(request, state)
    outputs, steps, step = [], [], 0
    while engine.has_unfinished_requests():
        spent[0] = 0.0
        start = time.perf_counter()
        engine.step()
        step += 1
        if step > 0.9 * args.tokens:
            steps.append(time.perf_counter() - start)
            outputs.append(spent[0])
    return 1e3 * statistics.median(outputs), 1e3 * statistics.median(steps)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--logprobs", type=int, default=0, help="-1: none")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    args.logprobs = None if args.logprobs < 0 else args.logprobs
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        model_dir = str(
            write_test_checkpoint(
                Path(root) / "m",
                vocab_size=512,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=args.tokens + 64,
            )  # fmt: skip
        )
        print(f"{args.batch} requests x {args.tokens} tokens, logprobs {args.logprobs}, CPU")
        for _ in range(args.repeats):
            for variant in VARIANTS:
                outputs, step = output_ms_per_step(model_dir, variant, args)
                print(
                    f"{variant:10s}  building outputs {outputs:.2f} ms, whole step {step:.2f} ms "
                    "(last tenth, medians)"
                )


if __name__ == "__main__":
    main()
