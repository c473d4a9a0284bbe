"""Client-side TTFT against a running Baton: time to the first streamed message that carries a
token, next to the server's own `ttft_ms` (taken when the router has the token), per request.
Their difference is what the client waits beyond the router's clock (the gRPC round trip, and
anything the router does between having the first token and sending it).

    baton serve &                                    # the embedded default, or any deployment
    python -m benchmarks.client_ttft --requests 60   # sequential requests, 8 tokens each
"""

from __future__ import annotations

import argparse
import statistics
import time

import grpc

from proto import serving_pb2, serving_pb2_grpc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", default="localhost:50051")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args(argv)
    client, server, gap = [], [], []
    with grpc.insecure_channel(args.target) as channel:
        stub = serving_pb2_grpc.BatonStub(channel)
        for i in range(args.warmup + args.requests):
            sampling = serving_pb2.SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
            request = serving_pb2.GenerateRequest(prompt=f"Hello number {i}", sampling=sampling)
            start, first, last = time.perf_counter(), None, None
            for last in stub.Generate(request, timeout=60):
                if first is None and last.token_ids:
                    first = (time.perf_counter() - start) * 1e3
            if i >= args.warmup and first is not None:
                client.append(first)
                server.append(last.timings.ttft_ms)
                gap.append(first - last.timings.ttft_ms)
    print(
        f"{len(client)} requests: client TTFT median {statistics.median(client):.2f} ms, "
        f"server ttft_ms median {statistics.median(server):.2f} ms, client - server median "
        f"{statistics.median(gap):.2f} ms"
    )


if __name__ == "__main__":
    main()
