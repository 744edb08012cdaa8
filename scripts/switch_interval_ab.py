"""What the GIL switch interval does to a server on this machine: the bundle served at each interval in turn
(alternating, `--rounds` times, so the machine's drift falls on both), the same load against each, and per run
images/s, p50, the encode stage's ms per request by step and the event loop's mean lateness.

    python scripts/switch_interval_ab.py    # digits, 8x8 PNG: the event loop is the busy thread
    python scripts/switch_interval_ab.py --bundle models/shapes --size 256x256 --format jpeg   # 256 px JPEG, in threads

The figures behind server/settings.py's 0.5 ms default on a CPU too: served here, neither interval came out ahead.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowmap.bench_serve import ServerProcess  # noqa: E402
from flowmap.gpu_served import served_use  # noqa: E402
from flowmap.loadgen import run_load  # noqa: E402


def bodies(bundle: str, size: str | None, output_format: str) -> tuple[str, list[dict]]:
    """(route, request bodies): class labels for a class bundle, prompts for a text one, one image each."""
    from export.bundle import read_bundle

    manifest = read_bundle(bundle, verify=False).manifest
    extra = {"output_format": output_format} | ({"size": size} if size else {})
    if manifest.classes:
        return "/v1/generate", [{"labels": [i % len(manifest.classes)], "seeds": [i], **extra} for i in range(64)]
    return "/v1/images/generations", [{"prompt": f"picture number {i}", "n": 1, **extra} for i in range(64)]


def one_run(bundle: str, interval_ms: str, route: str, requests: list[dict], clients: int, seconds: float) -> str:
    server = ServerProcess(bundle, 8811, "--gil-switch-interval-ms", interval_ms, "--no-ui")
    try:
        asyncio.run(run_load("127.0.0.1", server.port, route, requests, clients, 2.0, 1))  # caches, connections
        before = server.metrics()
        result = asyncio.run(run_load("127.0.0.1", server.port, route, requests, clients, seconds, 1))
        after = server.metrics()
    finally:
        server.stop()
    summary = result.summary()
    use = served_use(before, after, seconds)  # the served GPU bench's reading of the same /metrics
    return (f"switch interval {interval_ms} ms: {result.images / result.seconds:.1f} images/s, p50 "
            f"{summary['p50_ms']} ms, errors {result.errors}, encode ms per request {use['encode_ms_per_request']}, "
            f"loop lag {use['loop_lag_ms']} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="models/digits")
    parser.add_argument("--size", default=None, help="e.g. 256x256 (a whole multiple of the bundle's side)")
    parser.add_argument("--format", default="png", choices=("png", "jpeg", "webp"))
    parser.add_argument("--intervals-ms", nargs="+", default=["5", "0.5"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    route, requests = bodies(args.bundle, args.size, args.format)
    for _ in range(args.rounds):
        for interval in args.intervals_ms:
            print(one_run(args.bundle, interval, route, requests, args.clients, args.seconds), flush=True)


if __name__ == "__main__":
    main()
