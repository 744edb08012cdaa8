"""`flowmap serve`: uvicorn with a graceful drain. On SIGTERM readiness turns false and new requests
get 503 while queued and in-flight work finishes (up to `drain_timeout_s`); then the server exits."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import uvicorn

from server.app import create_app
from server.service import Service
from server.settings import Settings

log = logging.getLogger("flowmap.serve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service, drain_timeout_s: float):
        super().__init__(config)
        self.service, self.drain_timeout_s = service, drain_timeout_s

    def handle_exit(self, sig: int, frame) -> None:
        if self.service.draining:  # a second signal: stop now
            return super().handle_exit(sig, frame)
        self.service.draining = True
        log.warning("received %s: draining (readiness false, new requests 503)",
                    signal.Signals(sig).name if sig else sig)
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

    async def _drain(self) -> None:
        give_up = time.monotonic() + self.drain_timeout_s
        while time.monotonic() < give_up:
            busy = self.service.inflight or any(b.queued_rows for b in self.service.batchers.values())
            if not busy:
                break
            await asyncio.sleep(0.02)
        self.should_exit = True


def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT (exit code 0) or until the warm-up fails (exit code 1)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logging.getLogger("flowmap").addHandler(handler)
    logging.getLogger("flowmap").setLevel(logging.INFO)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            access_log=settings.access_log,
                            timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)))
    server = DrainingServer(config, app.state.service, settings.drain_timeout_s)

    def stop() -> None:
        server.should_exit = True

    app.state.stop = stop
    base = f"http://{settings.host}:{settings.port}"
    log.info("serving bundle %s at %s: API %s/v1, docs %s/docs, metrics %s/metrics%s", settings.bundle, base, base,
             base, base, f", demo {base}/ui" if settings.ui else "")
    server.run()
    return 1 if app.state.service.failure else 0
