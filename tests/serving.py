"""Helpers for tests that need a real server: start `flowmap serve` on a free 127.0.0.1 port."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = Path(os.environ.get("FLOWMAP_TEST_BUNDLE", ROOT / "models" / "digits"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A `flowmap serve` subprocess; `url` is its base address."""

    def __init__(self, *flags: str, bundle: Path = BUNDLE, env: dict | None = None, api_key: str | None = None,
                 host: str = "127.0.0.1"):
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}  # for reading /metrics
        self.port = free_port()
        self.url = f"http://{host}:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flowmap.cli", "serve", "--bundle", str(bundle), "--port", str(self.port),
             "--host", host, *flags],
            cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout: float = 60.0) -> Server:
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.process.stdout.read()}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server did not become ready")

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.stdout.read()

    def metric(self, name: str, **labels) -> float:
        """Sum of a metric's samples whose labels include `labels`, read from /metrics."""
        total = 0.0
        for line in httpx.get(self.url + "/metrics", headers=self.headers).text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            series, value = line.rsplit(" ", 1)
            metric_name = series.split("{", 1)[0]
            if metric_name != name:
                continue
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += float(value)
        return total


@asynccontextmanager
async def in_process(bundle: Path = BUNDLE, mount_ui: bool = False, root_path: str = "", **settings):
    """The app in this process, its lifespan running, reached through httpx's ASGI transport (behind a proxy's
    `root_path` where given): for tests where a real uvicorn adds nothing. Yields (client, service)."""
    from server.app import create_app
    from server.settings import Settings

    app = create_app(Settings(bundle=str(bundle), **settings), mount_ui=mount_ui)
    async with app.router.lifespan_context(app):
        service = app.state.service
        give_up = time.monotonic() + 60
        while not service.ready:
            assert time.monotonic() < give_up and not service.failure, service.failure or "never warm"
            await asyncio.sleep(0.02)
        transport = httpx.ASGITransport(app=app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://in-process", timeout=120) as client:
            yield client, service


def serve_raw(bundle, body, *flags) -> dict:
    """One `format: raw` generate request to a server started for it with `flags`, then stopped: its JSON answer."""
    server = Server("--no-ui", *flags, bundle=bundle).wait_ready()
    try:
        response = httpx.post(server.url + "/v1/generate", json={**body, "format": "raw"}, timeout=60)
    finally:
        log = server.stop()
    assert response.status_code == 200, log[-3000:]
    return response.json()


def decoded(answer: dict):
    """A raw answer's images as one float32 array."""
    import numpy as np

    return np.array(answer["arrays"], np.float32)


def ray_serve(bundle, *flags):
    """`flowmap serve --ray` on a free port until ready; yields its URL, then stops Ray. One at a time on the machine
    (`make test`'s workers take turns): `ray stop --force` stops every Ray there, and a second local Ray would be
    joined by `ray.init(address="auto")`."""
    import fcntl
    import tempfile

    with open(Path(tempfile.gettempdir()) / "flowmap-tests-ray.lock", "w") as turn:
        fcntl.flock(turn, fcntl.LOCK_EX)  # until the file closes: the next worker's turn
        yield from _ray_serve(bundle, *flags)


def _ray_serve(bundle, *flags):
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "flowmap.cli", "serve", "--ray", *flags, "--bundle", str(bundle), "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, ready_in_a_row = time.monotonic() + 240, 0
        while ready_in_a_row < 6:  # every replica warm: several ready answers in a row
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "Ray Serve did not become ready"
            try:
                ready = httpx.get(url + "/health/ready", timeout=5).status_code == 200
            except httpx.HTTPError:
                ready = False
            ready_in_a_row = ready_in_a_row + 1 if ready else 0
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGINT)  # serve.run shuts Serve and the local Ray down on Ctrl-C
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "stop", "--force"],
                       capture_output=True, timeout=60)
