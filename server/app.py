"""The FastAPI app: bundle -> engines -> batchers -> admission -> routes (planning each request's
stages), behind the request metrics, the door and the fast path, with a warm-up before /health/ready turns true."""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from export.bundle import read_bundle
from server.admission import Admission, Overloaded, RequestTooLarge
from server.batcher import DeadlineExceeded, DynamicBatcher, EngineFailure
from server.door import Door
from server.encoding import Encoder
from server.engines import batch_size, build_engines
from server.errors import error_for
from server.fast_path import FastPath
from server.http_metrics import HttpMetrics
from server.keys import DEMO_PATH
from server.metrics import Metrics, watch_loop_lag
from server.prompts import PromptEncoder
from server.routes import router
from server.service import ApiError, ClientDisconnected, Service
from server.settings import Settings

log = logging.getLogger("flowmap.serve")


WARM_CALL_S = 600  # the longest one warm-up call may take


def warm_feeds(engine: str, rows: int, bundle, prompts=None) -> dict[str, np.ndarray]:
    """Inputs of the right signature for one engine: zeros, mid-trajectory times, label 0 (or an empty
    prompt's tokens and a zero text condition)."""
    sample = np.zeros((rows, *bundle.sample_shape), np.float32)
    half = np.full(rows, 0.5, np.float32)
    label = np.zeros((rows, *bundle.text.shape), np.float32) if bundle.text else np.zeros(rows, np.int64)
    if engine == "text_encoder":
        return prompts.tokenize([""] * rows).feeds
    if engine == "verifier":
        image = {"image": np.zeros((rows, *bundle.image_shape), np.float32)}
        return {**image, "ids": prompts.scorer_ids([""] * rows)} if prompts is not None else image
    if engine == "decoder":
        return {"latent": sample}
    if engine == "teacher":
        negative = {"negative": label} if bundle.teacher_takes_negative else {}
        return {"x": sample, "t": half, "label": label, **negative}
    return {"x": sample, "t": half, "s": half * 0, "label": label}


async def warm_up(service: Service) -> None:
    """Run every engine at batch 1, at each of its batch buckets and at its largest batch, up to three times:
    the first passes pay for one-time allocations, the last measures what admission's first estimates and the
    batcher's bucket splits start from (an engine whose largest batch takes seconds, a VAE decoder on a CPU, is
    not repeated). Then time one image of each output format, for admission's first encoding estimates, and turn
    ready."""
    for name, batcher in service.batchers.items():
        sizes = sorted({1, *(b for b in batcher.engine.buckets if b <= batcher.max_batch_size),
                        batcher.max_batch_size})
        for _pass in range(3):
            batcher.cost.reset()
            for rows in sizes:
                tick = time.perf_counter()
                # each call its own deadline: a real-size bundle on a CPU may take many minutes to warm in all
                far = time.monotonic() + WARM_CALL_S
                await batcher.infer(warm_feeds(name, rows, service.bundle, service.prompts), far)
            if time.perf_counter() - tick > 2.0:
                break
    await asyncio.to_thread(service.encoder.warm_up, service.bundle.image_shape)
    service.ready = True
    log.info("warm: every engine ran at batch 1, its buckets and its largest batch, and each image format was "
             "encoded once; ready")


async def warm_up_or_stop(service: Service, stop) -> None:
    """A warm-up that fails (an engine that cannot run, a setting it cannot meet) is logged and stops
    the server with a non-zero exit (`stop`), instead of leaving it unready and silent."""
    try:
        await warm_up(service)
    except asyncio.CancelledError:
        raise
    except Exception as err:  # noqa: BLE001 (any failure here is fatal, and reported)
        service.failure = f"warm-up failed: {type(err).__name__}: {err}"
        log.error("%s; stopping", service.failure, exc_info=err)
        stop()


def host_bytes_per_image(bundle) -> int:
    """What one image of a request holds on the host: the float32 image, and its noise and latent (the sample)."""
    return 4 * (math.prod(bundle.image_shape) + 2 * math.prod(bundle.sample_shape))


def create_app(settings: Settings | None = None, mount_ui: bool | None = None, remote_engines=None) -> FastAPI:
    """Build the app. The bundle is read (and every sha256 checked) here, so a tampered bundle stops
    the server before it listens. `remote_engines` (name -> engine) run some graphs elsewhere: under
    Ray Serve the decoder is a deployment of its own."""
    settings = settings or Settings()
    bundle = read_bundle(settings.bundle, verify=settings.verify_bundle)
    service = Service(settings, bundle, Metrics())
    if bundle.text is not None:
        service.prompts = PromptEncoder(bundle.text, settings.prompt_cache_size, service.metrics,
                                        round(settings.prompt_cache_mb * 2**20))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engines = build_engines(bundle, settings, remote_engines() if remote_engines else None)
        service.batchers = {name: DynamicBatcher(engine, batch_size(name, settings, engine),
                                                 settings.max_queue_delay_ms, service.metrics,
                                                 settings.split_to_buckets)
                            for name, engine in engines.items()}
        encode_threads = settings.encode_threads()
        service.admission = Admission.for_batchers(service.batchers, settings, service.metrics, encode_threads,
                                                   host_bytes_per_image(bundle))
        on_gpu = settings.backend == "torch" and settings.device.startswith("cuda")
        service.metrics.encode_threads.set(encode_threads)
        service.encoder = Encoder(encode_threads, settings.device if on_gpu else None,
                                  settings.gpu_jpeg_min_side, service.metrics.images_encoded,
                                  service.metrics.encode_seconds)
        for batcher in service.batchers.values():
            batcher.start()
        warming = asyncio.create_task(warm_up_or_stop(service, app.state.stop))
        lag = asyncio.create_task(watch_loop_lag(service.metrics.loop_lag))
        # process-wide: apps started and stopped in nested order (tests, one server a process) put each other's back
        python_default = sys.getswitchinterval()
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
        service.metrics.switch_interval.set(sys.getswitchinterval())
        try:
            yield
        finally:
            sys.setswitchinterval(python_default)
            service.draining = True
            warming.cancel()
            lag.cancel()
            await asyncio.gather(*(b.stop() for b in service.batchers.values()))
            service.encoder.close()

    # telemetry off: our own Prometheus metrics cover the routes, and its per-request checks cost CPU
    app = FastAPI(title="flowmap-serve", version="0.1.0", lifespan=lifespan,
                  telemetry={"tracing": False, "metrics": False},
                  description=f"One-step flow-map generation for the {bundle.name!r} bundle: OpenAI-style images, "
                              "native batches and Best-of-N noise search.")
    app.state.service = service
    app.state.stop = lambda: None  # `flowmap serve` replaces it with a stop of the whole process
    app.include_router(router)

    async def _handle(request, err):
        return error_for(err, request.url.path, service)

    for kind in (ApiError, RequestValidationError, ValidationError, Overloaded, RequestTooLarge, DeadlineExceeded,
                 TimeoutError, EngineFailure, ClientDisconnected, StarletteHTTPException):
        app.add_exception_handler(kind, _handle)

    # innermost first: the fast path, then the door's refusals, then the request metrics around all of it
    app.add_middleware(FastPath, service=service, fastapi_app=app)
    app.add_middleware(Door, service=service)
    app.add_middleware(HttpMetrics, service=service, fastapi_app=app)
    with_ui = settings.ui if mount_ui is None else mount_ui
    if with_ui:
        from ui.demo import mount_demo

        mount_demo(app, settings, service.model_cards(), DEMO_PATH)

    @app.get("/", include_in_schema=False)
    async def home():
        return RedirectResponse(f"{DEMO_PATH}/" if with_ui else "/docs")

    return app
