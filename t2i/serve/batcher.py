"""Dynamic batching: requests that share a model and settings run as one sampling call.

Every request becomes a ``Job`` (one prompt, ``n`` seeds). The worker takes the oldest job, waits up to
``window_s`` from that job's arrival for more jobs with the same ``key`` (model and every setting that changes the
sampling: steps, guidance, sampler, size, negative prompt), and runs them together, at most ``max_batch`` images.
Under load no waiting happens at all: while one batch samples, the next one queues up. Jobs with other keys keep
their place in the queue, so a lone odd request is served next, not starved.

Per-image seeds make a batched image the same as the image sampled alone (``Generator.generate`` draws every
image's noise from its own seed), so batching changes throughput, never results.

The model runs in one worker thread (CPU sampling releases the GIL inside torch), so the event loop stays free to
accept, validate and reject requests. The queue is bounded in images: ``submit`` raises ``QueueFull`` (answered 429
with ``Retry-After``) rather than letting latency grow without bound. A job whose client has gone away or whose
deadline passed is cancelled: dropped from the queue, or, if its batch is sampling and every job in that batch is
cancelled, the sampling is aborted at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

# runner(key, prompts, seeds, progress) -> images (B, 3, S, S): one sampling call, in the worker thread.
Runner = Callable[[Hashable, list[str], list[int], Callable[[int, int], None]], Tensor]


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class Aborted(Exception):
    """Raised from the progress callback to stop a batch whose every client has gone."""


@dataclass(eq=False)
class Job:
    key: Hashable
    prompt: str
    seeds: list[int]
    request_id: str | None = None
    future: asyncio.Future | None = None
    enqueued: float = field(default_factory=time.perf_counter)
    state: str = "queued"  # queued -> running -> done | failed | cancelled
    step: int = 0
    total: int = 0
    cancelled: bool = False

    @property
    def n(self) -> int:
        return len(self.seeds)


@dataclass
class BatchRecord:
    images: int
    requests: int
    seconds: float


class Batcher:
    """Collects jobs into batches and runs them with ``runner`` in one worker thread.

    Args:
        runner: samples one batch (see ``Runner``).
        max_batch: most images per sampling call.
        window_s: how long the oldest queued job waits for companions (0: never wait).
        max_queue: most images waiting (not counting the batch that is sampling); beyond it ``submit`` raises.
        batching: False runs every request alone (the baseline of ``benchmarks/serve_load.py``).
        on_batch: called with a ``BatchRecord`` after each sampling call (metrics).
    """

    def __init__(self, runner: Runner, *, max_batch: int = 16, window_s: float = 0.05, max_queue: int = 64,
                 batching: bool = True, on_batch: Callable[[BatchRecord], None] | None = None):  # fmt: skip
        if max_batch < 1 or max_queue < 1 or window_s < 0:
            raise ValueError("need max_batch >= 1, max_queue >= 1 and window_s >= 0")
        self.runner, self.max_batch, self.window_s, self.max_queue = runner, max_batch, window_s, max_queue
        self.batching, self.on_batch = batching, on_batch
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="t2i-model")  # the model's only thread
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []
        self._by_id: dict[str, Job] = {}
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._seconds_per_image: float | None = None  # running mean, for Retry-After

    # -- lifecycle (inside the server's event loop) -----------------------------------------------------------

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._work(), name="t2i-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in [*self._pending, *self._running]:
            job.cancelled = True
            if job.future is not None:
                job.future.cancel()  # the server is shutting down
        self._pending.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` in the model thread, in turn with the batches (model loading, warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- the queue --------------------------------------------------------------------------------------------

    @property
    def queued_images(self) -> int:
        return sum(j.n for j in self._pending)

    @property
    def queued_requests(self) -> int:
        return len(self._pending)

    @property
    def running_images(self) -> int:
        return sum(j.n for j in self._running)

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained enough to take a request (at least 1)."""
        per_image = self._seconds_per_image or 1.0
        return max(1, math.ceil(per_image * (self.queued_images + self.running_images)))

    def submit(self, job: Job) -> Job:
        if job.n > self.max_batch:
            raise ValueError(f"a job of {job.n} images does not fit a batch of {self.max_batch}")
        if self.queued_images + job.n > self.max_queue:
            raise QueueFull(self.retry_after())
        if self._arrived is None:
            raise RuntimeError("Batcher.start() has not run (the server's startup)")
        job.future = asyncio.get_running_loop().create_future()
        job.enqueued = time.perf_counter()
        self._pending.append(job)
        if job.request_id:
            self._by_id[job.request_id] = job
        self._arrived.set()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away or timed out: drop the job, or mark it so its batch can stop early."""
        job.cancelled = True
        if job.state == "queued":
            job.state = "cancelled"
            with contextlib.suppress(ValueError):
                self._pending.remove(job)
        self._forget(job)

    def progress(self, request_id: str) -> dict[str, Any] | None:
        job = self._by_id.get(request_id)
        if job is None:
            return None
        out: dict[str, Any] = {"state": job.state, "step": job.step, "total": job.total}
        if job.state == "queued":
            ahead = 0
            for other in self._pending:
                if other is job:
                    break
                ahead += other.n
            out["images_ahead"] = ahead + self.running_images
        return out

    def _forget(self, job: Job) -> None:
        # keep finished jobs' progress readable for a while (the page polls once more after the response)
        if job.request_id and len(self._by_id) > 4 * self.max_queue:
            for rid in [r for r, j in self._by_id.items() if j.state not in ("queued", "running")]:
                del self._by_id[rid]

    # -- the worker -------------------------------------------------------------------------------------------

    def _images_like(self, key: Hashable) -> int:
        return sum(j.n for j in self._pending if j.key == key)

    def _take(self) -> list[Job]:
        """The batch: the oldest job and, when batching, the next jobs with its key, up to ``max_batch`` images."""
        head = self._pending[0]
        batch, size = [head], head.n
        if self.batching:
            for job in list(self._pending)[1:]:
                if job.key == head.key and size + job.n <= self.max_batch:
                    batch.append(job)
                    size += job.n
        for job in batch:
            self._pending.remove(job)
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            head = self._pending[0]
            if self.batching and self.window_s > 0:
                deadline = head.enqueued + self.window_s
                while self._pending and self._pending[0] is head and self._images_like(head.key) < self.max_batch:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), left)
                    except TimeoutError:
                        break
                if not self._pending:
                    continue
            batch = self._take()
            self._running = batch
            for job in batch:
                job.state = "running"
            t0 = time.perf_counter()
            try:
                images = await loop.run_in_executor(self.executor, self._sample, batch)
            except BaseException as err:  # every failure goes to the batch's clients, never kills the worker
                for job in batch:
                    job.state = "cancelled" if isinstance(err, Aborted) else "failed"
                    if not job.future.done():
                        job.future.set_exception(err if isinstance(err, Exception) else RuntimeError(str(err)))
                if isinstance(err, asyncio.CancelledError):
                    raise
            else:
                seconds = time.perf_counter() - t0
                n_images = sum(j.n for j in batch)
                per = seconds / n_images
                self._seconds_per_image = per if self._seconds_per_image is None else (
                    0.8 * self._seconds_per_image + 0.2 * per
                )  # fmt: skip
                if self.on_batch is not None:
                    self.on_batch(BatchRecord(n_images, len(batch), seconds))
                start = 0
                for job in batch:
                    job.state = "done"
                    if not job.future.done():
                        job.future.set_result(images[start : start + job.n])
                    start += job.n
            finally:
                self._running = []
                for job in batch:
                    self._forget(job)

    def _sample(self, batch: list[Job]) -> Tensor:
        prompts = [j.prompt for j in batch for _ in j.seeds]
        seeds = [s for j in batch for s in j.seeds]

        def progress(done: int, total: int) -> None:
            for job in batch:
                job.step, job.total = done, total
            if all(j.cancelled for j in batch):
                raise Aborted("every client of this batch has gone")

        if all(j.cancelled for j in batch):
            raise Aborted("every client of this batch has gone")
        return self.runner(batch[0].key, prompts, seeds, progress)
