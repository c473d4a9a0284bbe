"""CUDA graphs for steps that hold prompt tokens, by pieces: everything but attention.

A decode step replays one CUDA graph (`engine.decode_graphs`). A step that holds a prompt chunk
cannot: its attention depends on how its tokens split into sequences, which changes every
step. Run eagerly, such a step is host-bound for a small model: on an H100, a 0.9B model (16
layers) took 8.4 ms for one 384-token prompt beside 63 decodes, of which 2.9 ms on the GPU
(`benchmarks/mixed_step.py`, RESULTS.md session 9). The rest was launching ~20 kernels a layer
from Python.

So the forward pass is captured in pieces, one graph per piece and token-count bucket, with
attention run eagerly between them (as vLLM's piecewise graphs do):

    piece 0      embedding, layer 0's input norm, q/k/v projection, RoPE
    piece i      layer i-1's output projection, add+norm, MLP; layer i's input norm ... RoPE
    piece L      layer L-1's output projection, add+norm, MLP; the final norm
    between      attention of layer i (the KV write included), on this step's metadata

The pieces read and write static buffers, `b` rows of them for the bucket b >= the step's n
tokens: the token ids and positions the step copies in, q / k / v (each piece's output),
the attention output, the residual stream and the final hidden state. Attention sees the
first n rows only. Rows n..b-1 hold whatever an earlier step left there: every op in a piece is
row-wise (linear layers, norms, RoPE of a row's own position, the MLP), so they never reach
the real rows, and their outputs are never read.

Only the fused (CUDA) path of dense models is captured: an MoE layer reads its per-expert token
counts on the host, a CLA layer has no K/V projection, attention sinks rotate in the cache, and
quantized linear layers choose kernels by row count; those run eagerly.
"""

from __future__ import annotations

import logging

import torch

from engine.attention.backend import AttentionMetadata

log = logging.getLogger(__name__)

# Buckets of token counts. A step of n tokens replays the smallest bucket b >= n; its padding
# is computed and thrown away. Steps larger than the largest bucket run eagerly: at thousands of
# tokens a step is bound by its matmuls, not by launches.
_SIZES = (16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


def prefill_graph_sizes(max_tokens: int) -> list[int]:
    """The buckets for steps of up to `max_tokens` tokens (the largest bucket holds them)."""
    sizes = [s for s in _SIZES if s < max_tokens]
    return sizes + [next((s for s in _SIZES if s >= max_tokens), _SIZES[-1])]


def supports(model, backend, quantized: bool) -> bool:
    """Whether `model`'s forward pass can be captured in pieces around `backend`'s attention."""
    from engine.attention.triton_backend import TritonAttentionBackend

    cfg = model.config
    return (
        model._ops is not None  # the fused CUDA path
        and type(backend) is TritonAttentionBackend  # not a sink backend (it applies RoPE)
        and not cfg.moe_layers
        and cfg.cla_share_factor == 1
        and not quantized
    )


class PrefillGraphs:
    """Piecewise CUDA graphs of the forward pass for steps of up to `sizes[-1]` tokens.

    With `capture` False the pieces run eagerly on the same buffers: what the tests check on
    CPU (the Triton interpreter), where graphs do not exist."""

    def __init__(self, model, backend, sizes: list[int], device: torch.device, capture=True):
        cfg = model.config
        self.model, self.backend, self.sizes = model, backend, sizes
        self.layers = list(model.model.layers)
        self.ops = model._ops
        largest, dtype = sizes[-1], model.model.embed_tokens.weight.dtype

        def buffer(*shape, dtype=dtype):
            return torch.zeros(shape, dtype=dtype, device=device)

        self.input_ids = buffer(largest, dtype=torch.int64)
        self.positions = buffer(largest, dtype=torch.int64)
        self.q = buffer(largest, cfg.num_heads, cfg.head_dim)
        self.k = buffer(largest, cfg.num_kv_heads, cfg.head_dim)
        self.v = buffer(largest, cfg.num_kv_heads, cfg.head_dim)
        self.attn_out = buffer(largest, cfg.num_heads, cfg.head_dim)
        self.residual = buffer(largest, cfg.hidden_size)
        self.hidden = buffer(largest, cfg.hidden_size)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        if not capture:
            return
        pool = None
        with torch.inference_mode():
            for b in reversed(sizes):  # largest first: the smaller ones reuse its memory
                for piece in range(len(self.layers) + 1):
                    self._piece(piece, b)  # warm-up: compiles kernels outside the capture
                torch.cuda.synchronize(device)
                graphs = []
                for piece in range(len(self.layers) + 1):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self._piece(piece, b)
                    pool = graph.pool()
                    graphs.append(graph)
                self.graphs[b] = graphs
        log.info("captured piecewise prefill CUDA graphs for %s tokens", sizes)

    def size_for(self, num_tokens: int) -> int | None:
        """The bucket of a step of `num_tokens` tokens; None: too many, run it eagerly."""
        if num_tokens > self.sizes[-1]:
            return None
        return next(b for b in self.sizes if b >= num_tokens)

    def _piece(self, piece: int, b: int) -> None:
        """Piece `piece` (see the module's docstring) on the first `b` rows of the buffers."""
        ops, layers = self.ops, self.layers
        if piece == 0:
            x = self.model.model.embed_tokens(self.input_ids[:b])
            h, residual = layers[0].fused_input_norm(ops, x, None)
            self.residual[:b].copy_(residual)
        else:
            residual = self.residual[:b]  # updated in place by the add+norms below
            out = self.attn_out[:b].view(b, -1)
            x = layers[piece - 1].fused_after_attention(
                ops, layers[piece - 1].self_attn.o_proj(out), residual
            )
            if piece == len(layers):
                self.hidden[:b].copy_(self.model.fused_final_norm(x, residual))
                return
            h, _ = layers[piece].fused_input_norm(ops, x, residual)
        q, k, v = layers[piece].self_attn.fused_qkv(self.positions[:b], h)
        self.q[:b].copy_(q)
        self.k[:b].copy_(k)
        self.v[:b].copy_(v)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        layer_done=None,
    ) -> torch.Tensor:
        """The model's forward pass for a step of n = len(input_ids) tokens (at most the
        largest bucket), `meta` prepared by the backend. Returns the final hidden states of the
        n rows: a view of a buffer that the next step overwrites."""
        n = input_ids.shape[0]
        b = self.size_for(n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        graphs = self.graphs.get(b)
        cfg = self.model.config
        q, k, v, out = self.q[:n], self.k[:n], self.v[:n], self.attn_out[:n]
        self._run(graphs, 0, b)
        for i in range(len(self.layers)):
            self.backend.forward(q, k, v, kv_caches[cfg.kv_layer(i)], meta, i, out=out)
            if layer_done is not None:
                layer_done(cfg.kv_layer(i))
            self._run(graphs, i + 1, b)
        return self.hidden[:n]

    def _run(self, graphs: list[torch.cuda.CUDAGraph] | None, piece: int, b: int) -> None:
        if graphs is None:
            self._piece(piece, b)
        else:
            graphs[piece].replay()
