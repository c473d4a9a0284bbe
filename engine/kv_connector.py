"""Hooks through which a worker moves KV out of the engine while it computes.

The engine knows nothing of the network: a prefill worker passes an implementation of this
interface (built on `kvtransfer`) to the engine, and the model runner calls it at fixed points
of every step. Implementations must not free or allocate blocks: the scheduler owns them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from engine.scheduler import SchedulerOutput


class KVConnector(ABC):
    @abstractmethod
    def on_step_start(self, sched: SchedulerOutput) -> bool:
        """Called by the model runner before the forward pass. Returns True if this step needs
        `on_layer_done` calls (some request's KV starts leaving in this step)."""

    @abstractmethod
    def on_layer_done(self, layer_idx: int) -> None:
        """Called inside the forward pass after layer `layer_idx` wrote its KV for every token of
        the step. Must not block: sends posted here overlap the remaining layers."""

    @abstractmethod
    def on_step_end(self, sched: SchedulerOutput) -> None:
        """Called after the forward pass and sampling, before the scheduler may free the blocks
        of requests that finished in this step: waits for their sends to complete."""
