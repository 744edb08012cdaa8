"""Ray Serve: two replicas of the same app behind Ray's HTTP proxy."""


import httpx
import pytest

from serving import BUNDLE, Server, ray_serve

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (the dev extra)")
pytestmark = [pytest.mark.ray, pytest.mark.skipif(not (BUNDLE / "manifest.json").is_file(),
                                                  reason=f"no bundle at {BUNDLE}")]


@pytest.fixture(scope="module")
def ray_url():
    yield from ray_serve(BUNDLE, "--replicas", "2", "--cpus-per-replica", "0.5")


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
