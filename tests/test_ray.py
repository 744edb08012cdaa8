"""Ray Serve: two replicas of the same app behind Ray's HTTP proxy."""

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from serving import BUNDLE, ROOT, Server, free_port

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (the dev extra)")
pytestmark = [pytest.mark.ray, pytest.mark.skipif(not (BUNDLE / "manifest.json").is_file(),
                                                  reason=f"no bundle at {BUNDLE}")]


@pytest.fixture(scope="module")
def ray_url():
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "flowmap.cli", "serve", "--ray", "--replicas", "2", "--cpus-per-replica", "0.5",
         "--bundle", str(BUNDLE), "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, ready_in_a_row = time.monotonic() + 240, 0
        while ready_in_a_row < 6:  # both replicas warm: several ready answers in a row
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


def test_ray_replicas_match_the_plain_server_and_share_the_traffic(ray_url):
    plain = Server().wait_ready()
    try:
        replicas = set()
        for seed in range(24):
            body = {"labels": [seed % 10, 7], "seeds": [seed, 1000 + seed], "steps": 1 + seed % 3}
            via_ray = httpx.post(ray_url + "/v1/generate", json=body, timeout=60)
            direct = httpx.post(plain.url + "/v1/generate", json=body, timeout=60)
            assert via_ray.status_code == direct.status_code == 200
            assert via_ray.json()["images"] == direct.json()["images"]  # byte-identical PNGs
            replicas.add(via_ray.headers["x-flowmap-replica"])
        search = {"label": 3, "n": 16, "seed": 5, "teacher_steps": 4}
        assert (httpx.post(ray_url + "/v1/search", json=search, timeout=60).json()["chosen_seeds"]
                == httpx.post(plain.url + "/v1/search", json=search, timeout=60).json()["chosen_seeds"])
    finally:
        plain.stop()
    assert len(replicas) == 2, f"traffic reached {len(replicas)} replica(s): {replicas}"


def test_errors_and_metrics_come_through_the_proxy(ray_url):
    bad = httpx.post(ray_url + "/v1/generate", json={"labels": [42]}, timeout=30)
    assert bad.status_code == 422 and "out of range 0..9" in bad.json()["error"]["message"]
    assert "flowmap_inference_count_total" in httpx.get(ray_url + "/metrics", timeout=30).text
