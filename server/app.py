"""The FastAPI app: bundle -> engines -> batchers -> pipelines -> routes, behind the gate, with a
warm-up before /health/ready turns true."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from export.bundle import read_bundle
from server.batcher import DeadlineExceeded, DynamicBatcher, EngineFailure, QueueFull
from server.engines import build_engines
from server.errors import error_for
from server.gate import Gate
from server.metrics import Metrics
from server.pipelines import Pipelines
from server.routes import router
from server.service import ApiError, ClientDisconnected, Service
from server.settings import Settings


async def warm_up(service: Service) -> None:
    """Run every engine once at batch 1 and at the largest batch, then turn ready."""
    bundle, far = service.bundle, time.monotonic() + 600
    for rows in (1, service.settings.max_batch_size):
        noise = np.zeros((rows, *bundle.image_shape), np.float32)
        labels = np.zeros(rows, np.int64)
        for cfg_scale in bundle.cfg_scales:
            await service.pipelines.student(noise, labels, 1, cfg_scale, far)
        await service.pipelines.teacher(noise, labels, 1, far)
        await service.pipelines.scores(noise, labels, far)
    service.ready = True


def create_app(settings: Settings | None = None, mount_ui: bool | None = None) -> FastAPI:
    """Build the app. The bundle is read (and every sha256 checked) here, so a tampered bundle stops
    the server before it listens."""
    settings = settings or Settings()
    bundle = read_bundle(settings.bundle, verify=settings.verify_bundle)
    service = Service(settings, bundle, Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engines = build_engines(bundle, settings)
        service.batchers = {name: DynamicBatcher(engine, settings.max_batch_size, settings.max_queue_delay_ms,
                                                 settings.max_queue_size, service.metrics)
                            for name, engine in engines.items()}
        for batcher in service.batchers.values():
            batcher.start()
        service.pipelines = Pipelines(service.batchers, service.metrics)
        warming = asyncio.create_task(warm_up(service))
        try:
            yield
        finally:
            service.draining = True
            warming.cancel()
            await asyncio.gather(*(b.stop() for b in service.batchers.values()))

    app = FastAPI(title="flowmap-serve", version="0.1.0", lifespan=lifespan,
                  description=f"One-step flow-map generation for the {bundle.name!r} bundle: OpenAI-style images, "
                              "native batches and Best-of-N noise search.")
    app.state.service = service
    app.include_router(router)

    async def _handle(request, err):
        return error_for(err, request.url.path, service)

    for kind in (ApiError, RequestValidationError, ValidationError, QueueFull, DeadlineExceeded, TimeoutError,
                 EngineFailure, ClientDisconnected):
        app.add_exception_handler(kind, _handle)

    app.add_middleware(Gate, service=service, fastapi_app=app)
    if settings.ui if mount_ui is None else mount_ui:
        from ui.demo import mount_demo

        mount_demo(app, settings, service.model_cards())
    return app
