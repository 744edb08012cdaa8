"""What splitting batches at the engine's buckets buys (server/batcher.py, `--split-to-buckets`): the server's
DynamicBatcher over a real onnxruntime engine that pads to the batch buckets the GPU backends pad to (powers of
two), one-row requests arriving at random (Poisson) at several fractions of the engine's full-batch throughput,
served with the split and without it on the same arrivals, alternately. On a CPU a row costs about the same in any
batch, so padding is waste; where small batches cost about what one row does (a GPU's), the measured costs keep the
batcher from splitting. `flowmap bench stages --parts buckets` reports it."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from server.batcher import DynamicBatcher
from server.engines import POWERS_OF_TWO
from server.metrics import Metrics


def arrival_times(rate_per_s: float, seconds: float, seed: int) -> np.ndarray:
    """Seconds from the start at which requests arrive: a Poisson process of `rate_per_s` over `seconds`."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate_per_s, size=int(rate_per_s * seconds * 2) + 16)
    times = np.cumsum(gaps)
    return times[times < seconds]


def _counter(metrics: Metrics, name: str, engine: str) -> float:
    return metrics.registry.get_sample_value(name, {"engine": engine}) or 0.0


async def _warm(batcher: DynamicBatcher, feeds: dict) -> None:
    """Each bucket three times, as the server's warm-up runs them: the batcher's costs are then measured."""
    for size in batcher.engine.buckets:
        for _ in range(3):
            rows = {name: np.repeat(value, size, axis=0) for name, value in feeds.items()}
            await batcher.infer(rows, time.monotonic() + 600)


async def _serve(engine, feeds: dict, max_batch: int, delay_ms: float, split: bool, arrivals: np.ndarray) -> dict:
    metrics = Metrics()
    batcher = DynamicBatcher(engine, max_batch, delay_ms, metrics, split)
    batcher.start()
    await _warm(batcher, feeds)
    names = ("flowmap_inference_count_total", "flowmap_inference_padded_rows_total",
             "flowmap_inference_exec_count_total", "flowmap_inference_compute_duration_seconds_sum")
    before = {name: _counter(metrics, name, engine.name) for name in names}
    latencies, loop = [], asyncio.get_running_loop()
    start = loop.time()

    async def request(at: float) -> None:
        await asyncio.sleep(max(0.0, start + at - loop.time()))
        sent = loop.time()
        await batcher.infer(feeds, time.monotonic() + 600)
        latencies.append(loop.time() - sent)

    await asyncio.gather(*(request(at) for at in arrivals))
    wall = loop.time() - start
    spent = {name: _counter(metrics, name, engine.name) - before[name] for name in names}
    await batcher.stop()
    return {"latencies": latencies, "wall_s": wall, "rows": spent[names[0]], "padded": spent[names[1]],
            "batches": spent[names[2]], "compute_s": spent[names[3]]}


def bucket_rows(engine, feeds: dict, loads: tuple[float, ...], seconds: float, rounds: int = 2,
                delay_ms: float = 2.0) -> list[dict]:
    """Per load (a fraction of the engine's full-batch rows per second) and policy (split or pad), over `rounds`
    alternating runs of the same arrivals: images/s, latency mean/p50/p90, rows a batch, padding rows per row and
    how busy the engine was. `engine` pads to its `buckets`; `feeds` are one row's inputs."""
    max_batch = max(engine.buckets)

    async def full_batch_s() -> float:
        batcher = DynamicBatcher(engine, max_batch, delay_ms)
        batcher.start()
        await _warm(batcher, feeds)
        await batcher.stop()
        return batcher.cost.seconds(max_batch)

    capacity = max_batch / asyncio.run(full_batch_s())
    rows = []
    for number, load in enumerate(loads):
        arrivals = arrival_times(load * capacity, seconds, seed=number)
        runs = {False: [], True: []}
        for _ in range(rounds):
            for split in (False, True):
                runs[split].append(asyncio.run(_serve(engine, feeds, max_batch, delay_ms, split, arrivals)))
        for split, done in runs.items():
            latencies = 1000 * np.asarray([ms for run in done for ms in run["latencies"]])
            total = {key: sum(run[key] for run in done) for key in ("wall_s", "rows", "padded", "batches",
                                                                     "compute_s")}
            rows.append({"load": load, "offered_per_s": round(load * capacity, 1), "split": split,
                         "requests": len(latencies), "rows": int(total["rows"]),
                         "images_per_s": round(total["rows"] / total["wall_s"], 1),
                         "mean_ms": round(float(latencies.mean()), 2),
                         "p50_ms": round(float(np.percentile(latencies, 50)), 2),
                         "p90_ms": round(float(np.percentile(latencies, 90)), 2),
                         "rows_per_batch": round(total["rows"] / total["batches"], 2),
                         "padding_per_row": round(total["padded"] / total["rows"], 3),
                         "busy": round(total["compute_s"] / total["wall_s"], 3)})
    return rows


def bucketed_engine(bundle: str, max_batch: int):
    """The bundle's first student as an onnxruntime engine on one thread (the event loop keeps the other core),
    padding to the powers of two up to `max_batch` as the GPU providers' engines do; and one row's inputs."""
    from export.bundle import read_bundle
    from server.app import warm_feeds
    from server.engines import OnnxRuntimeEngine, student_engine

    read = read_bundle(bundle, verify=False)
    graph = read.students[0]
    engine = OnnxRuntimeEngine(graph.path, student_engine(graph.guidance_scale), intra_op_threads=1,
                               max_batch=max_batch)
    engine.buckets = tuple(size for size in POWERS_OF_TWO if size <= max_batch)
    feeds = warm_feeds(engine.name, 1, read)
    rng = np.random.default_rng(0)
    feeds["x"] = rng.standard_normal(feeds["x"].shape).astype(np.float32)
    return engine, feeds


def bucket_table(rows: list[dict]) -> list[str]:
    """The runs as markdown rows, each load's split beside its padding."""
    lines = ["| load | requests/s offered | batches | images/s | mean ms | p50 ms | p90 ms | rows a batch "
             "| padding rows a row | engine busy |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        policy = "split at buckets" if row["split"] else "padded"
        lines.append(f"| {row['load']:.0%} | {row['offered_per_s']} | {policy} | {row['images_per_s']} "
                     f"| {row['mean_ms']} | {row['p50_ms']} | {row['p90_ms']} | {row['rows_per_batch']} "
                     f"| {row['padding_per_row']} | {row['busy']:.0%} |")
    return lines
