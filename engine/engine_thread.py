"""Runs an `LLMEngine` step loop on a thread of its own; other threads hand it calls to run
between steps. This is how a worker process serves RPCs while its engine keeps stepping:
engine state is only ever touched from the loop thread, so it needs no locks."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from engine.engine import LLMEngine, RequestOutput

log = logging.getLogger(__name__)

# How often the loop wakes up while it has nothing to step but `poll` may find work (transfers).
_POLL_INTERVAL_S = 0.001


class EngineThread:
    def __init__(
        self,
        engine: LLMEngine,
        on_outputs: Callable[[list[RequestOutput]], None],
        poll: Callable[[LLMEngine], bool] | None = None,
    ):
        """`on_outputs` gets each step's outputs (on the loop thread). `poll`, if given, runs on
        the loop thread before every step and returns whether it still waits for something
        (then the idle loop wakes every millisecond instead of sleeping until a call comes)."""
        self.engine = engine
        self._on_outputs = on_outputs
        self._poll = poll
        self._calls: queue.SimpleQueue[tuple[Callable, Future]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopped = False
        self.error: BaseException | None = None
        # When the loop last went round (monotonic s): it does at least once a second, so an
        # old beat means a step or a call hangs.
        self.last_beat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[LLMEngine], Any]) -> Future:
        """Run `fn(engine)` on the loop thread before its next step."""
        future: Future = Future()
        if self.error is not None:
            future.set_exception(RuntimeError(f"engine loop died: {self.error!r}"))
            return future
        self._calls.put((fn, future))
        self._wake.set()
        return future

    def wake(self) -> None:
        """Make an idle loop go round now (poll, step) instead of at its next tick. Any thread."""
        self._wake.set()

    def call(self, fn: Callable[[LLMEngine], Any], timeout: float | None = 60.0) -> Any:
        return self.submit(fn).result(timeout)

    def check_alive(self, max_stall_s: float | None = None) -> None:
        """Raise RuntimeError if the loop died, or if it has not gone round for `max_stall_s`.
        Called from other threads (a worker's health check)."""
        if self.error is not None or not self._thread.is_alive():
            raise RuntimeError(f"engine loop died: {self.error!r}")
        stalled = time.monotonic() - self.last_beat
        if max_stall_s is not None and stalled > max_stall_s:
            raise RuntimeError(f"engine loop stalled for {stalled:.1f} s")

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn(self.engine))
            except BaseException as e:  # the caller gets it; the loop goes on
                future.set_exception(e)

    def _run(self) -> None:
        try:
            while not self._stopped:
                self.last_beat = time.monotonic()
                self._wake.clear()
                self._run_calls()
                waiting = self._poll(self.engine) if self._poll else False
                if self.engine.has_schedulable_requests():
                    self._on_outputs(self.engine.step())
                    if not self.engine.last_step.num_seqs:  # blocked on reservations: no spin
                        self._wake.wait(_POLL_INTERVAL_S)
                else:
                    self._wake.wait(_POLL_INTERVAL_S if waiting else 1.0)
        except BaseException as e:
            log.exception("engine loop died")
            self.error = e
            self._run_calls_failing()

    def _run_calls_failing(self) -> None:
        while True:
            try:
                _, future = self._calls.get_nowait()
            except queue.Empty:
                return
            future.set_exception(RuntimeError(f"engine loop died: {self.error!r}"))


class EngineHost:
    """What a worker process hosting an engine answers, whatever its role: the health check,
    timings and metrics for the router, fault injection, shutdown. A subclass sets
    `worker_id`, `loop` (an EngineThread), `metrics` (an EngineMetrics) and `agent` (its KV
    transfer agent, or None)."""

    def ping(self, max_stall_s: float | None = None) -> str:
        """The router's health check; raises if the engine loop died or stalled."""
        self.loop.check_alive(max_stall_s)
        return self.worker_id

    def debug_hang(self, seconds: float) -> None:
        """Fault injection for tests: the engine loop sleeps `seconds` (a hung step)."""
        self.loop.submit(lambda engine: time.sleep(seconds))

    def step_samples(self) -> list[tuple[str, int, int, float]]:
        """Step and transfer timings since the last call, for the router's latency models."""
        return self.metrics.take_samples()

    def metrics_text(self) -> bytes:
        """This worker's Prometheus metrics, in the text exposition format."""
        self.loop.call(self.metrics.update_gauges)
        return self.metrics.render()

    def shutdown(self) -> None:
        self.loop.stop()
        if self.agent is not None:
            self.agent.close()
