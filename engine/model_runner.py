"""Owns the model weights and the KV cache tensors; turns a SchedulerOutput into sampled tokens.

Inputs are built once per step with tensor ops (no per-token Python loops): the scheduled
requests' tokens are packed back to back, decodes first, exactly in the scheduler's order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.attention.backend import AttentionMetadata, AttentionSpec
from engine.attention.torch_backend import TorchAttentionBackend
from engine.config import EngineConfig, ModelConfig
from engine.kv_connector import KVConnector
from engine.loader import load_model
from engine.sampler import Sampler, SamplerOutput
from engine.scheduler import SchedulerOutput

log = logging.getLogger(__name__)

# With no `num_blocks` given on CPU, the KV cache takes this share of available RAM, capped.
_CPU_KV_FRACTION = 0.25
_CPU_KV_CAP_BYTES = 4 << 30


@dataclass
class RunnerOutput:
    # Request id → sampled token, only for requests whose chunk reached their last token.
    sampled: dict[str, int]
    logprobs: dict[str, tuple[float, list[tuple[int, float]]]]
    # The logits rows that were sampled from, in `sampled`'s order (kept for tests and debugging).
    logits: torch.Tensor | None = None


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, dtype: torch.dtype):
        self.config = config
        self.model_config = model_config
        self.device = config.resolve_device()
        self.dtype = dtype
        self.block_size = config.block_size
        spec = AttentionSpec(
            num_heads=model_config.num_heads,
            num_kv_heads=model_config.num_kv_heads,
            head_dim=model_config.head_dim,
            scale=model_config.head_dim**-0.5,
            sliding_window=model_config.sliding_window,
        )
        self.backend = TorchAttentionBackend(spec)
        self.model = load_model(config.model, model_config, self.backend, dtype, self.device)
        self.num_blocks = config.num_blocks or self._blocks_from_memory()
        shape = (
            2,
            self.num_blocks,
            self.block_size,
            model_config.num_kv_heads,
            model_config.head_dim,
        )
        self.kv_caches = [
            torch.zeros(shape, dtype=dtype, device=self.device)
            for _ in range(model_config.num_layers)
        ]
        self.sampler = Sampler(self.device, config.seed)
        # Set by a prefill worker: moves KV out while the forward pass runs.
        self.kv_connector: KVConnector | None = None

    @property
    def kv_bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.model_config.kv_elements_per_token * self.block_size * elem

    def _blocks_from_memory(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * self.config.kv_cache_memory_fraction)
        else:
            import os

            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            budget = min(int(available * _CPU_KV_FRACTION), _CPU_KV_CAP_BYTES)
        num_blocks = budget // self.kv_bytes_per_block
        if num_blocks < 1:
            raise RuntimeError("not enough memory left for a single KV block")
        log.info("KV cache: %d blocks of %d tokens", num_blocks, self.block_size)
        return num_blocks

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        input_ids, positions, meta, sample_rows, sample_requests = self._prepare(sched)
        self.backend.prepare(meta)
        connector = self.kv_connector
        layer_done = None
        if connector is not None and connector.on_step_start(sched):
            layer_done = connector.on_layer_done
        hidden = self.model(input_ids, positions, self.kv_caches, meta, layer_done)
        result = RunnerOutput({}, {})
        if sample_rows:
            logits = self.model.compute_logits(hidden[sample_rows])
            out: SamplerOutput = self.sampler(logits, sample_requests)
            ids = [r.request_id for r in sample_requests]
            logprobs = {rid: lp for rid, lp in zip(ids, out.logprobs) if lp is not None}
            result = RunnerOutput(dict(zip(ids, out.token_ids)), logprobs, logits)
        if connector is not None:
            connector.on_step_end(sched)
        return result

    def _prepare(self, sched: SchedulerOutput):
        tokens: list[int] = []
        query_start_loc = [0]
        seq_lens, starts, sample_rows, sample_requests = [], [], [], []
        for s in sched.scheduled:
            req = s.request
            start = req.num_computed_tokens
            tokens.extend(req.all_token_ids[start : start + s.num_tokens])
            query_start_loc.append(query_start_loc[-1] + s.num_tokens)
            seq_lens.append(start + s.num_tokens)
            starts.append(start)
            if s.samples:
                sample_rows.append(query_start_loc[-1] - 1)
                sample_requests.append(req)
        device = self.device
        max_blocks = max(len(s.block_ids) for s in sched.scheduled)
        block_tables = torch.zeros((len(sched.scheduled), max_blocks), dtype=torch.int64)
        for i, s in enumerate(sched.scheduled):
            block_tables[i, : len(s.block_ids)] = torch.tensor(s.block_ids, dtype=torch.int64)
        # Position of every token, and which sequence it belongs to, without a per-token loop.
        q_lens = torch.tensor([s.num_tokens for s in sched.scheduled])
        seq_of_token = torch.repeat_interleave(torch.arange(len(q_lens)), q_lens)
        offsets = torch.arange(int(q_lens.sum())) - torch.tensor(query_start_loc[:-1])[seq_of_token]
        positions = torch.tensor(starts)[seq_of_token] + offsets
        blocks = block_tables[seq_of_token, positions // self.block_size]
        slot_mapping = blocks * self.block_size + positions % self.block_size
        meta = AttentionMetadata(
            slot_mapping=slot_mapping.to(device),
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=block_tables.to(device),
            block_size=self.block_size,
        )
        input_ids = torch.tensor(tokens, dtype=torch.int64, device=device)
        return input_ids, positions.to(device), meta, sample_rows, sample_requests
