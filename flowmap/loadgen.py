"""A lean closed-loop HTTP/1.1 load generator on asyncio streams (keep-alive, one connection per
client). It shares the machine with the server, so it must cost as little CPU per request as possible:
no HTTP library, pre-encoded requests, bodies read by Content-Length and not parsed."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class LoadResult:
    clients: int
    seconds: float
    requests: int
    images: int
    errors: int
    latencies_s: list[float] = field(repr=False)
    statuses: dict[int, int] = field(default_factory=dict)
    client_cpu_s: float = 0.0
    ok_latencies_s: list[float] = field(default_factory=list, repr=False)
    refusals_without_retry_after: int = 0

    def summary(self) -> dict:
        lat = np.asarray(self.latencies_s) if self.latencies_s else np.zeros(1)
        ok = np.asarray(self.ok_latencies_s) if self.ok_latencies_s else np.zeros(1)
        return {
            "clients": self.clients, "seconds": round(self.seconds, 3), "requests": self.requests,
            "images": self.images, "errors": self.errors, "statuses": self.statuses,
            "requests_per_s": round(self.requests / self.seconds, 2),
            "images_per_s": round(self.images / self.seconds, 2),
            "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 3),
            "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 3),
            "ok_p99_ms": round(float(np.percentile(ok, 99)) * 1000, 3),
            "ok_max_ms": round(float(ok.max()) * 1000, 3),
            "refusals_without_retry_after": self.refusals_without_retry_after,
            "loadgen_cpu_share": round(self.client_cpu_s / self.seconds, 3),
        }


def encode_post(host: str, port: int, path: str, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: keep-alive\r\n\r\n").encode()
    return head + payload


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    request: bytes) -> tuple[int, float | None]:
    """(status, the server's retry hint in seconds or None) for one request on a kept-alive connection."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, retry_after = 0, None
    for line in head.split(b"\r\n"):
        name = line[:16].lower()
        if name.startswith(b"content-length:"):
            length = int(line[15:])
        elif name.startswith(b"retry-after-ms:"):
            retry_after = int(line[15:]) / 1000
        elif name.startswith(b"retry-after:") and retry_after is None:
            retry_after = float(line[12:])
    await reader.readexactly(length)
    return status, retry_after


async def run_load(host: str, port: int, path: str, bodies: list[dict], clients: int, seconds: float,
                   images_per_request: int, warmup_s: float = 0.5, honour_retry_after: bool = False,
                   disjoint: bool = False) -> LoadResult:
    """`clients` connections each send requests back to back for `seconds` (after a warm-up);
    client i cycles through `bodies` starting at i (with `disjoint`, client i sends bodies i,
    i + clients, ..., so no two clients send the same body until the list wraps). With
    `honour_retry_after`, a client that is refused waits as the server asks (`retry-after-ms`, else
    `Retry-After`), as OpenAI's client does."""
    requests = [encode_post(host, port, path, body) for body in bodies]
    latencies: list[float] = []
    ok_latencies: list[float] = []
    statuses: dict[int, int] = {}
    measuring = {"on": False, "stop": False, "no_hint": 0, "ends": time.perf_counter() + warmup_s + seconds}

    async def client(index: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        turn = index
        try:
            while not measuring["stop"]:
                request = requests[turn % len(requests)]
                turn += clients if disjoint else 1
                started = time.perf_counter()
                status, retry_after = await _exchange(reader, writer, request)
                if measuring["on"]:
                    latencies.append(time.perf_counter() - started)
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        ok_latencies.append(latencies[-1])
                    elif status in (429, 503) and retry_after is None:
                        measuring["no_hint"] += 1
                if honour_retry_after and retry_after and status != 200:  # (never past the end of the run)
                    await asyncio.sleep(min(retry_after, max(0.0, measuring["ends"] - time.perf_counter())))
        finally:
            writer.close()

    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    await asyncio.sleep(warmup_s)
    cpu_start, started = os.times(), time.perf_counter()
    measuring["on"] = True
    await asyncio.sleep(seconds)
    measuring["on"] = False
    elapsed, cpu_end = time.perf_counter() - started, os.times()
    measuring["stop"] = True
    await asyncio.gather(*tasks, return_exceptions=True)
    ok = statuses.get(200, 0)
    cpu = (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system)
    return LoadResult(clients, elapsed, sum(statuses.values()), ok * images_per_request,
                      sum(v for k, v in statuses.items() if k != 200), latencies, statuses, cpu, ok_latencies,
                      measuring["no_hint"])
