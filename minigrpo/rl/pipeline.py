"""One-step-off-policy rollouts: generation of the next step's batch runs while this step trains.

    rollout.max_staleness = 0   generate -> train -> sync, every batch from the current weights
    rollout.max_staleness >= 1  step t trains on a batch generated while step t - 1 trained, from the
                                weights of one version before; the batch of step t + 1 is being
                                generated meanwhile

The engine samples from one set of weights at a time, so a new version is pushed only once the
generation in flight has finished (`wait`); that bounds the pipeline to one batch ahead: no batch is
ever more than one version behind the weights it is trained with, whatever k >= 1 says. Batches are
drawn in step order and seeded by step (derive_seed), as in synchronous runs. The time the step
waits for an unfinished batch (`waited`) and the generation time that ran alongside training
(`overlap`) are measured per step.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

Batch = TypeVar("Batch")


@dataclass(slots=True)
class Ready(Generic[Batch]):
    batch: Batch
    step: int  # the step it was generated for
    version: int  # weight version it was generated from
    current: int  # weight version when it was taken for training (staleness = current - version)
    seconds: float  # generation wall time
    waited: float  # how long `take` blocked for it (0 when it was ready)


class RolloutPipeline(Generic[Batch]):
    """`take(step, version)` returns the batch of `step`: generated now (staleness 0, or nothing
    prefetched) or the one prefetched during the previous step. `prefetch(step, version)` starts the
    next one in a background thread; `wait()` blocks until it is done (call before pushing weights)."""

    def __init__(self, generate: Callable[[int], Batch], max_staleness: int):
        self.generate, self.max_staleness = generate, max_staleness
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout") if max_staleness else None
        self.pending: tuple[int, int, Future] | None = None  # (step, version, future of (batch, seconds))

    def _timed(self, step: int) -> tuple[Batch, float]:
        t0 = time.perf_counter()
        batch = self.generate(step)
        return batch, time.perf_counter() - t0

    def take(self, step: int, version: int) -> Ready[Batch]:
        if self.pending is not None and self.pending[0] == step:
            _, made_from, future = self.pending
            self.pending = None
            t0 = time.perf_counter()
            batch, seconds = future.result()  # re-raises the generation's error here, in the step
            return Ready(batch, step, made_from, version, seconds, time.perf_counter() - t0)
        self.discard()
        batch, seconds = self._timed(step)
        return Ready(batch, step, version, version, seconds, 0.0)

    def prefetch(self, step: int, version: int) -> None:
        if self.pool is None:
            return
        self.discard()
        self.pending = (step, version, self.pool.submit(self._timed, step))

    def wait(self) -> float:
        """Block until the batch in flight is generated (before the engine's weights change); seconds waited."""
        if self.pending is None:
            return 0.0
        t0 = time.perf_counter()
        self.pending[2].exception()  # waits; an error surfaces at take()
        return time.perf_counter() - t0

    def discard(self) -> None:
        """Drop a prefetched batch that will not be used (e.g. the run ends or resumes elsewhere)."""
        if self.pending is not None:
            self.pending[2].exception()
            self.pending = None

    def close(self) -> None:
        self.discard()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
