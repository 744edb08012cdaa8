"""Prometheus metrics, named after Triton's nv_inference_* split: request (end to end per work item),
queue (waiting for a batch) and compute (the engine run). One registry per app, no globals."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from server.engines import POWERS_OF_TWO

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.http_requests = Counter("flowmap_http_requests", "HTTP requests by route and status code",
                                     ["route", "status"], registry=reg)
        self.http_duration = Histogram("flowmap_http_request_duration_seconds", "HTTP request latency by route",
                                       ["route"], buckets=LATENCY_BUCKETS, registry=reg)
        self.inflight = Gauge("flowmap_inflight_requests", "HTTP requests being handled", registry=reg)
        self.request_duration = Histogram("flowmap_inference_request_duration_seconds",
                                          "Per work item: enqueue to result", ["engine"],
                                          buckets=LATENCY_BUCKETS, registry=reg)
        self.queue_duration = Histogram("flowmap_inference_queue_duration_seconds",
                                        "Per work item: time waiting for its batch", ["engine"],
                                        buckets=LATENCY_BUCKETS, registry=reg)
        self.compute_duration = Histogram("flowmap_inference_compute_duration_seconds",
                                          "Per batch: engine run time", ["engine"],
                                          buckets=LATENCY_BUCKETS, registry=reg)
        self.batch_size = Histogram("flowmap_inference_batch_size", "Rows per executed batch (before padding)",
                                    ["engine"], buckets=POWERS_OF_TWO, registry=reg)
        self.inference_count = Counter("flowmap_inference_count", "Rows computed", ["engine"], registry=reg)
        self.padded_rows = Counter("flowmap_inference_padded_rows", "Rows of padding run to fill a batch up to the "
                                   "engine's bucket (GPU backends): computed and thrown away", ["engine"], registry=reg)
        self.exec_count = Counter("flowmap_inference_exec_count", "Batches executed", ["engine"], registry=reg)
        self.queue_depth = Gauge("flowmap_inference_queue_depth_rows", "Rows waiting", ["engine"], registry=reg)
        self.engine_errors = Counter("flowmap_inference_engine_errors", "Batches that raised", ["engine"],
                                     registry=reg)
        self.rejected = Counter("flowmap_inference_rejected", "Work refused or dropped", ["reason"], registry=reg)
        self.images = Counter("flowmap_images_generated", "Images returned", ["model"], registry=reg)
        self.images_encoded = Counter("flowmap_images_encoded", "Images encoded (png, jpeg or webp) by encoder: "
                                      "nvjpeg on the GPU, or cpu", ["encoder"], registry=reg)
        self.encode_seconds = Counter("flowmap_encode_seconds", "Encoding's time summed over requests, by step: "
                                      "wait (for an encode thread), copy (the images to 8-bit pixels on the host, "
                                      "which the torch backend's decoder makes per batch), encode (pixels to bytes)",
                                      ["step"], registry=reg)
        self.loop_lag = Histogram("flowmap_event_loop_lag_seconds", "How much later than asked the event loop woke "
                                  "from a short sleep: its own work, or other threads holding the GIL, delay every "
                                  "request's every step by as much", buckets=LATENCY_BUCKETS, registry=reg)
        self.encode_threads = Gauge("flowmap_encode_threads", "Threads that encode images", registry=reg)
        self.switch_interval = Gauge("flowmap_gil_switch_interval_seconds", "How long a Python thread may keep the "
                                     "GIL from one that waits for it, as the server runs", registry=reg)
        self.nfe = Counter("flowmap_nfe", "Network function evaluations (rows x steps) by request stage", ["stage"],
                           registry=reg)
        self.stage_duration = Histogram("flowmap_stage_duration_seconds", "Per request stage (noise, student, "
                                        "teacher, verifier, encode, ...): its time within one request", ["stage"],
                                        buckets=LATENCY_BUCKETS, registry=reg)
        self.search_candidates = Counter("flowmap_search_candidates", "Best-of-N candidates scored", registry=reg)
        self.prompt_cache = Counter("flowmap_prompt_cache_lookups", "Text bundles: prompt condition cache lookups "
                                    "by result (hit, miss)", ["result"], registry=reg)
        self.prompt_cache_hit_ratio = Gauge("flowmap_prompt_cache_hit_ratio", "Text bundles: hits over lookups of "
                                            "the prompt condition cache since start", registry=reg)
        self.prompt_cache_bytes = Gauge("flowmap_prompt_cache_bytes", "Text bundles: bytes of conditions the "
                                        "prompt cache holds (bounded by --prompt-cache-mb)", registry=reg)

    def engine(self, name: str) -> EngineMetrics:
        """The per-engine series, bound to their label once (a label lookup per row costs more than the row)."""
        return EngineMetrics(*(metric.labels(engine=name) for metric in (
            self.request_duration, self.queue_duration, self.compute_duration, self.batch_size,
            self.inference_count, self.padded_rows, self.exec_count, self.queue_depth, self.engine_errors)))

    def watch_admission(self, loads: dict) -> None:
        """Admitted and waiting rows per engine, read from admission's `loads` when /metrics is scraped."""
        self.registry.register(AdmissionCollector(loads))


@dataclass(frozen=True)
class EngineMetrics:
    request_duration: Histogram
    queue_duration: Histogram
    compute_duration: Histogram
    batch_size: Histogram
    inference_count: Counter
    padded_rows: Counter
    exec_count: Counter
    queue_depth: Gauge
    engine_errors: Counter

    def observe_batch(self, batch, rows: int, padded: int, started: float, finished: float) -> None:
        self.compute_duration.observe(finished - started)
        self.batch_size.observe(rows)
        self.inference_count.inc(rows)
        self.padded_rows.inc(padded - rows)
        self.exec_count.inc()
        for item in batch:
            self.queue_duration.observe(started - item.enqueued)
            self.request_duration.observe(finished - item.enqueued)


async def watch_loop_lag(lag: Histogram, period_s: float = 0.02) -> None:
    """Sleep `period_s` again and again, observing into `lag` how late each wake-up came (until cancelled)."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time() + period_s
        await asyncio.sleep(period_s)
        lag.observe(max(0.0, loop.time() - asked))


class AdmissionCollector:
    """Gauges computed at scrape time from admission's state, so requests pay nothing for them."""

    def __init__(self, loads: dict):
        self.loads = loads

    def collect(self):
        admitted = GaugeMetricFamily("flowmap_admitted_rows", "Rows of admitted requests, per engine (bounded by "
                                     "max_queue_size), and their images held on the host (engine=images, bounded "
                                     "by max_images_mb)", labels=["engine"])
        waiting = GaugeMetricFamily("flowmap_admission_waiting_rows", "Rows of requests waiting at the door for "
                                    "room, per engine", labels=["engine"])
        for name, load in self.loads.items():
            admitted.add_metric([name], load.rows)
            waiting.add_metric([name], load.waiting)
        yield admitted
        yield waiting
