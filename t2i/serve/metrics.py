"""Server metrics: what ``GET /metrics`` reports, as JSON or in Prometheus' text format.

Counters since start (requests by status, images served, 429s, timeouts, cancellations), the batch-size histogram
(images per sampling call: the evidence that dynamic batching happens), and latency percentiles of successful
generation requests over the last ``window`` of them (time from the request's arrival to its response body).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

import numpy as np

from t2i.serve.batcher import Batcher, BatchRecord


class Metrics:
    def __init__(self, window: int = 2000):
        self.started = time.time()
        self.status: Counter[int] = Counter()
        self.images_served = 0
        self.rejected_queue_full = 0
        self.timeouts = 0
        self.cancelled = 0
        self.batch_images: Counter[int] = Counter()
        self.batch_requests: Counter[int] = Counter()
        self.sampling_seconds = 0.0
        self.latencies: deque[float] = deque(maxlen=window)

    def on_batch(self, rec: BatchRecord) -> None:
        self.batch_images[rec.images] += 1
        self.batch_requests[rec.requests] += 1
        self.sampling_seconds += rec.seconds

    def on_response(self, status: int, *, images: int = 0, latency: float | None = None) -> None:
        self.status[status] += 1
        self.images_served += images
        if latency is not None:
            self.latencies.append(latency)

    def percentiles(self) -> dict[str, float | None]:
        if not self.latencies:
            return {"p50": None, "p95": None, "p99": None}
        q = np.percentile(np.asarray(self.latencies), [50, 95, 99])
        return {"p50": round(float(q[0]), 4), "p95": round(float(q[1]), 4), "p99": round(float(q[2]), 4)}

    def snapshot(self, batcher: Batcher) -> dict[str, Any]:
        calls = sum(self.batch_images.values())
        images = sum(k * v for k, v in self.batch_images.items())
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "queue": {
                "requests": batcher.queued_requests,
                "images": batcher.queued_images,
                "running_images": batcher.running_images,
                "capacity_images": batcher.max_queue,
            },
            "requests": {str(k): v for k, v in sorted(self.status.items())},
            "images_served": self.images_served,
            "rejected_queue_full": self.rejected_queue_full,
            "timeouts": self.timeouts,
            "cancelled": self.cancelled,
            "batches": {
                "calls": calls,
                "mean_images": round(images / calls, 3) if calls else None,
                "images_histogram": {str(k): v for k, v in sorted(self.batch_images.items())},
                "requests_histogram": {str(k): v for k, v in sorted(self.batch_requests.items())},
                "sampling_seconds": round(self.sampling_seconds, 3),
                "max_images": batcher.max_batch,
                "batching": batcher.batching,
            },
            "latency_s": {**self.percentiles(), "count": len(self.latencies)},
        }

    def prometheus(self, batcher: Batcher) -> str:
        """The same figures in Prometheus' text exposition format (``GET /metrics?format=prometheus``)."""
        lines = [
            "# TYPE t2i_queue_images gauge",
            f"t2i_queue_images {batcher.queued_images}",
            "# TYPE t2i_queue_requests gauge",
            f"t2i_queue_requests {batcher.queued_requests}",
            "# TYPE t2i_images_served_total counter",
            f"t2i_images_served_total {self.images_served}",
            "# TYPE t2i_requests_total counter",
            *(f't2i_requests_total{{status="{k}"}} {v}' for k, v in sorted(self.status.items())),
            "# TYPE t2i_rejected_queue_full_total counter",
            f"t2i_rejected_queue_full_total {self.rejected_queue_full}",
            "# TYPE t2i_batch_images_total counter",
            *(f't2i_batch_images_total{{images="{k}"}} {v}' for k, v in sorted(self.batch_images.items())),
            "# TYPE t2i_request_latency_seconds summary",
        ]
        for name, q in (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99")):
            v = self.percentiles()[name]
            if v is not None:
                lines.append(f't2i_request_latency_seconds{{quantile="{q}"}} {v}')
        lines.append(f"t2i_request_latency_seconds_count {len(self.latencies)}")
        return "\n".join(lines) + "\n"
