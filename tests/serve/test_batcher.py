"""The batcher's scheduling, on a runner that records its calls: which jobs share a call, in what order, the
bounded queue, and aborting a batch whose clients all left. (The image equality of batched and lone requests is
tested on a real model in test_batching.py.)"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from t2i.serve.batcher import Aborted, Batcher, Job, QueueFull


class Recorder:
    """A runner that returns one (1, 1, 1) image per seed holding its seed, and records each call."""

    def __init__(self, steps: int = 1, step_s: float = 0.0):
        self.calls: list[tuple] = []
        self.steps, self.step_s = steps, step_s

    def __call__(self, key, prompts, seeds, progress):
        self.calls.append((key, list(prompts), list(seeds)))
        for i in range(self.steps):
            time.sleep(self.step_s)
            progress(i + 1, self.steps)
        return torch.tensor(seeds, dtype=torch.float32).view(-1, 1, 1, 1)


def run(coro):
    return asyncio.run(coro)


def test_window_gathers_same_key_jobs_in_order_and_splits_results():
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch=8, window_s=0.2)
        b.start()
        jobs = [b.submit(Job("A", "p0", [1, 2])), b.submit(Job("B", "q", [9])), b.submit(Job("A", "p1", [5]))]
        results = await asyncio.gather(*(j.future for j in jobs))
        await b.stop()
        return rec, results

    rec, results = run(main())
    # the oldest job's key goes first, with its later companion; the other key is next, not starved
    assert rec.calls == [("A", ["p0", "p0", "p1"], [1, 2, 5]), ("B", ["q"], [9])]
    assert [r.flatten().tolist() for r in results] == [[1.0, 2.0], [9.0], [5.0]]


def test_max_batch_and_batching_off():
    async def main(batching):
        rec = Recorder()
        b = Batcher(rec, max_batch=3, window_s=0.1, batching=batching)
        b.start()
        jobs = [b.submit(Job("A", f"p{k}", [k, 10 + k])) for k in range(3)]
        await asyncio.gather(*(j.future for j in jobs))
        await b.stop()
        return [len(c[2]) for c in rec.calls]

    assert run(main(True)) == [2, 2, 2]  # two 2-image jobs do not fit a batch of 3
    assert run(main(False)) == [2, 2, 2]
    with pytest.raises(ValueError, match="does not fit"):
        Batcher(Recorder(), max_batch=2).submit(Job("A", "p", [1, 2, 3]))


def test_full_queue_raises_with_a_retry_estimate():
    async def main():
        b = Batcher(Recorder(), max_batch=4, window_s=1.0, max_queue=3)
        b.start()
        first = b.submit(Job("A", "p", [1, 2]))
        with pytest.raises(QueueFull) as full:
            b.submit(Job("A", "p", [3, 4]))
        b.submit(Job("A", "p", [5]))  # still fits
        assert full.value.retry_after >= 1 and b.queued_images == 3
        await b.stop()
        return first

    run(main())


def test_cancelled_queued_job_is_never_sampled():
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch=8, window_s=0.2)
        b.start()
        gone, kept = b.submit(Job("A", "gone", [1], request_id="g")), b.submit(Job("A", "kept", [2]))
        b.cancel(gone)
        await kept.future
        await b.stop()
        return rec, b.progress("g")

    rec, progress = run(main())
    assert rec.calls == [("A", ["kept"], [2])]
    assert progress["state"] == "cancelled"


def test_batch_aborts_when_every_client_left_and_progress_is_reported():
    async def main():
        rec = Recorder(steps=50, step_s=0.02)
        b = Batcher(rec, max_batch=8, window_s=0.0)
        b.start()
        job = b.submit(Job("A", "p", [1], request_id="r"))
        while job.step < 2:
            await asyncio.sleep(0.001)
        seen = b.progress("r")
        b.cancel(job)
        with pytest.raises(Aborted):
            await job.future
        after = await asyncio.wait_for(b.submit(Job("A", "next", [3])).future, 5)  # the worker carries on
        await b.stop()
        return seen, job, after

    seen, job, after = run(main())
    assert seen["state"] == "running" and seen["total"] == 50 and seen["step"] >= 2
    assert job.step < 50  # stopped early
    assert after.flatten().tolist() == [3.0]


def test_runner_errors_go_to_the_batch_and_the_worker_survives():
    def broken(key, prompts, seeds, progress):
        if key == "bad":
            raise RuntimeError("out of memory")
        return torch.zeros(len(seeds), 1, 1, 1)

    async def main():
        b = Batcher(broken, window_s=0.0)
        b.start()
        bad = b.submit(Job("bad", "p", [1]))
        with pytest.raises(RuntimeError, match="out of memory"):
            await bad.future
        good = await b.submit(Job("good", "p", [1])).future
        await b.stop()
        return good

    assert run(main()).shape == (1, 1, 1, 1)
