"""Sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE) and the checkpoint names it loads from.

Routing, as both HF implementations do it: softmax over all experts' logits in float32, keep the
top k, and (Mixtral always, Qwen2-MoE when `norm_topk_prob`) renormalise those k to sum to 1.
Qwen2-MoE adds a shared expert that every token goes through, scaled by sigmoid(gate(x)).

Experts are stored fused, one 3-D parameter per projection (the layout transformers 5 uses in
memory):

    experts.gate_up_proj  [num_experts, 2 * moe_intermediate, hidden]   rows: gate | up
    experts.down_proj     [num_experts, hidden, moe_intermediate]

The forward pass sorts the (token, expert) assignments by expert and runs one pair of matmuls per
expert that received tokens, so an expert no token chose costs nothing.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size)
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    # The per-expert products the block runs (quantization.linear.QuantExperts has the same).
    def gate_up(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.gate_up_proj[expert])

    def down(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.down_proj[expert])


class Router(nn.Module):
    """`gate.weight` [num_experts, hidden] in the checkpoint."""

    def __init__(self, num_experts: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, dense_mlp_cls):
        super().__init__()
        self.top_k, self.num_experts = cfg.num_experts_per_tok, cfg.num_experts
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate = Router(cfg.num_experts, cfg.hidden_size)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = dense_mlp_cls(cfg, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None
        self._ops = None

    def fuse(self, ops) -> None:
        """CUDA: SiLU-and-mul as one kernel (the expert weights are already fused)."""
        self._ops = ops
        if self.shared_expert is not None:
            self.shared_expert.fuse(ops)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, hidden] -> (weights [T, k] float32, expert ids [T, k])."""
        probs = F.linear(x, self.gate.weight).float().softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        # Assignments (token, slot) flattened as token * k + slot, then sorted by expert:
        #   order  | e0 e0 e0 | e2 | e3 e3 |      (experts nobody chose have no run at all)
        flat_experts = experts.reshape(-1)
        order = flat_experts.argsort(stable=True)
        token_of = order // self.top_k
        # NOTE: one host sync per layer for the run lengths; CUDA graphs are off for MoE models.
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        rows = x[token_of]
        out_rows = torch.empty_like(rows)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            gate_up = self.experts.gate_up(e, rows[start : start + n])
            out_rows[start : start + n] = self.experts.down(e, self._silu_mul(gate_up))
            start += n
        weighted = out_rows.float() * weights.reshape(-1)[order, None]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        out.index_add_(0, token_of, weighted)
        out = out.to(x.dtype)
        if self.shared_expert is not None:
            gate = torch.sigmoid(self.shared_expert_gate(x))
            out = out + gate * self.shared_expert(x)
        return out

    def _silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self._ops is not None:
            return self._ops.silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


# Checkpoint names -> (our parameter, which part of it). Real Hub checkpoints (and what
# transformers 5's save_pretrained writes) keep one matrix per expert: Mixtral under
# `block_sparse_moe` as w1 (gate), w3 (up), w2 (down); Qwen2-MoE as gate_proj / up_proj /
# down_proj. Fused checkpoints name `mlp.experts.gate_up_proj` / `down_proj` directly.
_PER_EXPERT = re.compile(
    r"(.*\.mlp\.experts)\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_GATE, _UP = ("w1", "gate_proj"), ("w3", "up_proj")


def checkpoint_target(name: str, intermediate_size: int) -> tuple[str, tuple]:
    """Map a checkpoint tensor name to (parameter name, index of the part it fills); the index is
    () when the tensor is the whole parameter. Names that are not MoE expert weights map to
    themselves."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    match = _PER_EXPERT.match(name)
    if match is None:
        return name, ()
    prefix, expert, proj = match.group(1), int(match.group(2)), match.group(3)
    if proj in _GATE:
        return f"{prefix}.gate_up_proj", (expert, slice(0, intermediate_size))
    if proj in _UP:
        return f"{prefix}.gate_up_proj", (expert, slice(intermediate_size, 2 * intermediate_size))
    return f"{prefix}.down_proj", (expert,)
