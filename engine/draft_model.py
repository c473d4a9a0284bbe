"""The draft-model proposer of speculative decoding: a smaller checkpoint with the target's
tokenizer proposes k tokens for every speculating request, batched, on its own paged KV cache.

One step's proposals take k small forward passes over the whole batch:

    pass 1    each request's tokens the draft has not seen yet, packed as one batch
              | catch-up r0 | r1 | catch-up r2 ... |  -> last row of each -> d1
              (the first catch-up is the whole context: on a decode worker the prompt's KV came
              from the prefill worker for the target only, so the draft prefills it here, on
              the request's first decode step; the draft is cheap)
    pass j    one token per request still drafting: d_{j-1} at position L + j - 2 -> d_j
              (j = 2..k; a request given fewer drafts drops out)

Every pass is a step of one-token decode rows (`engine.decode_graphs`), pass 1 too when each
catch-up is short (at most _MAX_CATCHUP_ROWS tokens, as after a step that speculated: the
accepted drafts' KV is kept, so one or two tokens), else pass 1 runs as prefill chunks. On CUDA
those steps replay the draft's own decode CUDA graphs. All passes' inputs are known before the
first runs (only each draft token comes from the pass before, as a row of its output on the
device), so they go to the device in one upload, and the drafts come back in one copy.

Draft KV of a request with L tokens whose draft cache is valid for its first `num_computed`:

    position   | 0 ... L-1        | L ... L+k-2     |
    token      | t0 ... t_{L-1}   | d1 ... d_{k-1}  |
    draft KV   | pass 1 (valid)   | passes 2..k: `pending`, valid only if the target accepts

At the next step the pending KV of the drafts the target accepted (a prefix of the request's
new tokens) counts as computed; the rest is overwritten, as the target overwrites its rejected
drafts' KV.

Sampling requests draw d_j from q_j, the draft's distribution processed with the request's
temperature / top-k / top-p / min-p, from the request's own random stream, and q goes with the
drafts to the rejection rule (`speculative.rejection_sample`). Greedy requests take the argmax.

Blocks: a `BlockPool` of the draft's own, without prefix caching. A request takes draft blocks
when it first speculates (never preempting anyone: short of blocks, it proposes fewer drafts
or none) and gives them back through `retain`, which the engine calls after every step and
abort with the ids still running, so finished, aborted and preempted requests free them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from engine.attention.backend import AttentionMetadata
from engine.config import EngineConfig, ModelConfig
from engine.decode_graphs import DecodeGraphs, DecodeRows, Stager, graph_sizes, run_decode_rows
from engine.kv_cache import quant
from engine.kv_cache.block_pool import Block, BlockPool
from engine.loader import load_model
from engine.model_runner import kv_bytes_per_token, make_attention_backend
from engine.request import Request
from engine.sampler import Sampler

log = logging.getLogger(__name__)

# Pass 1 runs as decode rows when every request catches up on at most this many tokens.
_MAX_CATCHUP_ROWS = 32


@dataclass
class _DraftSeq:
    blocks: list[Block] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose draft KV is valid
    pending: list[int] = field(default_factory=list)  # tokens whose KV follows, speculatively

    @property
    def block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks]


class DraftProposer:
    """Called by `LLMEngine._propose` (propose_batch) and after each step (retain)."""

    def __init__(
        self,
        config: EngineConfig,
        target: ModelConfig,
        dtype: torch.dtype,
    ):
        spec = config.speculative
        if config.attention_sinks:
            # NOTE: the draft's pool keeps every block; sinks' cache-relative positions and
            # evictions are the target scheduler's alone.
            raise ValueError("a draft model with attention sinks is not supported")
        self.model_config = ModelConfig.from_pretrained(spec.model)
        if self.model_config.vocab_size != target.vocab_size:
            raise ValueError(
                f"draft model {spec.model} has vocab_size {self.model_config.vocab_size}, the "
                f"target {target.vocab_size}: a draft must share the target's tokenizer"
            )
        self.config = config
        self.device = device = config.resolve_device()
        self.block_size = config.block_size
        max_model_len = config.max_model_len or target.max_position_embeddings
        if self.model_config.max_position_embeddings < max_model_len:
            raise ValueError(
                f"draft model max_position_embeddings {self.model_config.max_position_embeddings}"
                f" is below the engine's max_model_len {max_model_len}"
            )
        self.max_model_len = max_model_len
        self.backend, is_triton = make_attention_backend(
            config, self.model_config, max_model_len, device
        )
        self.model = load_model(spec.model, self.model_config, self.backend, dtype, device)
        if is_triton:
            self.model.fuse_for_cuda()
        # As the target's (ModelRunner): graphs on CUDA unless eager, never with MoE layers.
        self.use_graphs = (
            is_triton and not config.enforce_eager and not self.model_config.moe_layers
        )
        self.graphs: DecodeGraphs | None = None  # captured with the cache (allocate_cache)
        self.stager = Stager(device)
        self.dtype = dtype
        self.sampler: Sampler | None = None
        # A draft pass costs about its parameters' share of a target step (the cost rule).
        self.cost = _num_params(self.model_config) / _num_params(target)
        self.kv_caches: list[torch.Tensor] = []
        self.pool: BlockPool | None = None
        self.scratch_block = 0  # the cache's block past the pool: graph padding rows write it
        self._seqs: dict[str, _DraftSeq] = {}
        # The longest catch-up (tokens) of the last `propose_batch`: one speculative step adds
        # at most k + 1; more is a request's first proposal or one after a pause (a one-off
        # cost, which the engine's step cost meter does not learn from).
        self.last_catch_up = 0

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.model_config, self.config.kv_cache_dtype, self.dtype)

    def allocate_cache(self, num_blocks: int, sampler: Sampler) -> None:
        """The draft's KV tensors and pool; called once the target's cache is sized. `sampler`
        is the target's: drafts are drawn from the requests' own random streams."""
        self.sampler = sampler
        cfg, kind = self.model_config, self.config.kv_cache_dtype
        row = quant.cache_row_size(kind, cfg.head_dim)
        # With graphs, one block more than the pool hands out: padding rows write there.
        shape = (2, num_blocks + int(self.use_graphs), self.block_size, cfg.num_kv_heads, row)
        dtype = quant.cache_dtype(kind, self.dtype)
        self.kv_caches = [
            torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(cfg.num_kv_layers)
        ]
        self.pool = BlockPool(num_blocks)
        self.scratch_block = num_blocks
        log.info("draft KV cache: %d blocks of %d tokens", num_blocks, self.block_size)
        if self.use_graphs:
            # A pass has at most a verify step's rows: k + 1 per speculating request.
            max_rows = self.config.speculative.max_verify_rows(self.config.max_num_seqs)
            self.graphs = DecodeGraphs(
                self.model, self.backend, self.kv_caches, graph_sizes(max_rows),
                self.block_size, self.max_model_len,
            )  # fmt: skip

    @property
    def num_held_blocks(self) -> int:
        return sum(len(seq.blocks) for seq in self._seqs.values())

    def retain(self, running_ids: set[str]) -> None:
        """Free the draft state of every request not in `running_ids`."""
        for request_id in [rid for rid in self._seqs if rid not in running_ids]:
            seq = self._seqs.pop(request_id)
            self.pool.free(list(reversed(seq.blocks)))

    @torch.inference_mode()
    def propose_batch(self, requests: list[Request], num_drafts: list[int]) -> None:
        """Set each request's `spec_token_ids` (at most its count of drafts) and, when it
        samples, `spec_draft_probs`. Requests are decoding, with count >= 1."""
        budget = self.config.max_num_batched_tokens
        chunks, drafting = [], []  # pass 1: (tokens, start, block ids); (request, seq, k)
        for request in requests:
            request.spec_token_ids, request.spec_draft_probs = [], None
        for request, k in zip(requests, num_drafts):
            seq = self._seqs.setdefault(request.request_id, _DraftSeq())
            self._sync(seq, request)
            start, length = seq.num_computed, request.num_tokens
            if length - start > budget:  # a long catch-up: part of it now, no drafts yet
                k, length = 0, start + budget
            # Blocks for the KV of every input token: up to d_{k-1} at L + k - 2.
            while not self._ensure_blocks(seq, length + max(k - 1, 0)):
                if k <= 1:
                    k = -1
                    break
                k = 1
            if k < 0 or length == start:
                continue
            chunks.append((request.all_token_ids[start:length], start, seq.block_ids))
            drafting.append((request, seq, k))
            seq.num_computed = length
            budget -= length - start
            if budget == 0:
                break
        self.last_catch_up = max((len(tokens) for tokens, _, _ in chunks), default=0)
        if not chunks:
            return
        # active[j - 1]: the requests (indices into `drafting`) that draw d_j in pass j.
        active = [[i for i, (_, _, k) in enumerate(drafting) if k > 0]]
        for j in range(2, max(k for _, _, k in drafting) + 1):
            active.append([i for i in active[-1] if drafting[i][2] >= j])
        drawn = self._run_passes(chunks, drafting, active)
        drafts: list[list[int]] = [[] for _ in drafting]
        probs: list[list[torch.Tensor]] = [[] for _ in drafting]
        if drawn:
            tokens = torch.cat([t for t, _ in drawn]).tolist()  # the one wait for the device
            for rows, (_, q) in zip(active, drawn):
                for row, i in enumerate(rows):
                    drafts[i].append(tokens[row])
                    if q is not None:
                        probs[i].append(q[row])
                tokens = tokens[len(rows) :]
        for i, (request, seq, k) in enumerate(drafting):
            if k == 0:
                continue
            request.spec_token_ids = drafts[i]
            seq.pending = drafts[i][: k - 1]
            if not request.sampling_params.greedy:
                request.spec_draft_probs = torch.stack(probs[i])

    def _run_passes(self, chunks, drafting, active) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Passes 1..k: per pass, its draws (token ids on the device, q or None), rows in the
        order of `active[j - 1]`. Pass 1 runs the catch-up chunks as decode rows when all are
        short, else as prefill chunks; pass j > 1 feeds each request's d_{j-1} (a row of the
        previous pass's draws, gathered on the device) at position L + j - 2."""
        passes: list[DecodeRows] = []
        as_rows = self.last_catch_up <= _MAX_CATCHUP_ROWS
        if as_rows:
            catch_up = DecodeRows(self.block_size, self.backend)
            last_rows = []  # each chunk's last row: its logits give d1
            for tokens, start, block_ids in chunks:
                catch_up.add(tokens, start, block_ids)
                last_rows.append(catch_up.num_rows - 1)
            passes.append(catch_up)
        for j in range(2, len(active) + 1):
            rows = DecodeRows(self.block_size, self.backend)
            for row, i in enumerate(active[j - 2]):
                request, seq, k = drafting[i]
                if k >= j:  # its "token" is its row in the previous pass's draws
                    rows.add([row], request.num_tokens + j - 2, seq.block_ids)
            passes.append(rows)
        # Pass 1's rows that draw d1 (each drafting chunk's last), uploaded with the passes.
        first = [last_rows[i] for i in active[0]] if as_rows else active[0]
        inputs, index = self._upload(passes, first)
        if as_rows:
            logits, argmax = self._decode(*inputs.pop(0))
        else:
            hidden = self._forward(chunks)  # each chunk's last token
            logits = self.model.compute_logits(hidden)
            argmax = logits.argmax(dim=-1)
        if not first:
            return []  # catch-up only
        draws = [self._draw(logits[index], argmax[index], drafting, active[0])]
        for rows, (size, ids, positions, meta) in zip(active[1:], inputs):
            ids = draws[-1][0].index_select(0, ids)
            logits, argmax = self._decode(size, ids, positions, meta)
            draws.append(self._draw(logits, argmax, drafting, rows))
        return draws

    def _upload(self, passes: list[DecodeRows], index: list[int]):
        """Every pass's rows and `index` (row indices) in one copy to the device -> (per pass
        (graph bucket or None, input ids, positions, metadata), `index` on the device)."""
        flat: list[int] = []
        sizes, ends = [], []
        for rows in passes:
            size = self.graphs.size_for(rows.num_rows) if self.graphs is not None else None
            flat += rows.flat(size or rows.num_rows, self.scratch_block)
            sizes.append(size)
            ends.append(len(flat))
        staged = self.stager.upload([torch.tensor(flat + index, dtype=torch.int64)])[0]
        starts = [0, *ends[:-1]]
        inputs = [
            (size, *rows.unpack(staged[a:b]))
            for size, rows, a, b in zip(sizes, passes, starts, ends)
        ]
        return inputs, staged[len(flat) :]

    def _decode(self, size, ids, positions, meta) -> tuple[torch.Tensor, torch.Tensor]:
        return run_decode_rows(
            self.model, self.backend, self.kv_caches, self.graphs, size, ids, positions, meta
        )

    def _sync(self, seq: _DraftSeq, request: Request) -> None:
        """Count the pending draft KV whose tokens the target accepted as computed."""
        tail = request.all_token_ids[seq.num_computed : seq.num_computed + len(seq.pending)]
        match = 0
        while match < len(tail) and tail[match] == seq.pending[match]:
            match += 1
        # NOTE: at least one token goes in, so that its logits give d1 (a request not scheduled
        # last step has all its tokens computed: its last one is simply rewritten).
        seq.num_computed = min(seq.num_computed + match, request.num_tokens - 1)
        seq.pending = []

    def _ensure_blocks(self, seq: _DraftSeq, num_tokens: int) -> bool:
        needed = -(-num_tokens // self.block_size) - len(seq.blocks)
        if needed > self.pool.num_free_blocks:
            return False
        if needed > 0:
            seq.blocks += self.pool.allocate(needed)
        return True

    def _forward(self, chunks: list[tuple[list[int], int, list[int]]]) -> torch.Tensor:
        """One draft forward over chunks of (tokens, position of the first, block ids); returns
        the hidden state of each chunk's last token, [num_chunks, hidden]."""
        bs = self.block_size
        q_lens = torch.tensor([len(tokens) for tokens, _, _ in chunks])
        ends = q_lens.cumsum(0)
        seq_of_token = torch.repeat_interleave(torch.arange(len(chunks)), q_lens)
        first = torch.tensor([start for _, start, _ in chunks])
        positions = (
            first[seq_of_token] + torch.arange(int(ends[-1])) - (ends - q_lens)[seq_of_token]
        )
        width = max(len(block_ids) for _, _, block_ids in chunks)
        tables = torch.tensor([b + [0] * (width - len(b)) for _, _, b in chunks])
        slots = tables[seq_of_token, positions // bs] * bs + positions % bs
        input_ids = torch.tensor([t for tokens, _, _ in chunks for t in tokens])
        device = self.device
        meta = AttentionMetadata(
            slot_mapping=slots.to(device),
            query_start_loc=[0, *ends.tolist()],
            seq_lens=(first + q_lens).tolist(),
            block_tables=tables.to(device),
            block_size=bs,
        )
        self.backend.prepare(meta)
        hidden = self.model(input_ids.to(device), positions.to(device), self.kv_caches, meta)
        return hidden[(ends - 1).to(device)]

    def _draw(self, logits, argmax, drafting, rows: list[int]):
        """Each row's next draft token (a new tensor on the device: a graph's outputs are
        overwritten by its next replay) and q (normalized rows; None if all are greedy)."""
        requests = [drafting[i][0] for i in rows]
        greedy = [r.sampling_params.greedy for r in requests]
        if all(greedy):
            return argmax.clone(), None
        q = self.sampler.probs(logits.float(), requests)
        q = q / q.sum(dim=-1, keepdim=True)
        sampled = self.sampler.draw(q, requests)
        if not any(greedy):
            return sampled, q
        # NOTE: the mask's copy to the device waits for the pass: only mixed batches pay it.
        return torch.where(torch.tensor(greedy, device=argmax.device), argmax, sampled), q


def _num_params(cfg: ModelConfig) -> int:
    """Parameters a forward pass reads per token (dense MLP, or the active experts), output
    head included: the draft's cost relative to the target's."""
    attn = cfg.hidden_size * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    experts = cfg.num_experts_per_tok if cfg.moe_layers else 1
    inter = cfg.moe_intermediate_size if cfg.moe_layers else cfg.intermediate_size
    mlp = 3 * cfg.hidden_size * inter * experts
    return cfg.num_layers * (attn + mlp) + cfg.vocab_size * cfg.hidden_size
