"""Owns the model weights and the KV cache tensors; turns a SchedulerOutput into sampled tokens.

Inputs are built once per step with tensor ops (no per-token Python loops): the scheduled
requests' tokens are packed back to back, decodes first, exactly in the scheduler's order.

A step in which every request is a decode, with or without drafts to verify, is a step of
one-token rows (`engine.decode_graphs.DecodeRows`: a request verifying d drafts is d + 1 rows),
and a request with drafts in a step that also prefills is packed as those rows too.

On CUDA: attention runs on the Triton backend, a step's index tensors reach the GPU in one
non-blocking copy from a pinned buffer, and decode-rows steps (plain decodes and verification)
replay CUDA graphs captured per row-count bucket (`DecodeGraphs`); steps with prompt tokens replay
graphs of everything but attention, per token-count bucket (`engine.prefill_graphs`).
`EngineConfig.enforce_eager` turns both off, `decode_graphs=False` the first,
`prefill_graphs=False` the second.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention.backend import AttentionMetadata, AttentionSpec
from engine.attention.torch_backend import TorchAttentionBackend
from engine.config import EngineConfig, ModelConfig
from engine.decode_graphs import DecodeGraphs, DecodeRows, Stager, graph_sizes, run_decode_rows
from engine.kv_cache import quant
from engine.kv_connector import KVConnector
from engine.loader import load_model
from engine.models.llama import LlamaForCausalLM, rope_inv_freq
from engine.prefill_graphs import PrefillGraphs, prefill_graph_sizes
from engine.prefill_graphs import supports as supports_prefill_graphs
from engine.quantization.linear import check_supported, quantize_model
from engine.sampler import Sampler, SamplerOutput, all_plain_greedy
from engine.scheduler import SchedulerOutput
from engine.speculative import accept_greedy
from engine.structured_output import GrammarMasker

log = logging.getLogger(__name__)

# With no `num_blocks` given on CPU, the KV cache takes this share of available RAM, capped.
_CPU_KV_FRACTION = 0.25
_CPU_KV_CAP_BYTES = 4 << 30


@dataclass
class RunnerOutput:
    # Request id → sampled tokens, only for requests whose chunk reached their last token: one
    # token, or with drafts (speculative decoding) the accepted drafts and the target's next.
    sampled: dict[str, list[int]]
    logprobs: dict[str, tuple[float, list[tuple[int, float]]]]
    # The logits rows that were sampled from, in `sampled`'s order (kept for tests and debugging;
    # after a graph replay, a view that the next replay overwrites: with async scheduling, one
    # launched before this step is read).
    logits: torch.Tensor | None = None


@dataclass
class PendingStep:
    """A launched step (`ModelRunner.launch`); `ModelRunner.finish` turns it into a RunnerOutput.
    On the greedy fast path `tokens` (the argmax of each sampled row, in `request_ids` order) are
    still on the device and `copy` is their copy to the host under way; otherwise `result` is
    ready. With `drafts` (greedy verification), a request has len(draft) + 1 rows there, and
    `finish` accepts its drafts against them."""

    request_ids: list[str]
    tokens: torch.Tensor | None
    copy: tuple[torch.Tensor, torch.cuda.Event | None] | None
    logits: torch.Tensor | None
    end_step: Callable[[], None] | None = None  # the KV connector's, after the tokens are read
    result: RunnerOutput | None = None
    drafts: list[list[int]] | None = None  # per request of `request_ids`, when verifying


def make_attention_backend(
    config: EngineConfig, model_config: ModelConfig, max_model_len: int, device: torch.device
):
    """The attention backend for a model: Triton on CUDA, plain PyTorch otherwise (also on
    CUDA with extra["attention_backend"] = "torch", for tests). Returns (backend, is_triton)."""
    spec = AttentionSpec(
        num_heads=model_config.num_heads,
        num_kv_heads=model_config.num_kv_heads,
        head_dim=model_config.head_dim,
        scale=model_config.head_dim**-0.5,
        sliding_window=model_config.sliding_window,
        kv_cache_dtype=config.kv_cache_dtype,
        layer_windows=model_config.layer_windows,
    )
    use_triton = (
        device.type == "cuda" and config.extra.get("attention_backend", "triton") == "triton"
    )
    if config.attention_sinks:
        return _sink_backend(spec, model_config, config, use_triton), use_triton
    if use_triton:
        from engine.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(spec, max_model_len), True
    return TorchAttentionBackend(spec), False


def kv_bytes_per_token(cfg: ModelConfig, kv_cache_dtype: str, dtype: torch.dtype) -> int:
    """Bytes of KV cache one token takes across all layers (8-bit KV: values and scales)."""
    elem = quant.cache_dtype(kv_cache_dtype, dtype).itemsize
    row = quant.cache_row_size(kv_cache_dtype, cfg.head_dim)
    return 2 * cfg.num_kv_layers * cfg.num_kv_heads * row * elem


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        dtype: torch.dtype,
        extra_kv_bytes_per_token: int = 0,
    ):
        """`extra_kv_bytes_per_token`: another cache that grows with this one (a draft model's)
        and shares the memory budget when `num_blocks` is sized from free memory."""
        self.config = config
        self.model_config = model_config
        self.device = config.resolve_device()
        self.dtype = dtype
        self.block_size = config.block_size
        self.max_model_len = config.max_model_len or model_config.max_position_embeddings
        self.extra_kv_bytes_per_token = extra_kv_bytes_per_token
        self.backend, use_triton = make_attention_backend(
            config, model_config, self.max_model_len, self.device
        )
        if config.quantization is not None:
            check_supported(config.quantization, self.device)
        if config.extra.get("random_weights"):
            self.model = random_model(model_config, self.backend, dtype, self.device, config.seed)
            if config.quantization is not None:
                quantize_model(self.model, config.quantization)
        else:
            self.model = load_model(
                config.model, model_config, self.backend, dtype, self.device, config.quantization
            )
        if use_triton:
            self.model.fuse_for_cuda()
        # NOTE: MoE layers read per-expert token counts on the host each step (moe.py), which a
        # CUDA graph cannot capture.
        use_graphs = use_triton and not config.enforce_eager and not model_config.moe_layers
        self.num_blocks = config.num_blocks or self._blocks_from_memory()
        # With graphs, one block more than the scheduler knows of: padding rows write there.
        shape = (
            2,
            self.num_blocks + int(use_graphs),
            self.block_size,
            model_config.num_kv_heads,
            quant.cache_row_size(config.kv_cache_dtype, model_config.head_dim),
        )
        cache_dtype = quant.cache_dtype(config.kv_cache_dtype, dtype)
        # One allocation, a view per layer: kvtransfer then copies all of a message's layers
        # in one kernel (KVLayout.stacked_rows).
        stacked = torch.zeros(
            (model_config.num_kv_layers, *shape), dtype=cache_dtype, device=self.device
        )
        self.kv_caches = list(stacked.unbind(0))
        self.sampler = Sampler(self.device, config.seed)
        self.grammar_masker = GrammarMasker(model_config.vocab_size, self.device)
        # Set by a prefill worker: moves KV out while the forward pass runs.
        self.kv_connector: KVConnector | None = None
        self.stager = Stager(self.device)
        self.token_reader = TokenReader(self.device)
        self.graphs = None
        if use_graphs and config.decode_graphs:
            # Buckets up to max_num_seqs rows, and with speculation up to a verify step's rows.
            max_rows = config.max_num_seqs
            if config.speculative is not None:
                max_rows = max(max_rows, config.speculative.max_verify_rows(max_rows))
            self.graphs = DecodeGraphs(
                self.model, self.backend, self.kv_caches, graph_sizes(max_rows),
                self.block_size, self.max_model_len,
            )  # fmt: skip
        self.prefill_graphs = None
        quantized = config.quantization is not None
        if (
            use_graphs
            and config.prefill_graphs
            and supports_prefill_graphs(self.model, self.backend, quantized)
        ):
            sizes = prefill_graph_sizes(config.max_num_batched_tokens)
            self.prefill_graphs = PrefillGraphs(self.model, self.backend, sizes, self.device)

    @property
    def kv_bytes_per_block(self) -> int:
        return self.kv_bytes_per_token * self.block_size

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.model_config, self.config.kv_cache_dtype, self.dtype)

    def _blocks_from_memory(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * self.config.kv_cache_memory_fraction)
        else:
            import os

            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            budget = min(int(available * _CPU_KV_FRACTION), _CPU_KV_CAP_BYTES)
        num_blocks = budget // (
            self.kv_bytes_per_block + self.extra_kv_bytes_per_token * self.block_size
        )
        if num_blocks < 1:
            raise RuntimeError("not enough memory left for a single KV block")
        log.info("KV cache: %d blocks of %d tokens", num_blocks, self.block_size)
        return num_blocks

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run one scheduled step to its sampled tokens (`launch` then `finish`)."""
        return self.finish(self.launch(sched))

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, prev: PendingStep | None = None) -> PendingStep:
        """Start a step: inputs, forward, head, sampling. On the greedy fast path the result
        stays on the device (a copy to the host under way) until `finish`; other steps are
        complete on return. `prev`: the step still running whose tokens are this chained
        step's inputs (async scheduling: every row has `ScheduledRequest.prev_row`)."""
        connector = self.kv_connector
        layer_done = None
        if connector is not None and connector.on_step_start(sched):
            layer_done = connector.on_layer_done
        # A step of decodes only, drafts to verify included, is a step of one-token rows
        # (`DecodeRows`): packed the short way, padded to its graph's bucket when one replays it.
        graph_size = pad_to = None
        if layer_done is None and all(
            s.num_tokens == 1 + len(s.spec_token_ids) for s in sched.scheduled
        ):
            if self.graphs is not None:
                graph_size = self.graphs.size_for(sched.num_tokens)
            pad_to = graph_size or sched.num_tokens
        input_ids, positions, meta, sample_rows, sample_requests = self._prepare(sched, pad_to)
        if prev is not None:
            # A chained step's "ids" are rows of the previous step's tokens, still on the device.
            assert pad_to is not None and prev.tokens is not None, "only decodes chain"
            input_ids = prev.tokens.index_select(0, input_ids)
        drafts = {s.request.request_id: s.spec_token_ids for s in sched.scheduled}
        # Structured output: the constrained rows' masks are filled on the host while the model
        # runs (None when no request sampled in this step is constrained).
        masks = self.grammar_masker.start(
            sample_requests, [drafts[r.request_id] for r in sample_requests]
        )
        tokens = None  # the argmax of each sampled row, on the device
        if pad_to is not None:
            logits, tokens = run_decode_rows(
                self.model, self.backend, self.kv_caches, self.graphs, graph_size,
                input_ids, positions, meta,
            )  # fmt: skip
            if len(sample_rows) < sched.num_tokens:  # a 1-token chunk that samples nothing
                logits, tokens = logits[sample_rows], tokens[sample_rows]
        else:
            self.backend.prepare(meta)
            pieces = self.prefill_graphs
            # A prefill worker's KV connector sends each layer from `layer_done`, which the
            # pieces call after the layer's attention (its KV written), between graph replays.
            if pieces is not None and pieces.size_for(input_ids.shape[0]) is not None:
                hidden = pieces.forward(input_ids, positions, self.kv_caches, meta, layer_done)
            else:
                hidden = self.model(input_ids, positions, self.kv_caches, meta, layer_done)
            logits = self.model.compute_logits(hidden[sample_rows]) if sample_rows else None
        end_step = None if connector is None else (lambda: connector.on_step_end(sched))
        ids = [r.request_id for r in sample_requests]
        verifying = [drafts[rid] for rid in ids]
        if sample_rows and masks is None and all_plain_greedy(sample_requests):
            # Greedy fast path: the argmax (inside the graph on a replay) and one copy of the
            # step's tokens to the host; no sampler, no float copies of the logits. Drafts are
            # accepted against the argmax rows on the host (`finish`).
            if tokens is None:
                tokens = logits.argmax(dim=-1)
            copy = self.token_reader.start(tokens)
            return PendingStep(
                ids, tokens, copy, logits, end_step, drafts=verifying if any(verifying) else None
            )
        result = RunnerOutput({}, {})
        if not sample_rows:
            pass
        elif any(verifying):
            masked = logits if masks is None else masks.apply(logits)
            result = self._verify(masked, sample_requests, drafts, logits)
        else:
            masked = logits if masks is None else masks.apply(logits)
            out: SamplerOutput = self.sampler(masked, sample_requests, raw_logits=logits)
            logprobs = {rid: lp for rid, lp in zip(ids, out.logprobs) if lp is not None}
            sampled = {rid: [t] for rid, t in zip(ids, out.token_ids)}
            result = RunnerOutput(sampled, logprobs, logits)
        return PendingStep(ids, None, None, logits, end_step, result)

    def finish(self, pending: PendingStep) -> RunnerOutput:
        """The launched step's sampled tokens on the host (waits for the device)."""
        result = pending.result
        if result is None:
            token_ids = self.token_reader.finish(pending.copy)
            logits = pending.logits
            if pending.drafts is None:
                sampled = {rid: [t] for rid, t in zip(pending.request_ids, token_ids)}
            else:  # greedy verification: each request's rows are the target's argmax
                sampled, start, last = {}, 0, []
                for rid, draft in zip(pending.request_ids, pending.drafts):
                    end = start + len(draft) + 1
                    sampled[rid] = accept_greedy(draft, token_ids[start:end])
                    start = end
                    last.append(end - 1)
                # NOTE: indexed here, after the wait: an index moved to the device earlier
                # would have blocked the host until the step ran.
                logits = logits[last]  # one row per request, its last
            result = RunnerOutput(sampled, {}, logits)
        if pending.end_step is not None:
            pending.end_step()
        return result

    def wait(self, pending: PendingStep) -> None:
        """Block until the launched step's device work (its KV writes included) is done."""
        if pending.copy is not None and pending.copy[1] is not None:
            pending.copy[1].synchronize()

    def _verify(self, logits, requests, drafts: dict[str, list[int]], raw) -> RunnerOutput:
        """A step with drafts: `logits` has len(draft) + 1 rows per request (one for the rest).
        Requests with drafts are verified; the others sample their one row as usual. `raw`:
        the logits before structured output's masks, for logprobs.

            rows   | r0 | r1 r1 r1 | r2 | r3 r3 |     (r1 verifies 2 drafts, r3 one)
        """
        counts = [len(drafts[r.request_id]) + 1 for r in requests]
        ends = torch.tensor(counts).cumsum(0)
        plain = [i for i, r in enumerate(requests) if not drafts[r.request_id]]
        spec = [i for i, r in enumerate(requests) if drafts[r.request_id]]
        sampled, logprobs = {}, {}
        if plain:
            last = ends[plain] - 1
            out = self.sampler(logits[last], [requests[i] for i in plain], raw_logits=raw[last])
            for i, token, lp in zip(plain, out.token_ids, out.logprobs):
                sampled[requests[i].request_id] = [token]
                if lp is not None:
                    logprobs[requests[i].request_id] = lp
        rows = torch.cat([torch.arange(ends[i] - counts[i], ends[i]) for i in spec])
        spec_requests = [requests[i] for i in spec]
        verified = self.sampler.verify(
            logits[rows], spec_requests, [drafts[r.request_id] for r in spec_requests]
        )
        sampled.update((r.request_id, t) for r, t in zip(spec_requests, verified))
        # One logits row per request, its last, in `sampled`'s order.
        return RunnerOutput(sampled, logprobs, raw[ends[plain + spec] - 1])

    def _prepare(self, sched: SchedulerOutput, pad_to: int | None = None):
        """Pack the step's tokens. With `pad_to` (decode-rows steps only), the short way, padded
        to that many rows for a graph (see `DecodeGraphs`); then `meta.seq_lens` is the real
        rows' only. Either way a request verifying d drafts is d + 1 one-token rows, each with
        its own context length (`engine.decode_graphs`), so attention treats them as decodes."""
        if pad_to is not None:
            return self._prepare_decodes(sched, pad_to)
        tokens: list[int] = []
        # Units: what attention sees as one sequence, a prefill chunk or a one-token row.
        unit_starts, unit_lens, unit_seq = [], [], []
        sample_rows, sample_requests = [], []
        for i, s in enumerate(sched.scheduled):
            req = s.request
            start = req.num_computed_tokens
            # With drafts, the slice yields the one real token and the drafts follow it.
            tokens.extend(req.all_token_ids[start : start + s.num_tokens])
            tokens.extend(s.spec_token_ids)
            if s.spec_token_ids:  # one row per token
                unit_starts.extend(range(start, start + s.num_tokens))
                unit_lens.extend([1] * s.num_tokens)
                unit_seq.extend([i] * s.num_tokens)
            else:
                unit_starts.append(start)
                unit_lens.append(s.num_tokens)
                unit_seq.append(i)
            if s.samples:
                end = len(tokens)
                sample_rows.extend(range(end - 1 - len(s.spec_token_ids), end))
                sample_requests.append(req)
        query_start_loc = [0]
        for n in unit_lens:
            query_start_loc.append(query_start_loc[-1] + n)
        # NOTE: numpy, not torch: a handful of small tensor ops and a torch.tensor per sequence
        # cost ~1 ms of host time in a step of 64 sequences (cProfile, H100 host, 2026-11-27),
        # which a step admitting one prompt beside 63 decodes pays before its first kernel.
        max_blocks = max(len(s.block_ids) for s in sched.scheduled)
        seq_tables = np.zeros((len(sched.scheduled), max_blocks), dtype=np.int64)
        for i, s in enumerate(sched.scheduled):
            seq_tables[i, : len(s.block_ids)] = s.block_ids
        block_tables = seq_tables[unit_seq]
        # Position of every token, and which unit it belongs to, without a per-token loop.
        q_lens = np.asarray(unit_lens, dtype=np.int64)
        unit_of_token = np.repeat(np.arange(len(q_lens)), q_lens)
        first_token = np.asarray(query_start_loc[:-1], dtype=np.int64)
        offsets = np.arange(len(tokens), dtype=np.int64) - first_token[unit_of_token]
        positions = np.asarray(unit_starts, dtype=np.int64)[unit_of_token] + offsets
        blocks = block_tables[unit_of_token, positions // self.block_size]
        slot_mapping = blocks * self.block_size + positions % self.block_size
        input_ids = torch.tensor(tokens, dtype=torch.int64)
        positions, slot_mapping, block_tables = (
            torch.from_numpy(a) for a in (positions, slot_mapping, block_tables)
        )
        staged = self.stager.upload([input_ids, positions, slot_mapping, block_tables])
        meta = AttentionMetadata(
            slot_mapping=staged[2],
            query_start_loc=query_start_loc,
            seq_lens=[start + n for start, n in zip(unit_starts, unit_lens)],
            block_tables=staged[3],
            block_size=self.block_size,
        )
        return staged[0], staged[1], meta, sample_rows, sample_requests

    def _prepare_decodes(self, sched: SchedulerOutput, pad_to: int):
        """A decode-rows step (a graph replay, or eager): one row per decode, d + 1 per request
        verifying d drafts (`DecodeRows`), built as plain lists (a handful of tensor ops cost
        more at small batch) and moved in one copy. Rows past the real ones are padding
        (graphs only). Returns the real rows that sample (all of a verifying request's)."""
        rows = DecodeRows(self.block_size, self.backend)
        sample_rows, sample_requests = [], []
        for s in sched.scheduled:
            p = s.request.num_computed_tokens
            if s.prev_row is None:
                first = s.request.all_token_ids[p]
            else:  # chained: its input is the token in flight, in that row of the last step
                assert not s.spec_token_ids, "a chained step verifies no drafts"
                p, first = p + 1, s.prev_row
            start = rows.num_rows
            rows.add([first, *s.spec_token_ids], p, s.block_ids)
            if s.samples:
                sample_rows.extend(range(start, rows.num_rows))
                sample_requests.append(s.request)
        # The scratch block: past the scheduler's pool, padding rows write there (graphs only).
        flat = rows.flat(pad_to, self.num_blocks)
        staged = self.stager.upload([torch.tensor(flat)])[0]
        input_ids, positions, meta = rows.unpack(staged)
        return input_ids, positions, meta, sample_rows, sample_requests


class TokenReader:
    """A step's sampled token ids to the host: on CUDA one non-blocking copy into pinned memory
    and one wait on an event recorded after it (rather than a blocking copy to pageable memory).
    Two buffers, used in turn, so that a step's copy may be started before the previous step's
    tokens are read."""

    def __init__(self, device: torch.device, num_buffers: int = 2):
        self.device = device
        self.buffers: list[torch.Tensor | None] = [None] * num_buffers
        self.turn = 0

    def start(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Begin the copy of `tokens` (1-D int64, on the device); `finish` reads it."""
        if self.device.type != "cuda":
            return tokens, None
        n = tokens.numel()
        buf = self.buffers[self.turn]
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 256), dtype=torch.int64, pin_memory=True)
            self.buffers[self.turn] = buf
        self.turn = (self.turn + 1) % len(self.buffers)
        buf[:n].copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return buf[:n], done

    @staticmethod
    def finish(pending: tuple[torch.Tensor, torch.cuda.Event | None]) -> list[int]:
        host, done = pending
        if done is not None:
            done.synchronize()
        return host.tolist()

    def read(self, tokens: torch.Tensor) -> list[int]:
        return self.finish(self.start(tokens))


def _sink_backend(spec: AttentionSpec, cfg: ModelConfig, config: EngineConfig, use_triton: bool):
    from engine.attention.sink_backend import SinkAttentionBackend

    windows = [w for w in (cfg.layer_window(i) for i in range(cfg.num_layers)) if w is not None]
    if windows and config.sink_window > min(windows):
        raise ValueError(
            f"sink_window {config.sink_window} exceeds the model's sliding window {min(windows)}"
        )
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    if use_triton:  # decodes in a Triton kernel, in CUDA graphs; prefill chunks in PyTorch
        from engine.attention.triton_sink_backend import TritonSinkAttentionBackend

        return TritonSinkAttentionBackend(
            spec, inv_freq, config.attention_sinks, config.sink_window, config.block_size
        )
    return SinkAttentionBackend(spec, inv_freq, config.attention_sinks, config.sink_window)


def random_model(
    cfg: ModelConfig, backend, dtype: torch.dtype, device: torch.device, seed: int
) -> LlamaForCausalLM:
    """Benchmarks only (EngineConfig.extra["random_weights"]): the model with random weights
    drawn on the device, no checkpoint read. Linear weights normal(0, 0.02), norms 1, the output
    head scaled for logits of std ~4 like `engine.testing`'s checkpoints."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, backend)
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name == "lm_head.weight":
                param.normal_(0.0, 4.0 / math.sqrt(cfg.hidden_size), generator=gen)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    model.rotary.build(device)
    return model.eval().requires_grad_(False)
